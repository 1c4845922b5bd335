"""Ringing: RingCall, AcceptCall, RejectCall and the server-side ring timers.

Each callee has one ring row per call: `ringing`, then exactly one outcome (`accepted`, or `rejected`
with reason decline / busy / cancel / timeout). Three durable timers drive the outcomes nobody asked
for: `ring_incoming` (per callee: still ringing → rejected "timeout"), `ring_auto_cancel` (per call:
nobody accepted → everyone still ringing is rejected "cancel") and `ring_missed` (per callee: neither
accepted nor declined → `call.missed`, guarded by the row's `missed_notified`). Every transition locks the
call row first and checks the row's status, so a timer that fires twice, late, or after an answer
changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from callplane_server.auth.context import current_principal
from callplane_server.domain.call import Call
from callplane_server.domain.events import Notified, Rang, RingAccepted, RingMissed, RingRejected
from callplane_server.domain.records import CallView, SessionRecord, TimerRecord
from callplane_server.domain.validation import USER_ID, check_call_key, check_pattern
from callplane_server.errors import FailedPrecondition, InvalidArgument, NotFound, ViolationCollector
from callplane_server.services.authz import Caller, require_self
from callplane_server.services.call_lookup import open_call
from callplane_server.services.clock import Clock
from callplane_server.services.timers import TimerRunner
from callplane_server.store import Store, Transaction
from callplane_server.store.rings import ACCEPTED, REJECTED, RINGING, RingRecord

RING_INCOMING = "ring_incoming"
RING_MISSED = "ring_missed"
RING_AUTO_CANCEL = "ring_auto_cancel"
#: RingCall.members_ids at most (Stream's limit).
MAX_RING_MEMBERS = 25

DECLINE = "decline"
BUSY = "busy"
CANCEL = "cancel"
TIMEOUT = "timeout"
#: Rejections that still count as a missed call (the callee never answered).
_UNANSWERED = {CANCEL, TIMEOUT}
#: The reasons a client may give (timeouts are the server's).
_CLIENT_REASONS = (DECLINE, BUSY, CANCEL)

_DEFAULT_TIMEOUTS_MS = {
    "incoming_call_timeout_ms": 15_000,
    "auto_cancel_timeout_ms": 15_000,
    "missed_call_timeout_ms": 15_000,
}


@dataclass
class RingResult:
    """RingCall's answer: who is now ringing, and the call."""

    members_ids: list[str]
    call: CallView


# -- helpers shared with CallService.get_or_create ----------------------------------------------------


def _timeout(settings: dict[str, Any], name: str) -> timedelta:
    value = (settings.get("ring") or {}).get(name) or _DEFAULT_TIMEOUTS_MS[name]
    return timedelta(milliseconds=int(value))


def _current(ring: RingRecord | None, call: Call) -> RingRecord | None:
    """The ring row if it belongs to this incarnation of the call (a hard-deleted and recreated cid
    may leave older rows and timers behind)."""
    if ring is None or ring.rung_at < call.record.created_at:
        return None
    return ring


async def _update_session(tx: Transaction, call: Call, change: Callable[[SessionRecord], bool]) -> None:
    """Applies `change` to the running session, if any (accepted_by / rejected_by / missed_by)."""
    if not call.record.current_session_id:
        return
    session = await tx.sessions.get(call.record.current_session_id)
    if session is None or session.ended_at is not None:
        return
    if change(session):
        await tx.sessions.save(session)


async def ring_members(tx: Transaction, call: Call, caller: str, callees: Sequence[str], video: bool) -> None:
    """Rings `callees` in this transaction: resets their ring rows, schedules their timers and the
    call's auto-cancel, and records `call.ring` to them."""
    cid, settings, now = call.cid, call.settings, call.now
    incoming_at = now + _timeout(settings, "incoming_call_timeout_ms")
    missed_at = now + _timeout(settings, "missed_call_timeout_ms")
    for user_id in callees:
        await tx.rings.put(RingRecord(cid, user_id, caller, RINGING, now, video=video))
        await tx.timers.schedule(RING_INCOMING, cid, incoming_at, key=user_id)
        await tx.timers.schedule(RING_MISSED, cid, missed_at, key=user_id)
    await tx.timers.schedule(RING_AUTO_CANCEL, cid, now + _timeout(settings, "auto_cancel_timeout_ms"))
    call.record_event(Rang(call.view(), caller, list(callees), video), recipients=callees)


async def ring_created_call(
    tx: Transaction, call: Call, member_ids: Sequence[str], *, ring: bool, notify: bool, video: bool
) -> None:
    """GetOrCreateCall's `ring` / `notify`, in the transaction that created the call: rings (or, with
    only `notify`, sends `call.notification` to) every member except the creator. `ring` wins over
    `notify`."""
    caller = call.record.created_by_user_id or ""
    if not caller or not (ring or notify):
        return
    targets = [user_id for user_id in dict.fromkeys(member_ids) if user_id != caller]
    if not targets:
        return
    if ring:
        await ring_members(tx, call, caller, targets, video)
        return
    call.record_event(Notified(call.view(), caller, targets, video), recipients=targets)


