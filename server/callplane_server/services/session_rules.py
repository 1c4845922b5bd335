"""Session rules that run inside a caller's write transaction, shared by SessionService (joins, leaves,
timers) and CallService (EndCall, DeleteCall, UpdateCall's max duration). Every function expects the
call row to be locked already (lock order: call → sessions, participants, timers)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from callplane_server.domain.call_types import merge_settings
from callplane_server.domain.events import (
    ParticipantCountUpdated,
    ParticipantLeft,
    PinsUpdated,
    SessionEnded,
    participants_by_role,
)
from callplane_server.domain.records import CallRecord, ParticipantRecord, SessionRecord
from callplane_server.store import Transaction

# Durable timer kinds (TimerRunner handlers are registered by SessionService).
LEASE_TIMER = "participant_lease"
INACTIVITY_TIMER = "session_inactivity"
MAX_DURATION_TIMER = "max_duration"
SESSION_TIMERS = (LEASE_TIMER, INACTIVITY_TIMER, MAX_DURATION_TIMER)

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


async def effective_settings(tx: Transaction, call: CallRecord) -> dict[str, Any]:
    type_record = await tx.call_types.get(call.type)
    return merge_settings(type_record.settings if type_record else {}, call.settings_override)


def max_duration_seconds(settings: dict[str, Any]) -> int:
    return int(settings.get("limits", {}).get("max_duration_seconds") or 0)


def inactivity_timeout_seconds(settings: dict[str, Any]) -> int:
    return int(settings.get("session", {}).get("inactivity_timeout_seconds") or 30)


async def emit_counts(tx: Transaction, cid: str, session_id: str, now: datetime) -> int:
    live = await tx.sessions.live_participants(session_id)
    counts = ParticipantCountUpdated(session_id, participants_by_role(live))
    return await tx.events.record(cid, counts, now)


async def mark_left(tx: Transaction, participant: ParticipantRecord, reason: str, now: datetime) -> int:
    """Marks one live participant as left, drops its lease timer and emits participant_left (the caller
    emits the count update). Returns the event's seq."""
    participant.left_at = now
    participant.left_reason = reason
    participant.lease_expires_at = None
    await tx.sessions.save_participant(participant)
    await tx.timers.cancel(LEASE_TIMER, participant.call_cid, key=participant.participant_session_id)
    seq = await tx.events.record(participant.call_cid, ParticipantLeft(participant, reason), now)
    # A pin of a connection that is gone would point at nothing: drop it.
    call = await tx.calls.get(participant.call_cid)
    if call is not None and any(
        pin["participant_session_id"] == participant.participant_session_id for pin in call.pins
    ):
        call.pins = [
            p for p in call.pins if p["participant_session_id"] != participant.participant_session_id
        ]
        await tx.calls.save(call)
        await tx.events.record(call.cid, PinsUpdated(list(call.pins)), now)
    return seq


async def end_session(
    tx: Transaction,
    call: CallRecord,
    session: SessionRecord,
    end_reason: str,
    leave_reason: str,
    now: datetime,
) -> None:
    """Removes every live participant (`leave_reason`), ends the session with its final custom data and
    history (`call.session_ended`), clears the call's pins and session timers and saves the call."""
    live = await tx.sessions.live_participants(session.id)
    for participant in live:
        await mark_left(tx, participant, leave_reason, now)
    if live:
        await emit_counts(tx, call.cid, session.id, now)
    session.ended_at = now
    session.end_reason = end_reason
    await tx.sessions.save(session)
    for kind in SESSION_TIMERS:
        await tx.timers.cancel(kind, call.cid)
    call.current_session_id = None
    call.ongoing = False
    # mark_left above already dropped the pins of everyone who left; only report what remains.
    fresh = await tx.calls.get(call.cid)
    had_pins = bool(fresh.pins) if fresh is not None else bool(call.pins)
    call.pins = []
    await tx.calls.save(call)
    history = (await tx.sessions.participants([session.id]))[session.id]
    await tx.events.record(call.cid, SessionEnded(session, history), now)
    if had_pins:
        await tx.events.record(call.cid, PinsUpdated([]), now)


async def end_running_session(tx: Transaction, call: CallRecord, now: datetime) -> None:
    """For EndCall / DeleteCall: everyone leaves (`call_ended`), the running session ends (`call_ended`)
    and the call's session timers are cancelled. Mutates and saves `call`."""
    if call.current_session_id:
        session = await tx.sessions.get(call.current_session_id)
        if session is not None and session.ended_at is None:
            await end_session(tx, call, session, END_CALL_ENDED, CALL_ENDED, now)
            return
        call.current_session_id = None
        call.ongoing = False
        await tx.calls.save(call)
    for kind in SESSION_TIMERS:
        await tx.timers.cancel(kind, call.cid)


async def reschedule_max_duration(tx: Transaction, call: CallRecord, settings: dict[str, Any]) -> None:
    """After a settings change: moves (or sets, or clears) the running session's `timer_ends_at` to
    started_at + limits.max_duration_seconds, and its durable timer with it."""
    if not call.current_session_id:
        return
    session = await tx.sessions.get(call.current_session_id)
    if session is None or session.ended_at is not None:
        return
    seconds = max_duration_seconds(settings)
    ends_at = session.started_at + timedelta(seconds=seconds) if seconds > 0 else None
    if ends_at == session.timer_ends_at:
        return
    session.timer_ends_at = ends_at
    await tx.sessions.save(session)
    if ends_at is None:
        await tx.timers.cancel(MAX_DURATION_TIMER, call.cid)
    else:
        await tx.timers.schedule(MAX_DURATION_TIMER, call.cid, ends_at, payload={"session_id": session.id})
