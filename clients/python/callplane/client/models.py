"""Plain result objects. Each keeps the message it was built from as `.proto`."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from callplane.client.convert import from_timestamp, grants_to_dict, settings_to_dict, struct_to_dict
from callplane.client.custom import CustomData
from callplane.v1 import call_pb2, call_type_pb2, event_pb2, session_pb2, user_pb2, webhook_service_pb2

__all__ = [
    "CallInfo",
    "CallSnapshotMessage",
    "CallState",
    "CallTypeInfo",
    "CustomIndexInfo",
    "EventMessage",
    "JoinInfo",
    "MemberInfo",
    "MembersUpdate",
    "ParticipantInfo",
    "ParticipantsPage",
    "PinInfo",
    "ProgressMessage",
    "QueryPage",
    "RingResult",
    "SentEvent",
    "SessionInfo",
    "StreamMessage",
    "UserInfo",
    "WebhookDeliveryInfo",
    "WebhookInfo",
    "WebhookRedelivery",
    "WebhookSecret",
    "to_track",
    "track_name",
]

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
class CustomIndexInfo:
    """A custom-data index a call type declares, with its build state: "BUILDING", "READY" or "FAILED"."""

    spec: str
    name: str
    state: str
    error: str
    build_duration: _dt.timedelta | None
    writes_blocked: _dt.timedelta | None

    @classmethod
    def from_proto(cls, msg: call_type_pb2.CustomIndex) -> CustomIndexInfo:
        return cls(
            spec=msg.spec,
            name=msg.name,
            state=call_type_pb2.CustomIndexState.Name(msg.state).removeprefix("CUSTOM_INDEX_STATE_"),
            error=msg.error,
            build_duration=msg.build_duration.ToTimedelta() if msg.HasField("build_duration") else None,
            writes_blocked=msg.writes_blocked.ToTimedelta() if msg.HasField("writes_blocked") else None,
        )


@dataclass(frozen=True)
class CallTypeInfo:
    """A call type: full settings, role → capability names, and its custom-data indexes."""

    name: str
    settings: dict[str, Any]
    grants: dict[str, list[str]]
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    proto: call_type_pb2.CallType = field(repr=False, compare=False)
    custom_indexes: list[CustomIndexInfo] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: call_type_pb2.CallType) -> CallTypeInfo:
        return cls(
            name=msg.name,
            settings=settings_to_dict(msg.settings),
            grants=grants_to_dict(msg.grants),
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            proto=msg,
            custom_indexes=[CustomIndexInfo.from_proto(index) for index in msg.custom_indexes],
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


# Sessions, participants, pins


@dataclass(frozen=True)
class ParticipantInfo:
    """One connection of a user to a call's session."""

    participant_session_id: str
    user_id: str
    role: str
    custom: CustomData
    custom_etag: str
    published_tracks: list[str]
    joined_at: _dt.datetime | None
    left_at: _dt.datetime | None
    duration_seconds: float
    lease_expires_at: _dt.datetime | None
    proto: session_pb2.Participant = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: session_pb2.Participant) -> ParticipantInfo:
        return cls(
            participant_session_id=msg.participant_session_id,
            user_id=msg.user_id,
            role=msg.role,
            custom=CustomData(struct_to_dict(msg.custom)),
            custom_etag=msg.custom_etag,
            published_tracks=[track_name(t) for t in msg.published_tracks],
            joined_at=from_timestamp(msg, "joined_at"),
            left_at=from_timestamp(msg, "left_at"),
            duration_seconds=msg.duration_seconds,
            lease_expires_at=from_timestamp(msg, "lease_expires_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class SessionInfo:
    """A session of a call: live participants while it runs, history after it ended."""

    id: str
    call_cid: str
    started_at: _dt.datetime | None
    ended_at: _dt.datetime | None
    timer_ends_at: _dt.datetime | None
    custom: CustomData
    custom_etag: str
    accepted_by: list[str]
    rejected_by: dict[str, str]
    missed_by: list[str]
    participants: list[ParticipantInfo]
    participant_count: int
    end_reason: str
    proto: session_pb2.CallSession = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: session_pb2.CallSession) -> SessionInfo:
        return cls(
            id=msg.id,
            call_cid=msg.call_cid,
            started_at=from_timestamp(msg, "started_at"),
            ended_at=from_timestamp(msg, "ended_at"),
            timer_ends_at=from_timestamp(msg, "timer_ends_at"),
            custom=CustomData(struct_to_dict(msg.custom)),
            custom_etag=msg.custom_etag,
            accepted_by=list(msg.accepted_by),
            rejected_by=dict(msg.rejected_by),
            missed_by=list(msg.missed_by),
            participants=[ParticipantInfo.from_proto(p) for p in msg.participants],
            participant_count=msg.participant_count,
            end_reason=msg.end_reason,
            proto=msg,
        )


@dataclass(frozen=True)
class PinInfo:
    """A pinned participant (pins are kept in order)."""

    participant_session_id: str
    user_id: str
    pinned_at: _dt.datetime | None
    proto: session_pb2.Pin = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: session_pb2.Pin) -> PinInfo:
        return cls(msg.participant_session_id, msg.user_id, from_timestamp(msg, "pinned_at"), msg)


