"""Participant and session custom data, custom events and pins.

Every change locks the call row first (which also serializes the call's event seq), checks, changes and
appends its event in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from callplane_server.auth.context import current_principal
from callplane_server.domain.call import Call
from callplane_server.domain.events import (
    CustomEventSent,
    ParticipantCustomUpdated,
    SessionCustomUpdated,
)
from callplane_server.domain.records import (
    PageRequest,
    ParticipantRecord,
    SessionRecord,
)
from callplane_server.domain.validation import (
    MAX_BATCH,
    ROLE_NAME,
    USER_ID,
    check_call_key,
    check_custom_size,
    check_pattern,
    custom_size,
)
from callplane_server.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ViolationCollector,
)
from callplane_server.services.authz import Caller, require_self
from callplane_server.services.call_lookup import open_call, unknown_users
from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.store import Store, Transaction

MAX_REQUEST_ID_CHARS = 64
MAX_PARTICIPANT_SESSION_ID_CHARS = 64
MAX_KEY_CHARS = 256
_ROLE_PAGE = 100


class CustomMode(Enum):
    REPLACE = "replace"
    SHALLOW_MERGE = "shallow_merge"


@dataclass
class CustomChange:
    """A change of a custom data document (participant or session)."""

    mode: CustomMode
    custom: dict[str, Any]
    keys_to_delete: list[str] = field(default_factory=list)
    etag: str = ""

    def apply(self, current: dict[str, Any]) -> dict[str, Any]:
        if self.mode is CustomMode.REPLACE:
            return dict(self.custom)
        result = {**current, **self.custom}
        for key in self.keys_to_delete:
            result.pop(key, None)
        return result


@dataclass
class ParticipantCustomResult:
    participant: ParticipantRecord
    at: datetime


@dataclass
class SessionCustomResult:
    session: SessionRecord
    participants: list[ParticipantRecord]
    at: datetime


@dataclass
class SentEvent:
    seq: int
    duplicate: bool


def _check_change(change: CustomChange, limit: int, problems: ViolationCollector) -> None:
    if change.mode is CustomMode.REPLACE:
        if change.keys_to_delete:
            problems.add("keys_to_delete", "only allowed with mode CUSTOM_DATA_MODE_SHALLOW_MERGE")
        # The whole document is given: too large is too large whatever is stored now.
        check_custom_size(change.custom, limit, "custom", problems)
    else:
        for index, key in enumerate(change.keys_to_delete):
            if not key or len(key) > MAX_KEY_CHARS:
                problems.add(f"keys_to_delete[{index}]", f"must be a key of 1..{MAX_KEY_CHARS} characters")
            elif key in change.custom:
                problems.add(f"keys_to_delete[{index}]", f"{key!r} is both set in custom and deleted")


def _check_participant_session_id(value: str, problems: ViolationCollector) -> None:
    if not value:
        problems.add("participant_session_id", "is required")
    elif len(value) > MAX_PARTICIPANT_SESSION_ID_CHARS:
        problems.add("participant_session_id", f"at most {MAX_PARTICIPANT_SESSION_ID_CHARS} characters")


def _check_result_size(custom: dict[str, Any], limit: int) -> None:
    problems = ViolationCollector()
    size = custom_size(custom)
    if size > limit:
        problems.add("custom", f"custom data would be {size} bytes after the change; the limit is {limit}")
    problems.raise_if_any()


def _etag_mismatch(what: str, given: str, current: str, metadata: dict[str, object]) -> Aborted:
    return Aborted(
        f"{what} custom data changed since etag {given!r} (now {current!r}); re-read and retry",
        reason="ETAG_MISMATCH",
        metadata={**metadata, "etag": given, "current_etag": current},
    )


def _no_active_session(cid: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"call {cid!r} has no running session", reason="NO_ACTIVE_SESSION", metadata={"cid": cid}
    )


def _participant_not_found(cid: str, participant_session_id: str) -> NotFound:
    return NotFound(
        f"participant {participant_session_id!r} is not in call {cid!r}'s running session",
        reason="PARTICIPANT_NOT_FOUND",
        metadata={"cid": cid, "participant_session_id": participant_session_id},
    )


class CallDataService:
    def __init__(self, store: Store, clock: Clock, limits: Limits) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    async def _running_session(tx: Transaction, call: Call) -> SessionRecord | None:
        if not call.record.current_session_id:
            return None
        session = await tx.sessions.get(call.record.current_session_id)
        return session if session is not None and session.ended_at is None else None

    @staticmethod
    async def _live_participant(
        tx: Transaction, call: Call, session: SessionRecord | None, participant_session_id: str
    ) -> ParticipantRecord:
        participant = (
            await tx.sessions.get_participant(session.id, participant_session_id) if session else None
        )
        if participant is None or participant.left_at is not None:
            raise _participant_not_found(call.cid, participant_session_id)
        return participant

    @staticmethod
    async def _role_recipients(
        tx: Transaction, call: Call, session: SessionRecord | None, roles: list[str]
    ) -> list[str]:
        """Members whose call role is one of `roles`, and live participants joined with one of them
        (non-members join with their user role)."""
        found: list[str] = []
        cursor = ""
        while True:
            page = await tx.members.query(
                call.cid,
                PageRequest(filter_conditions={"role": {"$in": roles}}, limit=_ROLE_PAGE, next=cursor),
            )
            found.extend(member.user_id for member in page.items)
            if not page.next or not page.items:
                break
            cursor = page.next
        if session is not None:
            wanted = set(roles)
            found.extend(
                p.user_id for p in await tx.sessions.live_participants(session.id) if p.role in wanted
            )
        return found

    # -- custom data -------------------------------------------------------------------------------

    async def update_participant_custom(
        self,
        call_type: str,
        call_id: str,
        participant_session_id: str,
        user_id: str,
        change: CustomChange,
    ) -> ParticipantCustomResult:
        limit = self._limits.max_participant_custom_bytes
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        _check_participant_session_id(participant_session_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        _check_change(change, limit, problems)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"

        async def update_custom(tx: Transaction) -> ParticipantCustomResult:
            call = await open_call(tx, cid, now=self._clock())
            session = await self._running_session(tx, call)
            if session is None:
                raise _no_active_session(cid)
            participant = await self._live_participant(tx, call, session, participant_session_id)
            if participant.user_id != user_id:
                raise PermissionDenied(
                    f"user {user_id!r} may only change their own participant data; "
                    f"{participant_session_id!r} belongs to {participant.user_id!r}",
                    reason="NOT_OWN_PARTICIPANT",
                    metadata={
                        "cid": cid,
                        "participant_session_id": participant_session_id,
                        "user_id": user_id,
                    },
                )
            if change.etag and change.etag != participant.custom_etag:
                raise _etag_mismatch(
                    "participant",
                    change.etag,
                    participant.custom_etag,
                    {"cid": cid, "participant_session_id": participant_session_id},
                )
            custom = change.apply(participant.custom)
            _check_result_size(custom, limit)
            if custom != participant.custom:
                participant.custom = custom
                participant.custom_version += 1
                await tx.sessions.save_participant(participant)
                call.record_event(ParticipantCustomUpdated(participant))
            return ParticipantCustomResult(participant, call.now)

        return await self._store.write(update_custom)

    async def update_session_custom(
        self, call_type: str, call_id: str, user_id: str, change: CustomChange
    ) -> SessionCustomResult:
        limit = self._limits.max_session_custom_bytes
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        _check_change(change, limit, problems)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"

        async def update_custom(tx: Transaction) -> SessionCustomResult:
            call = await open_call(tx, cid, now=self._clock())
            session = await self._running_session(tx, call)
            if session is None:
                raise _no_active_session(cid)
            participants = await tx.sessions.live_participants(session.id)
            if not any(p.user_id == user_id for p in participants):
                raise FailedPrecondition(
                    f"user {user_id!r} is not a participant of call {cid!r}'s running session",
                    reason="NOT_A_PARTICIPANT",
                    metadata={"cid": cid, "user_id": user_id, "session_id": session.id},
                )
            if change.etag and change.etag != session.custom_etag:
                raise _etag_mismatch(
                    "session", change.etag, session.custom_etag, {"cid": cid, "session_id": session.id}
                )
            custom = change.apply(session.custom)
            _check_result_size(custom, limit)
            if custom != session.custom:
                session.custom = custom
                session.custom_version += 1
                await tx.sessions.save(session)
                call.record_event(SessionCustomUpdated(session, updated_by_user_id=user_id))
            return SessionCustomResult(session, participants, call.now)

        return await self._store.write(update_custom)

    # -- custom events -----------------------------------------------------------------------------

    async def send_event(
        self,
        call_type: str,
        call_id: str,
        user_id: str,
        custom: dict[str, Any],
        to_user_ids: list[str],
        to_roles: list[str],
        request_id: str = "",
    ) -> SentEvent:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        check_custom_size(custom, self._limits.max_custom_event_bytes, "custom", problems)
        for name, values, pattern, what in (
            ("to_user_ids", to_user_ids, USER_ID, "user id"),
            ("to_roles", to_roles, ROLE_NAME, "role"),
        ):
            if len(values) > MAX_BATCH:
                problems.add(name, f"at most {MAX_BATCH} per request, got {len(values)}")
            for index, value in enumerate(values):
                if not pattern.fullmatch(value or ""):
                    problems.add(f"{name}[{index}]", f"{value!r} is not a valid {what}")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            problems.add("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        cid = f"{call_type}:{call_id}"
        user_ids = list(dict.fromkeys(to_user_ids))
        roles = list(dict.fromkeys(to_roles))

        async def send(tx: Transaction) -> SentEvent:
            # The call lock serializes retries of one request_id; the key's primary key is the backstop.
            call = await open_call(tx, cid, "create-reaction", now=self._clock())
            if request_id:
                first = await tx.idempotency.get(cid, request_id)
                if first is not None:
                    return SentEvent(int(first["seq"]), duplicate=True)
            wanted = [user_id, *user_ids]
            existing = await tx.users.existing_ids(wanted)
            if user_id not in existing:
                raise NotFound(
                    f"user {user_id!r} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
                )
            unknown = {
                f"to_user_ids[{index}]": value
                for index, value in enumerate(to_user_ids)
                if value not in existing
            }
            if unknown:
                raise unknown_users(unknown)
            recipients = list(user_ids)
            if roles:
                session = await self._running_session(tx, call)
                recipients.extend(await self._role_recipients(tx, call, session, roles))
            seq = call.record_event(CustomEventSent(user_id, custom, user_ids, roles, request_id), recipients)
            if request_id:
                await tx.idempotency.insert(cid, request_id, {"seq": seq}, call.now)
            return SentEvent(seq, duplicate=False)

        return await self._store.write(send)

    # -- pins -------------------------------------------------------------------------------------

    def _check_pin_request(
        self, call_type: str, call_id: str, participant_session_id: str, user_id: str
    ) -> None:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        _check_participant_session_id(participant_session_id, problems)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        problems.raise_if_any()

    async def pin(
        self, call_type: str, call_id: str, participant_session_id: str, user_id: str
    ) -> list[dict[str, Any]]:
        self._check_pin_request(call_type, call_id, participant_session_id, user_id)
        cid = f"{call_type}:{call_id}"

        async def pin_participant(tx: Transaction) -> list[dict[str, Any]]:
            call = await open_call(tx, cid, "pin-for-everyone", now=self._clock())
            session = await self._running_session(tx, call)
            participant = await self._live_participant(tx, call, session, participant_session_id)
            if participant.user_id != user_id:
                raise NotFound(
                    f"participant {participant_session_id!r} is not user {user_id!r}",
                    reason="PARTICIPANT_NOT_FOUND",
                    metadata={
                        "cid": cid,
                        "participant_session_id": participant_session_id,
                        "user_id": user_id,
                    },
                )
            pins = call.record.pins
            if any(pin["participant_session_id"] == participant_session_id for pin in pins):
                return list(pins)
            pin = {
                "participant_session_id": participant_session_id,
                "user_id": user_id,
                "pinned_at": call.now.isoformat(),
            }
            call.set_pins([*pins, pin])
            return call.record.pins

        return await self._store.write(pin_participant)

    async def unpin(
        self, call_type: str, call_id: str, participant_session_id: str, user_id: str
    ) -> list[dict[str, Any]]:
        self._check_pin_request(call_type, call_id, participant_session_id, user_id)
        cid = f"{call_type}:{call_id}"

        async def unpin_participant(tx: Transaction) -> list[dict[str, Any]]:
            call = await open_call(tx, cid, "pin-for-everyone", now=self._clock())
            pins = call.record.pins
            kept = [
                pin
                for pin in pins
                if not (pin["participant_session_id"] == participant_session_id and pin["user_id"] == user_id)
            ]
            if len(kept) == len(pins):
                return list(pins)
            call.set_pins(kept)
            return call.record.pins

        return await self._store.write(unpin_participant)
