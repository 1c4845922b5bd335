"""Plain records passed between the store and the services."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, NamedTuple, TypeVar

JSONDict = dict[str, Any]


@dataclass(frozen=True)
class CustomIndexStatus:
    """A declared custom-data index and its build state (BUILDING, READY, FAILED)."""

    spec: str
    name: str
    state: str
    error: str = ""
    build_seconds: float | None = None
    writes_blocked_seconds: float | None = None


@dataclass
class CallTypeRecord:
    name: str
    settings: JSONDict
    grants: dict[str, list[str]]
    created_at: datetime
    updated_at: datetime
    # Filled by the call type service's own reads (not by every read of the type).
    custom_indexes: list[CustomIndexStatus] = field(default_factory=list)


@dataclass
class UserRecord:
    id: str
    name: str = ""
    image: str = ""
    role: str = "user"
    teams: list[str] = field(default_factory=list)
    custom: JSONDict = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class CallRecord:
    type: str
    id: str
    created_by_user_id: str | None
    team: str | None
    custom: JSONDict
    settings_override: JSONDict
    backstage: bool
    ongoing: bool
    member_count: int
    version: int
    last_seq: int
    created_at: datetime
    updated_at: datetime
    starts_at: datetime | None = None
    ended_at: datetime | None = None
    deleted_at: datetime | None = None
    current_session_id: str | None = None
    # Ordered pins: [{"participant_session_id", "user_id", "pinned_at" (ISO string)}].
    pins: list[JSONDict] = field(default_factory=list)
    blocked_user_ids: list[str] = field(default_factory=list)

    @property
    def cid(self) -> str:
        return f"{self.type}:{self.id}"

    @property
    def etag(self) -> str:
        # Includes the creation instant so a hard-deleted and recreated call never reuses an etag.
        identity = f"{self.cid}|{self.created_at.isoformat()}|{self.version}"
        return hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()


class CallStamp(NamedTuple):
    """What a cached call's freshness is judged by: the call's last_seq (bumped by every change to it, its
    members, permissions or blocks), its creation instant (a call recreated under the same cid is another
    call) and the directory version (bumped by every change to users or call types)."""

    last_seq: int
    created_at: datetime
    directory: int


@dataclass
class MemberRecord:
    call_cid: str
    user_id: str
    role: str
    custom: JSONDict
    created_at: datetime
    updated_at: datetime
    user: UserRecord | None = None


SortDirection = Literal["asc", "desc"]
SortValueType = Literal["string", "number", "boolean"]


@dataclass(frozen=True)
class SortInput:
    """One requested sort key, as the client sent it (validated by the store's query compiler)."""

    field: str
    direction: SortDirection = "asc"
    type: SortValueType | None = None


@dataclass(frozen=True)
class PageRequest:
    """A Query* request: filter, sort, page size and at most one cursor."""

    filter_conditions: JSONDict | None = None
    sort: tuple[SortInput, ...] = ()
    limit: int = 25
    next: str = ""
    prev: str = ""


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    next: str = ""
    prev: str = ""


@dataclass
class MemberInput:
    user_id: str
    role: str = ""
    # None keeps the member's current custom data (or {} for a new member).
    custom: dict[str, Any] | None = None


@dataclass
class CallView:
    """A call as clients see it: with effective settings and its first members."""

    call: CallRecord
    settings: dict[str, Any]
    members: list[MemberRecord]
    created: bool = False
    # What the caller may do in the call, in the canonical CAPABILITIES order.
    own_capabilities: list[str] = field(default_factory=list)


@dataclass
class ParticipantRecord:
    session_id: str
    participant_session_id: str
    call_cid: str
    user_id: str
    role: str
    custom: JSONDict
    custom_version: int
    published_tracks: list[str]
    joined_at: datetime
    left_at: datetime | None = None
    left_reason: str = ""
    lease_expires_at: datetime | None = None
    # The replica whose WatchCall stream holds the presence (then there is no lease of its own).
    held_by: str | None = None

    @property
    def custom_etag(self) -> str:
        return f"{self.participant_session_id}.{self.custom_version}"


@dataclass
class SessionRecord:
    id: str
    call_cid: str
    started_at: datetime
    ended_at: datetime | None = None
    end_reason: str = ""
    timer_ends_at: datetime | None = None
    custom: JSONDict = field(default_factory=dict)
    custom_version: int = 0
    accepted_by: list[str] = field(default_factory=list)
    rejected_by: dict[str, str] = field(default_factory=dict)
    missed_by: list[str] = field(default_factory=list)

    @property
    def custom_etag(self) -> str:
        return f"{self.id[:8]}.{self.custom_version}"


@dataclass
class TimerRecord:
    id: int
    kind: str
    call_cid: str
    key: str
    due_at: datetime
    payload: JSONDict = field(default_factory=dict)