@dataclass(frozen=True)
class JoinInfo:
    """Result of `Call.join`: the call, the running session, this participant, its lease and the call's
    seq after the join (pass it to `Call.watch(after_seq=...)`)."""

    call: CallInfo
    session: SessionInfo
    participant: ParticipantInfo
    lease_ttl_seconds: float
    seq: int
    proto: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: Any) -> JoinInfo:
        return cls(
            call=CallInfo.from_proto(msg.call),
            session=SessionInfo.from_proto(msg.session),
            participant=ParticipantInfo.from_proto(msg.participant),
            lease_ttl_seconds=msg.lease_ttl.ToTimedelta().total_seconds(),
            seq=msg.seq,
            proto=msg,
        )


@dataclass(frozen=True)
class ParticipantsPage(QueryPage[ParticipantInfo]):
    """A page of live participants, with counts over the whole session (not just this page)."""

    total_participants: int = 0
    participants_by_role: dict[str, int] = field(default_factory=dict)
    session_id: str = ""


@dataclass(frozen=True)
class SentEvent:
    """Result of `Call.send_event`: the event's seq, and whether the request was a retry (sent once)."""

    seq: int
    duplicate: bool
    proto: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RingResult:
    """Result of `Call.ring`: the users now ringing and the call."""

    members_ids: list[str]
    call: CallInfo
    proto: Any = field(default=None, repr=False, compare=False)


def track_name(track: int) -> str:
    """`TRACK_TYPE_SCREEN_SHARE` → `"screen_share"`."""
    number = cast("session_pb2.TrackType.ValueType", track)  # any int: Name() rejects unknown ones
    return session_pb2.TrackType.Name(number).removeprefix("TRACK_TYPE_").lower()


def to_track(track: str | int) -> session_pb2.TrackType.ValueType:
    """`"screen_share"` (or `TRACK_TYPE_SCREEN_SHARE`, or the enum number) → the TrackType number."""
    if isinstance(track, int):
        return cast("session_pb2.TrackType.ValueType", track)  # passed through: the server checks it
    name = track.upper()
    if not name.startswith("TRACK_TYPE_"):
        name = f"TRACK_TYPE_{name}"
    try:
        return session_pb2.TrackType.Value(name)
    except ValueError:
        raise ValueError(f"unknown track type {track!r}") from None


# Streams


@dataclass(frozen=True)
class CallSnapshotMessage:
    """The first message of `Call.watch(snapshot=True)`: the call's state at `seq`."""

    seq: int
    call: CallInfo
    members: list[MemberInfo]
    session: SessionInfo | None
    pins: list[PinInfo]
    proto: Any = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: Any) -> CallSnapshotMessage:
        return cls(
            seq=msg.seq,
            call=CallInfo.from_proto(msg.call),
            members=[MemberInfo.from_proto(m) for m in msg.members],
            session=SessionInfo.from_proto(msg.session) if msg.HasField("session") else None,
            pins=[PinInfo.from_proto(p) for p in msg.pins],
            proto=msg,
        )