# -- the service -----------------------------------------------------------------------------------


class RingingService:
    def __init__(self, store: Store, clock: Clock, timers: TimerRunner) -> None:
        self._store = store
        self._clock = clock
        self._timers = timers
        timers.register(RING_INCOMING, self._on_incoming_timeout)
        timers.register(RING_AUTO_CANCEL, self._on_auto_cancel)
        timers.register(RING_MISSED, self._on_missed)

    # -- RPCs --------------------------------------------------------------------------------------

    async def ring(
        self, call_type: str, call_id: str, user_id: str, members_ids: Sequence[str], video: bool
    ) -> RingResult:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        if len(members_ids) > MAX_RING_MEMBERS:
            problems.add(
                "members_ids", f"at most {MAX_RING_MEMBERS} members per ring, got {len(members_ids)}"
            )
        seen: set[str] = set()
        for index, member in enumerate(members_ids):
            path = f"members_ids[{index}]"
            if not USER_ID.fullmatch(member or ""):
                problems.add(path, f"{member!r} is not a valid user id")
            elif member in seen:
                problems.add(path, f"duplicate user id {member!r}")
            elif member == user_id:
                problems.add(path, "the caller cannot ring themself")
            seen.add(member)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"

        async def ring_call(tx: Transaction) -> RingResult:
            call = await self._ringable_call(tx, cid, "create-call")
            if not await tx.users.existing_ids([user_id]):
                raise NotFound(
                    f"user {user_id!r} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
                )
            if members_ids:
                members = await tx.rings.members_among(cid, members_ids)
                outsiders = {f"members_ids[{i}]": m for i, m in enumerate(members_ids) if m not in members}
                if outsiders:
                    names = ", ".join(outsiders.values())
                    violations = ViolationCollector()
                    for path, member in outsiders.items():
                        violations.add(path, f"user {member!r} is not a member of call {cid!r}")
                    raise InvalidArgument(
                        f"not members of call {cid!r}: {names}",
                        reason="NOT_CALL_MEMBERS",
                        metadata={"cid": cid, "user_ids": ",".join(outsiders.values())},
                        field_violations=violations.violations,
                    )
                callees = list(members_ids)
            else:
                in_call: set[str] = set()
                if call.record.current_session_id:
                    live = await tx.sessions.live_participants(call.record.current_session_id)
                    in_call = {participant.user_id for participant in live}
                callees = [
                    member
                    for member in await tx.rings.member_ids(cid)
                    if member != user_id and member not in in_call
                ]
                if not callees:
                    raise FailedPrecondition(
                        f"nobody to ring in call {cid!r}: every other member is already in the call",
                        reason="NOBODY_TO_RING",
                        metadata={"cid": cid},
                    )
            await ring_members(tx, call, user_id, callees, video)
            return RingResult(callees, call.view())

        result = await self._store.write(ring_call)
        self._timers.wake()
        return result

    async def accept(self, call_type: str, call_id: str, user_id: str) -> None:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"

        async def accept_call(tx: Transaction) -> None:
            call = await self._ringable_call(tx, cid, "read-call")
            ring = _current(await tx.rings.get(cid, user_id), call)
            if ring is None or ring.status != RINGING:
                raise _not_ringing(cid, user_id, ring)
            now = call.now
            ring.status = ACCEPTED
            ring.reason = ""
            ring.answered_at = now
            await tx.rings.save(ring)
            await tx.timers.cancel(RING_INCOMING, cid, key=user_id)
            await tx.timers.cancel(RING_MISSED, cid, key=user_id)
            # Someone answered: the call is no longer auto-cancelled (the others still time out).
            await tx.timers.cancel(RING_AUTO_CANCEL, cid, key="")
            still_ringing = [
                other.user_id
                for other in await tx.rings.for_call(cid, status=RINGING)
                if _current(other, call) is not None
            ]
            # The caller; the callee's other devices (stop ringing); the other callees (someone answered).
            recipients = [ring.caller_user_id, user_id, *still_ringing]
            call.record_event(RingAccepted(user_id), recipients=recipients)

            def record(session: SessionRecord) -> bool:
                if user_id in session.accepted_by:
                    return False
                session.accepted_by = [*session.accepted_by, user_id]
                return True

            await _update_session(tx, call, record)

        await self._store.write(accept_call)

    async def reject(self, call_type: str, call_id: str, user_id: str, reason: str) -> None:
        """`reason`: decline, busy or cancel (timeout is the server's)."""
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        if reason == TIMEOUT:
            problems.add("reason", "timeout is set by the server's ring timers; send decline, busy or cancel")
        elif reason not in _CLIENT_REASONS:
            problems.add("reason", f"unknown reject reason {reason}")
        problems.raise_if_any()
        name = reason
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"

        async def reject_call(tx: Transaction) -> None:
            call = await self._ringable_call(tx, cid, "read-call")
            if name == CANCEL:
                rung = [
                    ring
                    for ring in await tx.rings.for_call(cid, status=RINGING)
                    if ring.caller_user_id == user_id and _current(ring, call) is not None
                ]
                if not rung:
                    raise FailedPrecondition(
                        f"user {user_id!r} has nobody ringing in call {cid!r} to cancel",
                        reason="NOT_RINGING",
                        metadata={"cid": cid, "user_id": user_id},
                    )
                for outgoing in rung:
                    await _reject(tx, call, outgoing, CANCEL)
            else:
                ring = _current(await tx.rings.get(cid, user_id), call)
                if ring is None or ring.status != RINGING:
                    raise _not_ringing(cid, user_id, ring)
                await _reject(tx, call, ring, name)
            await _settle(tx, call)

        await self._store.write(reject_call)

    async def _ringable_call(self, tx: Transaction, cid: str, need: str) -> Call:
        call = await open_call(tx, cid, need, now=self._clock())
        call.check_not_ended()
        return call

    # -- timers ------------------------------------------------------------------------------------

    @staticmethod
    async def _timer_call(tx: Transaction, timer: TimerRecord, now: datetime) -> Call | None:
        # The runner opened the call already; a deleted call has nobody left to ring.
        call = await tx.calls.open(timer.call_cid, now)
        if call is None or call.record.deleted_at is not None:
            return None
        return call

    async def _on_incoming_timeout(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        call = await self._timer_call(tx, timer, now)
        if call is None:
            return
        ring = _current(await tx.rings.get(call.cid, timer.key), call)
        if ring is None or ring.status != RINGING:
            return
        await _reject(tx, call, ring, TIMEOUT)
        await _settle(tx, call)

    async def _on_auto_cancel(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        # Accepting cancels this timer, so firing means nobody accepted since the last ring.
        call = await self._timer_call(tx, timer, now)
        if call is None:
            return
        for ring in await tx.rings.for_call(call.cid, status=RINGING):
            if _current(ring, call) is not None:
                await _reject(tx, call, ring, CANCEL)

    async def _on_missed(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        call = await self._timer_call(tx, timer, now)
        if call is None:
            return
        ring = _current(await tx.rings.get(call.cid, timer.key), call)
        if ring is None or ring.missed_notified:
            return
        unanswered = ring.status == RINGING or (ring.status == REJECTED and ring.reason in _UNANSWERED)
        if not unanswered:
            return
        ring.missed_notified = True
        await tx.rings.save(ring)
        call.record_event(RingMissed(ring.user_id), recipients=[ring.user_id])

        def record(session: SessionRecord) -> bool:
            if ring.user_id in session.missed_by:
                return False
            session.missed_by = [*session.missed_by, ring.user_id]
            return True

        await _update_session(tx, call, record)


def _not_ringing(cid: str, user_id: str, ring: RingRecord | None) -> FailedPrecondition:
    status = "not rung" if ring is None else ring.status + (f" ({ring.reason})" if ring.reason else "")
    return FailedPrecondition(
        f"user {user_id!r} is not ringing in call {cid!r} ({status})",
        reason="NOT_RINGING",
        metadata={"cid": cid, "user_id": user_id, "status": ring.status if ring else ""},
    )


async def _reject(tx: Transaction, call: Call, ring: RingRecord, reason: str) -> None:
    """One callee's ring ends rejected: row, timers, `call.rejected` (to the callee's devices and the
    caller) and the running session's rejected_by."""
    cid = call.cid
    ring.status = REJECTED
    ring.reason = reason
    ring.answered_at = call.now
    await tx.rings.save(ring)
    await tx.timers.cancel(RING_INCOMING, cid, key=ring.user_id)
    if reason not in _UNANSWERED:
        # An explicit decline or busy is an answer, not a missed call.
        await tx.timers.cancel(RING_MISSED, cid, key=ring.user_id)
    call.record_event(RingRejected(ring.user_id, reason), recipients=[ring.caller_user_id, ring.user_id])

    def record(session: SessionRecord) -> bool:
        if session.rejected_by.get(ring.user_id) == reason:
            return False
        session.rejected_by = {**session.rejected_by, ring.user_id: reason}
        return True

    await _update_session(tx, call, record)


async def cancel_rings(tx: Transaction, call: Call) -> None:
    """The call ended or was deleted: everyone still ringing is rejected with "cancel" (and, as with
    any unanswered ring, still gets call.missed when their missed-call timer fires)."""
    for ring in await tx.rings.for_call(call.cid, status=RINGING):
        if _current(ring, call) is not None:
            await _reject(tx, call, ring, CANCEL)
    await tx.timers.cancel(RING_AUTO_CANCEL, call.cid, key="")


async def _settle(tx: Transaction, call: Call) -> None:
    """Nobody left ringing: drop the call's auto-cancel timer."""
    if not any(_current(ring, call) for ring in await tx.rings.for_call(call.cid, status=RINGING)):
        await tx.timers.cancel(RING_AUTO_CANCEL, call.cid, key="")
