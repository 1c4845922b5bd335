"""Session rules that run inside a caller's write transaction, shared by SessionService (joins, leaves,
timers) and CallService (EndCall, DeleteCall, UpdateCall's max duration). Every function expects the
call opened (its row locked; lock order: call → sessions, participants, timers) and records
events through it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from callplane_server.domain.call import Call
from callplane_server.domain.events import (
    ParticipantCountUpdated,
    ParticipantLeft,
    SessionEnded,
    participants_by_role,
)
from callplane_server.domain.records import ParticipantRecord, SessionRecord
from callplane_server.store import Transaction

# Durable timer kinds (TimerRunner handlers are registered by SessionService).
LEASE_TIMER = "participant_lease"
INACTIVITY_TIMER = "session_inactivity"
MAX_DURATION_TIMER = "max_duration"
SESSION_TIMERS = (LEASE_TIMER, INACTIVITY_TIMER, MAX_DURATION_TIMER)
#: A replica's lease on the participants its streams hold (keyed by replica id, of no call).
REPLICA_TIMER = "replica_lease"

# ParticipantEvent.reason values for call.session_participant_left.
LEFT = "left"
LEASE_EXPIRED = "lease_expired"
MAX_DURATION = "max_duration"
CALL_ENDED = "call_ended"
DISCONNECTED = "disconnected"

# CallSession.end_reason values.
END_INACTIVITY = "inactivity"
END_MAX_DURATION = "max_duration"
END_CALL_ENDED = "call_ended"


def max_duration_seconds(settings: dict[str, Any]) -> int:
    return int(settings.get("limits", {}).get("max_duration_seconds") or 0)


def inactivity_timeout_seconds(settings: dict[str, Any]) -> int:
    return int(settings.get("session", {}).get("inactivity_timeout_seconds") or 30)


async def record_counts(
    tx: Transaction, call: Call, session_id: str, live: list[ParticipantRecord] | None = None
) -> int:
    """Records the session's live participant counts (of `live` when the caller knows who is live now,
    read otherwise); returns the event's seq."""
    if live is None:
        live = await tx.sessions.live_participants(session_id)
    return call.record_event(ParticipantCountUpdated(session_id, participants_by_role(live)))


async def mark_left(tx: Transaction, call: Call, participant: ParticipantRecord, reason: str) -> int:
    """Marks one live participant as left, drops its lease timer and its pin and records
    participant_left (the caller records the count update). Returns the event's seq."""
    participant.left_at = call.now
    participant.left_reason = reason
    participant.lease_expires_at = None
    await tx.sessions.save_participant(participant)
    await tx.timers.cancel(LEASE_TIMER, participant.call_cid, key=participant.participant_session_id)
    seq = call.record_event(ParticipantLeft(participant, reason))
    call.unpin(participant.participant_session_id)
    return seq


async def end_session(
    tx: Transaction, call: Call, session: SessionRecord, end_reason: str, leave_reason: str
) -> None:
    """Removes every live participant (`leave_reason`), ends the session with its final custom data and
    history (`call.session_ended`), and clears the call's session, pins and session timers."""
    live = await tx.sessions.live_participants(session.id)
    for participant in live:
        await mark_left(tx, call, participant, leave_reason)
    if live:
        await record_counts(tx, call, session.id, [])
    session.ended_at = call.now
    session.end_reason = end_reason
    await tx.sessions.save(session)
    for kind in SESSION_TIMERS:
        await tx.timers.cancel(kind, call.cid)
    history = (await tx.sessions.participants([session.id]))[session.id]
    call.record_event(SessionEnded(session, history))
    call.session_over()


async def end_running_session(tx: Transaction, call: Call) -> None:
    """For EndCall / DeleteCall: everyone leaves (`call_ended`), the running session ends (`call_ended`)
    and the call's session timers are cancelled."""
    if call.record.current_session_id:
        session = await tx.sessions.get(call.record.current_session_id)
        if session is not None and session.ended_at is None:
            await end_session(tx, call, session, END_CALL_ENDED, CALL_ENDED)
            return
        call.session_over()
    for kind in SESSION_TIMERS:
        await tx.timers.cancel(kind, call.cid)


async def reschedule_max_duration(tx: Transaction, call: Call) -> None:
    """After a settings change: moves (or sets, or clears) the running session's `timer_ends_at` to
    started_at + limits.max_duration_seconds, and its durable timer with it."""
    if not call.record.current_session_id:
        return
    session = await tx.sessions.get(call.record.current_session_id)
    if session is None or session.ended_at is not None:
        return
    seconds = max_duration_seconds(call.settings)
    ends_at = session.started_at + timedelta(seconds=seconds) if seconds > 0 else None
    if ends_at == session.timer_ends_at:
        return
    session.timer_ends_at = ends_at
    await tx.sessions.save(session)
    if ends_at is None:
        await tx.timers.cancel(MAX_DURATION_TIMER, call.cid)
    else:
        await tx.timers.schedule(MAX_DURATION_TIMER, call.cid, ends_at, payload={"session_id": session.id})