@dataclass(frozen=True)
class EventMessage:
    """One event. `type` is Stream's name (`call.updated`); `payload` the typed message in `proto`."""

    type: str
    call_cid: str
    seq: int
    position: int
    user_seq: int
    created_at: _dt.datetime | None
    proto: event_pb2.Event = field(repr=False, compare=False)

    @property
    def payload(self) -> Any:
        """The event's typed payload message (e.g. `CallUpdatedEvent`), or None."""
        kind = self.proto.WhichOneof("payload")
        return getattr(self.proto, kind) if kind else None

    @classmethod
    def from_proto(cls, msg: event_pb2.Event) -> EventMessage:
        return cls(
            type=msg.type,
            call_cid=msg.call_cid,
            seq=msg.seq,
            position=msg.position,
            user_seq=msg.user_seq,
            created_at=from_timestamp(msg, "created_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class ProgressMessage:
    """Nothing happened up to `seq` (the stream's seq, user_seq or position): a safe resume point."""

    seq: int
    at: _dt.datetime | None
    proto: Any = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: Any) -> ProgressMessage:
        return cls(seq=msg.seq, at=from_timestamp(msg, "at"), proto=msg)


StreamMessage = CallSnapshotMessage | EventMessage | ProgressMessage


# Webhooks


@dataclass(frozen=True)
class WebhookInfo:
    """A webhook endpoint (never its secret). `state` is "ACTIVE", "FAILING" or "DISABLED"."""

    id: str
    url: str
    event_types: list[str]
    call_types: list[str]
    description: str
    enabled: bool
    state: str
    delivered_position: int
    failing_since: _dt.datetime | None
    last_error: str
    previous_secret_expires_at: _dt.datetime | None
    created_at: _dt.datetime | None
    updated_at: _dt.datetime | None
    proto: webhook_service_pb2.Webhook = field(repr=False, compare=False)

    @property
    def failing(self) -> bool:
        """Whether delivery gave up on an event: nothing is sent until `resume_webhook`."""
        return self.state == "FAILING"

    @classmethod
    def from_proto(cls, msg: webhook_service_pb2.Webhook) -> WebhookInfo:
        return cls(
            id=msg.id,
            url=msg.url,
            event_types=list(msg.event_types),
            call_types=list(msg.call_types),
            description=msg.description,
            enabled=msg.enabled,
            state=webhook_service_pb2.WebhookState.Name(msg.state).removeprefix("WEBHOOK_STATE_"),
            delivered_position=msg.delivered_position,
            failing_since=from_timestamp(msg, "failing_since"),
            last_error=msg.last_error,
            previous_secret_expires_at=from_timestamp(msg, "previous_secret_expires_at"),
            created_at=from_timestamp(msg, "created_at"),
            updated_at=from_timestamp(msg, "updated_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class WebhookSecret:
    """Result of `create_webhook` and `rotate_webhook_secret`: the endpoint and its new signing secret
    (`whsec_...`), shown only this once: pass it as is to a Standard Webhooks library."""

    webhook: WebhookInfo
    secret: str = field(repr=False)
    proto: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: Any) -> WebhookSecret:
        """From a CreateWebhookResponse or RotateWebhookSecretResponse."""
        return cls(webhook=WebhookInfo.from_proto(msg.webhook), secret=msg.secret, proto=msg)


@dataclass(frozen=True)
class WebhookDeliveryInfo:
    """One event's delivery to one endpoint. `status` is "PENDING", "SUCCEEDED" or "FAILED";
    `message_id` is the `webhook-id` header sent (the same on every attempt); `last_status_code` 0 means
    no answer (timeout or connection error)."""

    webhook_id: str
    position: int
    message_id: str
    call_cid: str
    seq: int
    event_type: str
    status: str
    attempts: int
    last_status_code: int
    last_latency: _dt.timedelta | None
    last_error: str
    first_attempt_at: _dt.datetime | None
    last_attempt_at: _dt.datetime | None
    next_attempt_at: _dt.datetime | None
    proto: webhook_service_pb2.WebhookDelivery = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: webhook_service_pb2.WebhookDelivery) -> WebhookDeliveryInfo:
        return cls(
            webhook_id=msg.webhook_id,
            position=msg.position,
            message_id=msg.message_id,
            call_cid=msg.call_cid,
            seq=msg.seq,
            event_type=msg.event_type,
            status=webhook_service_pb2.WebhookDeliveryStatus.Name(msg.status).removeprefix(
                "WEBHOOK_DELIVERY_STATUS_"
            ),
            attempts=msg.attempts,
            last_status_code=msg.last_status_code,
            last_latency=msg.last_latency.ToTimedelta() if msg.HasField("last_latency") else None,
            last_error=msg.last_error,
            first_attempt_at=from_timestamp(msg, "first_attempt_at"),
            last_attempt_at=from_timestamp(msg, "last_attempt_at"),
            next_attempt_at=from_timestamp(msg, "next_attempt_at"),
            proto=msg,
        )


@dataclass(frozen=True)
class WebhookRedelivery:
    """Result of `redeliver_webhook`: the endpoint (its `delivered_position` moved back for
    `after_position`) and how many deliveries were queued (for `positions`)."""

    webhook: WebhookInfo
    queued: int
    proto: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: webhook_service_pb2.RedeliverWebhookResponse) -> WebhookRedelivery:
        return cls(webhook=WebhookInfo.from_proto(msg.webhook), queued=msg.queued, proto=msg)
