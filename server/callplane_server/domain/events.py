"""What happened to a call, as the use cases record it: typed domain events, free of the wire format.

A write records these on the call they happened to (`Call.record_event`, numbered from the call's locked
row); the unit of work's event log turns each into its stored protobuf form in one place
(callplane_server.events.encoding). Every class names its public event type
(`call.updated`, ...), which is also the `type` clients filter on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from callplane_server.domain.records import (
    CallView,
    JSONDict,
    MemberRecord,
    ParticipantRecord,
    SessionRecord,
)


@dataclass(frozen=True)
class DomainEvent:
    type: ClassVar[str]


# -- the call itself ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallCreated(DomainEvent):
    type: ClassVar[str] = "call.created"
    call: CallView
    members: Sequence[MemberRecord]


@dataclass(frozen=True)
class _CallChange(DomainEvent):
    call: CallView


@dataclass(frozen=True)
class CallUpdated(_CallChange):
    type: ClassVar[str] = "call.updated"


@dataclass(frozen=True)
class CallLiveStarted(_CallChange):
    type: ClassVar[str] = "call.live_started"


@dataclass(frozen=True)
class CallEnded(DomainEvent):
    type: ClassVar[str] = "call.ended"
    call: CallView
    reason: str


@dataclass(frozen=True)
class CallDeleted(DomainEvent):
    type: ClassVar[str] = "call.deleted"
    call: CallView
    hard: bool


@dataclass(frozen=True)
class PinsUpdated(DomainEvent):
    type: ClassVar[str] = "call.pins_updated"
    pins: Sequence[JSONDict]


# -- members -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MembersChange(DomainEvent):
    members: Sequence[MemberRecord]


@dataclass(frozen=True)
class MembersAdded(_MembersChange):
    type: ClassVar[str] = "call.member_added"


@dataclass(frozen=True)
class MembersUpdated(_MembersChange):
    type: ClassVar[str] = "call.member_updated"


@dataclass(frozen=True)
class MembersRemoved(DomainEvent):
    type: ClassVar[str] = "call.member_removed"
    user_ids: Sequence[str]


# -- sessions and participants -----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted(DomainEvent):
    type: ClassVar[str] = "call.session_started"
    session: SessionRecord


@dataclass(frozen=True)
class SessionEnded(DomainEvent):
    type: ClassVar[str] = "call.session_ended"
    session: SessionRecord
    # Everyone who took part, for the session's history.
    participants: Sequence[ParticipantRecord]


@dataclass(frozen=True)
class _ParticipantChange(DomainEvent):
    participant: ParticipantRecord


@dataclass(frozen=True)
class ParticipantJoined(_ParticipantChange):
    type: ClassVar[str] = "call.session_participant_joined"


@dataclass(frozen=True)
class ParticipantLeft(_ParticipantChange):
    type: ClassVar[str] = "call.session_participant_left"
    reason: str


@dataclass(frozen=True)
class ParticipantUpdated(_ParticipantChange):
    type: ClassVar[str] = "call.session_participant_updated"


@dataclass(frozen=True)
class ParticipantCountUpdated(DomainEvent):
    type: ClassVar[str] = "call.session_participant_count_updated"
    session_id: str
    # Live participants by role.
    by_role: dict[str, int]


@dataclass(frozen=True)
class ParticipantCustomUpdated(_ParticipantChange):
    type: ClassVar[str] = "call.participant_custom_updated"


@dataclass(frozen=True)
class SessionCustomUpdated(DomainEvent):
    type: ClassVar[str] = "call.session_custom_updated"
    session: SessionRecord
    updated_by_user_id: str


# -- ringing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ringing(DomainEvent):
    call: CallView
    caller_user_id: str
    user_ids: Sequence[str]
    video: bool


@dataclass(frozen=True)
class Rang(_Ringing):
    type: ClassVar[str] = "call.ring"


@dataclass(frozen=True)
class Notified(_Ringing):
    type: ClassVar[str] = "call.notification"


@dataclass(frozen=True)
class _RingOutcome(DomainEvent):
    user_id: str


@dataclass(frozen=True)
class RingAccepted(_RingOutcome):
    type: ClassVar[str] = "call.accepted"


@dataclass(frozen=True)
class RingRejected(_RingOutcome):
    type: ClassVar[str] = "call.rejected"
    reason: str


@dataclass(frozen=True)
class RingMissed(_RingOutcome):
    type: ClassVar[str] = "call.missed"


# -- custom events, permissions and moderation -------------------------------------------------------


@dataclass(frozen=True)
class CustomEventSent(DomainEvent):
    type: ClassVar[str] = "custom"
    user_id: str
    custom: dict[str, Any]
    to_user_ids: Sequence[str] = ()
    to_roles: Sequence[str] = ()
    request_id: str = ""


@dataclass(frozen=True)
class PermissionRequested(DomainEvent):
    type: ClassVar[str] = "call.permission_request"
    user_id: str
    permissions: Sequence[str]


@dataclass(frozen=True)
class PermissionsUpdated(DomainEvent):
    type: ClassVar[str] = "call.permissions_updated"
    user_id: str
    own_capabilities: Sequence[str]


@dataclass(frozen=True)
class _Moderated(DomainEvent):
    user_id: str
    by_user_id: str


@dataclass(frozen=True)
class UserBlocked(_Moderated):
    type: ClassVar[str] = "call.blocked_user"


@dataclass(frozen=True)
class UserUnblocked(_Moderated):
    type: ClassVar[str] = "call.unblocked_user"


@dataclass(frozen=True)
class UserKicked(_Moderated):
    type: ClassVar[str] = "call.kicked_user"


def participants_by_role(participants: Sequence[ParticipantRecord]) -> dict[str, int]:
    """Live participants counted by role."""
    counts: dict[str, int] = {}
    for participant in participants:
        if participant.left_at is None:
            counts[participant.role] = counts.get(participant.role, 0) + 1
    return counts
