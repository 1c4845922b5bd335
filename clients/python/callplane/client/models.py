"""Plain result objects. Each keeps the message it was built from as `.proto`."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from callplane.client.convert import from_timestamp, grants_to_dict, settings_to_dict, struct_to_dict
from callplane.client.custom import CustomData
from callplane.v1 import call_pb2, call_type_pb2, user_pb2

__all__ = ["CallInfo", "CallState", "CallTypeInfo", "MemberInfo", "MembersUpdate", "QueryPage", "UserInfo"]

T = TypeVar("T")


@dataclass(frozen=True)
class UserInfo:
    """A user."""

    id: str
    name: str
    image: str
    role: str
    teams: list[str]
    custom: CustomData
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    proto: user_pb2.User = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: user_pb2.User) -> UserInfo:
        return cls(
            id=msg.id,
            name=msg.name,
            image=msg.image,
            role=msg.role,
            teams=list(msg.teams),
            custom=CustomData(struct_to_dict(msg.custom)),
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class MemberInfo:
    """A member of a call: user id, call role and per-call custom data."""

    user_id: str
    role: str
    custom: CustomData
    user: UserInfo | None
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    proto: call_pb2.Member = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: call_pb2.Member) -> MemberInfo:
        return cls(
            user_id=msg.user_id,
            role=msg.role,
            custom=CustomData(struct_to_dict(msg.custom)),
            user=UserInfo.from_proto(msg.user) if msg.HasField("user") else None,
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class CallInfo:
    """A call's fields. `settings` are the effective settings, `settings_override` the call's own."""

    cid: str
    type: str
    id: str
    created_by_user_id: str
    team: str
    custom: CustomData
    settings: dict[str, Any]
    settings_override: dict[str, Any]
    backstage: bool
    ongoing: bool
    member_count: int
    etag: str
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    starts_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    proto: call_pb2.Call = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        """Whether the call was ended."""
        return self.ended_at is not None

    @classmethod
    def from_proto(cls, msg: call_pb2.Call) -> CallInfo:
        return cls(
            cid=msg.cid,
            type=msg.type,
            id=msg.id,
            created_by_user_id=msg.created_by_user_id,
            team=msg.team,
            custom=CustomData(struct_to_dict(msg.custom)),
            settings=settings_to_dict(msg.settings),
            settings_override=settings_to_dict(msg.settings_override),
            backstage=msg.backstage,
            ongoing=msg.ongoing,
            member_count=msg.member_count,
            etag=msg.etag,
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            starts_at=from_timestamp(msg, "starts_at"),
            ended_at=from_timestamp(msg, "ended_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class CallState:
    """A call with (some of) its members; `created` is set by `Call.get_or_create`."""

    call: CallInfo
    members: list[MemberInfo]
    created: bool = False
    proto: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: Any, *, created: bool = False) -> CallState:
        """From any message with `call` and `members` (CallState, Get*/UpdateCallResponse)."""
        return cls(
            call=CallInfo.from_proto(msg.call),
            members=[MemberInfo.from_proto(m) for m in msg.members],
            created=created,
            proto=msg,
        )


@dataclass(frozen=True)
class MembersUpdate:
    """Result of `Call.update_members`: the added/updated members and the removed user ids."""

    members: list[MemberInfo]
    removed_user_ids: list[str]
    proto: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CallTypeInfo:
    """A call type: full settings and role → capability names."""

    name: str
    settings: dict[str, Any]
    grants: dict[str, list[str]]
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    proto: call_type_pb2.CallType = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: call_type_pb2.CallType) -> CallTypeInfo:
        return cls(
            name=msg.name,
            settings=settings_to_dict(msg.settings),
            grants=grants_to_dict(msg.grants),
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class QueryPage(Generic[T]):
    """One page of a query. Pass `next` (or `prev`) back to get the adjacent page; None at the ends."""

    items: list[T]
    next: str | None
    prev: str | None
    proto: Any = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    @property
    def has_next(self) -> bool:
        return bool(self.next)

    @property
    def has_prev(self) -> bool:
        return bool(self.prev)
