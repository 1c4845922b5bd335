"""The one encoder from domain events to the stored (and streamed) protobuf `Event`."""

from __future__ import annotations

from datetime import datetime

from callplane.v1 import event_pb2
from callplane_server.domain import events as domain
from callplane_server.domain.records import ParticipantRecord
from callplane_server.messages import (
    call_message,
    dict_to_struct,
    member_message,
    participant_message,
    pin_messages,
    session_message,
    set_timestamp,
)


def encode(event: domain.DomainEvent, call_cid: str, seq: int, at: datetime) -> event_pb2.Event:
    """`event` as the log stores it (position and user_seq are filled in when read back)."""
    message = _payload(event, at)
    message.type = event.type
    message.call_cid = call_cid
    message.seq = seq
    set_timestamp(message.created_at, at)
    return message


def _payload(event: domain.DomainEvent, at: datetime) -> event_pb2.Event:
    match event:
        case domain.CallCreated(call=view, members=members):
            return event_pb2.Event(
                call_created=event_pb2.CallCreatedEvent(
                    call=call_message(view), members=[member_message(m) for m in members]
                )
            )
        case domain.CallUpdated(call=view):
            return event_pb2.Event(call_updated=event_pb2.CallUpdatedEvent(call=call_message(view)))
        case domain.CallLiveStarted(call=view):
            return event_pb2.Event(call_live_started=event_pb2.CallLiveStartedEvent(call=call_message(view)))
        case domain.CallEnded(call=view, reason=reason):
            return event_pb2.Event(
                call_ended=event_pb2.CallEndedEvent(call=call_message(view), reason=reason)
            )
        case domain.CallDeleted(call=view, hard=hard):
            return event_pb2.Event(
                call_deleted=event_pb2.CallDeletedEvent(call=call_message(view), hard=hard)
            )
        case domain.PinsUpdated(pins=pins):
            return event_pb2.Event(call_pins_updated=event_pb2.PinsEvent(pins=pin_messages(pins)))
        case domain.MembersAdded(members=members):
            return event_pb2.Event(
                call_member_added=event_pb2.MembersEvent(members=[member_message(m) for m in members])
            )
        case domain.MembersUpdated(members=members):
            return event_pb2.Event(
                call_member_updated=event_pb2.MembersEvent(members=[member_message(m) for m in members])
            )
        case domain.MembersRemoved(user_ids=user_ids):
            return event_pb2.Event(call_member_removed=event_pb2.MembersRemovedEvent(user_ids=user_ids))
        case domain.SessionStarted(session=session):
            return event_pb2.Event(
                call_session_started=event_pb2.SessionEvent(session=session_message(session, [], at))
            )
        case domain.SessionEnded(session=session, participants=participants):
            return event_pb2.Event(
                call_session_ended=event_pb2.SessionEvent(session=session_message(session, participants, at))
            )
        case domain.ParticipantJoined(participant=participant):
            return event_pb2.Event(call_session_participant_joined=_participant(participant, at))
        case domain.ParticipantLeft(participant=participant, reason=reason):
            return event_pb2.Event(call_session_participant_left=_participant(participant, at, reason))
        case domain.ParticipantUpdated(participant=participant):
            return event_pb2.Event(call_session_participant_updated=_participant(participant, at))
        case domain.ParticipantCustomUpdated(participant=participant):
            return event_pb2.Event(call_participant_custom_updated=_participant(participant, at))
        case domain.ParticipantCountUpdated(session_id=session_id, by_role=by_role):
            return event_pb2.Event(
                call_session_participant_count_updated=event_pb2.ParticipantCountEvent(
                    session_id=session_id,
                    participant_count=sum(by_role.values()),
                    participant_count_by_role=by_role,
                )
            )
        case domain.SessionCustomUpdated(session=session, updated_by_user_id=by):
            payload = event_pb2.SessionCustomEvent(
                session_id=session.id, custom_etag=session.custom_etag, updated_by_user_id=by
            )
            dict_to_struct(session.custom, payload.custom)
            return event_pb2.Event(call_session_custom_updated=payload)
        case domain.Rang(call=view, caller_user_id=caller, user_ids=user_ids, video=video):
            return event_pb2.Event(
                call_ring=event_pb2.RingEvent(
                    call=call_message(view), caller_user_id=caller, user_ids=user_ids, video=video
                )
            )
        case domain.Notified(call=view, caller_user_id=caller, user_ids=user_ids, video=video):
            return event_pb2.Event(
                call_notification=event_pb2.RingEvent(
                    call=call_message(view), caller_user_id=caller, user_ids=user_ids, video=video
                )
            )
        case domain.RingAccepted(user_id=user_id):
            return event_pb2.Event(call_accepted=event_pb2.RingResponseEvent(user_id=user_id))
        case domain.RingRejected(user_id=user_id, reason=reason):
            return event_pb2.Event(call_rejected=event_pb2.RingResponseEvent(user_id=user_id, reason=reason))
        case domain.RingMissed(user_id=user_id):
            return event_pb2.Event(call_missed=event_pb2.RingResponseEvent(user_id=user_id))
        case domain.CustomEventSent():
            custom = event_pb2.CustomEvent(
                user_id=event.user_id,
                to_user_ids=event.to_user_ids,
                to_roles=event.to_roles,
                request_id=event.request_id,
            )
            dict_to_struct(event.custom, custom.custom)
            return event_pb2.Event(custom=custom)
        case domain.PermissionRequested(user_id=user_id, permissions=permissions):
            return event_pb2.Event(
                call_permission_request=event_pb2.PermissionRequestEvent(
                    user_id=user_id, permissions=permissions
                )
            )
        case domain.PermissionsUpdated(user_id=user_id, own_capabilities=capabilities):
            return event_pb2.Event(
                call_permissions_updated=event_pb2.PermissionsUpdatedEvent(
                    user_id=user_id, own_capabilities=capabilities
                )
            )
        case domain.UserBlocked(user_id=user_id, by_user_id=by):
            return event_pb2.Event(
                call_blocked_user=event_pb2.ModerationEvent(user_id=user_id, by_user_id=by)
            )
        case domain.UserUnblocked(user_id=user_id, by_user_id=by):
            return event_pb2.Event(
                call_unblocked_user=event_pb2.ModerationEvent(user_id=user_id, by_user_id=by)
            )
        case domain.UserKicked(user_id=user_id, by_user_id=by):
            return event_pb2.Event(call_kicked_user=event_pb2.ModerationEvent(user_id=user_id, by_user_id=by))
    raise TypeError(f"no encoding for {type(event).__name__}")  # pragma: no cover - every type has one


def _participant(
    participant: ParticipantRecord, at: datetime, reason: str = ""
) -> event_pb2.ParticipantEvent:
    return event_pb2.ParticipantEvent(
        session_id=participant.session_id, participant=participant_message(participant, at), reason=reason
    )
