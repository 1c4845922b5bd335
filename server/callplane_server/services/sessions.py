"""Sessions and participants: joins, leases, leaves, inactivity and max-duration timers, backstage.

Presence never leaks. A joined participant holds a lease with a durable `participant_lease` timer, which
KeepAlive renews. A WatchCall stream opened with the participant's id takes hold of it for its replica
(server process): the participant's own lease and timer go, and the replica's one lease (a
`replica_lease` timer it renews every ttl/3, one statement whatever the number of participants) covers
every participant its streams hold. When the stream ends the participant leaves at once. If the replica
dies instead, its lease runs out and whichever replica fires the timer gives its participants leases of
their own that have already run out, which the lease timers then remove."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from callplane_server.auth.context import authority_context, current_principal
from callplane_server.auth.tokens import SERVER, Principal
from callplane_server.domain.call import Call
from callplane_server.domain.events import (
    ParticipantJoined,
    ParticipantUpdated,
    SessionStarted,
)
from callplane_server.domain.records import (
    CallRecord,
    CallView,
    Page,
    PageRequest,
    ParticipantRecord,
    SessionRecord,
    TimerRecord,
    UserRecord,
)
from callplane_server.domain.validation import (
    USER_ID,
    check_call_key,
    check_custom_size,
    check_pattern,
    new_call_id,
)
from callplane_server.errors import (
    CallplaneError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ViolationCollector,
)
from callplane_server.messages import TRACK_NAMES
from callplane_server.services.authz import (
    Caller,
    call_capabilities,
    load_caller,
    require,
    require_self,
)
from callplane_server.services.call_lookup import caller_of, live_call, open_call
from callplane_server.services.calls import CallData, CallService
from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.services.session_rules import (
    DISCONNECTED,
    END_INACTIVITY,
    END_MAX_DURATION,
    INACTIVITY_TIMER,
    LEASE_EXPIRED,
    LEASE_TIMER,
    LEFT,
    MAX_DURATION,
    MAX_DURATION_TIMER,
    REPLICA_TIMER,
    end_session,
    inactivity_timeout_seconds,
    mark_left,
    max_duration_seconds,
    record_counts,
)
from callplane_server.services.timers import TimerRunner
from callplane_server.store import Store, Transaction
from callplane_server.store.sessions import Joiner

log = logging.getLogger(__name__)

#: How long the renewer waits after a stream opens for others to open, so they share one write.
_GATHER_OPENINGS = 0.02
PARTICIPANT_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class JoinResult:
    view: CallView
    session: SessionRecord
    participants: list[ParticipantRecord]
    participant: ParticipantRecord
    seq: int
    now: datetime
    capabilities: frozenset[str] = frozenset()


@dataclass
class ParticipantsPage:
    page: Page[ParticipantRecord]
    session_id: str
    total: int
    by_role: dict[str, int]
    now: datetime


@dataclass
class SessionsPage:
    page: Page[SessionRecord]
    participants: dict[str, list[ParticipantRecord]] = field(default_factory=dict)
    now: datetime | None = None


def participant_not_found(cid: str, participant_session_id: str) -> NotFound:
    return NotFound(
        f"participant {participant_session_id!r} is not in call {cid!r}",
        reason="PARTICIPANT_NOT_FOUND",
        metadata={"cid": cid, "participant_session_id": participant_session_id},
    )


#: The capability each published track needs (UpdateParticipant).
TRACK_CAPABILITIES = {
    "audio": "send-audio",
    "video": "send-video",
    "screen_share": "screenshare",
    "screen_share_audio": "screenshare",
}


def require_own_participant(caller: Caller, participant: ParticipantRecord) -> None:
    """User tokens act only on their own participants (connections)."""
    if caller.is_server or caller.user_id == participant.user_id:
        return
    raise PermissionDenied(
        f"participant {participant.participant_session_id!r} belongs to another user",
        reason="NOT_OWN_PARTICIPANT",
        metadata={
            "cid": participant.call_cid,
            "participant_session_id": participant.participant_session_id,
            "user_id": caller.user_id,
        },
    )


async def joining_capabilities(
    tx: Transaction, caller: Caller, call: Call, user_id: str, joiner: Joiner | None
) -> frozenset[str]:
    """What the joining user (`joiner`: None when the user does not exist) may do in the call: for a user
    token (always the joining user), join-call is required (blocked users, other teams and out-of-scope
    calls are refused); a server token may join anyone, and the joined user's own capabilities decide
    backstage and ended-call access."""
    standing = (joiner.member_role, joiner.overrides) if joiner is not None else None
    if not caller.is_server:
        return await require(tx, caller, call.record, "join-call", grants=call.grants, standing=standing)
    if joiner is None:
        return frozenset()
    return await call_capabilities(
        tx, Caller(Principal(user_id=user_id), joiner.user), call.record, call.grants, standing=standing
    )


def _participant_left(cid: str, participant: ParticipantRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"participant {participant.participant_session_id!r} already left call {cid!r} "
        f"({participant.left_reason}); join again",
        reason="PARTICIPANT_LEFT",
        metadata={
            "cid": cid,
            "participant_session_id": participant.participant_session_id,
            "left_reason": participant.left_reason,
        },
    )


def _joinable_from(starts_at: datetime | None, ahead_seconds: int) -> datetime | None:
    """When ordinary users may join a backstage call: `ahead_seconds` before its start (a start in year 1
    leaves no earlier datetime: from then)."""
    if starts_at is None:
        return None
    try:
        return starts_at - timedelta(seconds=ahead_seconds)
    except OverflowError:
        return datetime.min.replace(tzinfo=starts_at.tzinfo)


def _join_order(participant: ParticipantRecord) -> tuple[datetime, str]:
    """The order live participants are listed in (as the store's queries give them)."""
    return participant.joined_at, participant.participant_session_id


def _call_ended(cid: str) -> FailedPrecondition:
    return FailedPrecondition(f"call {cid!r} has ended", reason="CALL_ENDED", metadata={"cid": cid})


class SessionService:
    """Also the Presence of WatchCall streams opened with a participant_session_id."""

    def __init__(
        self, store: Store, clock: Clock, limits: Limits, timers: TimerRunner, *, lease_ttl: timedelta
    ) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self._timers = timers
        self._lease_ttl = lease_ttl
        self._calls = CallService(store, clock, limits)
        #: This process's id as a holder of presence (a new one each start: a restarted process does not
        #: hold what its predecessor held; the predecessor's lease runs out instead).
        self.replica_id = uuid.uuid4().hex
        # Participants whose presence a WatchCall stream of this process holds: (cid, id) → open streams.
        self._held: dict[tuple[str, str], int] = {}
        self._keeper: asyncio.Task[None] | None = None
        # Streams opened since the last write of the keeper, whose hold it writes soon (see stream_opened).
        self._opened: set[tuple[str, str]] = set()
        self._hold_soon = asyncio.Event()
        self._closing = False
        timers.register(LEASE_TIMER, self._on_lease_expired)
        timers.register(REPLICA_TIMER, self._on_replica_lease_expired)
        timers.register(INACTIVITY_TIMER, self._on_inactivity)
        timers.register(MAX_DURATION_TIMER, self._on_max_duration)

    @property
    def lease_ttl(self) -> timedelta:
        return self._lease_ttl

    # -- helpers -----------------------------------------------------------------------------------

    async def _renew_lease(self, tx: Transaction, participant: ParticipantRecord, now: datetime) -> None:
        """Renews the participant's own lease. One held by a stream of this process needs none; one held
        by another replica (a client moving from its stream to KeepAlive) gets its own lease back."""
        if participant.held_by is not None:
            if participant.held_by == self.replica_id and self._holds(participant):
                return
            await tx.sessions.unhold(participant)
        participant.lease_expires_at = now + self._lease_ttl
        await tx.sessions.save_participant(participant)
        await self._schedule_lease(tx, participant)

    @property
    def presence_held(self) -> int:
        """Participants whose presence a stream of this replica holds."""
        return len(self._held)

    def _holds(self, participant: ParticipantRecord) -> bool:
        return (participant.call_cid, participant.participant_session_id) in self._held and not self._closing

    @staticmethod
    async def _schedule_lease(tx: Transaction, participant: ParticipantRecord) -> None:
        """Sets (or moves) the participant's lease timer to its `lease_expires_at`."""
        assert participant.lease_expires_at is not None
        await tx.timers.schedule(
            LEASE_TIMER,
            participant.call_cid,
            participant.lease_expires_at,
            key=participant.participant_session_id,
            payload={"session_id": participant.session_id},
        )

    async def _current_participant(
        self, tx: Transaction, call: CallRecord, participant_session_id: str
    ) -> ParticipantRecord:
        """The live participant, or NOT_FOUND / FAILED_PRECONDITION (PARTICIPANT_LEFT)."""
        participant = None
        if call.current_session_id:
            participant = await tx.sessions.get_participant(call.current_session_id, participant_session_id)
        if participant is None:
            participant = await tx.sessions.find_participant(call.cid, participant_session_id)
        if participant is None:
            raise participant_not_found(call.cid, participant_session_id)
        if participant.left_at is not None:
            raise _participant_left(call.cid, participant)
        return participant

    async def _leave(
        self,
        tx: Transaction,
        call: Call,
        participant: ParticipantRecord,
        reason: str,
        live: list[ParticipantRecord] | None = None,
    ) -> int:
        """One participant leaves; when the session is left empty, its inactivity timer starts. `live`: the
        session's live participants before the leave, when the caller read them (read here otherwise)."""
        await mark_left(tx, call, participant, reason)
        if live is None:
            live = await tx.sessions.live_participants(participant.session_id)
        else:
            gone = participant.participant_session_id
            live = [p for p in live if p.participant_session_id != gone]
        seq = await record_counts(tx, call, participant.session_id, live)
        running = call.record.current_session_id == participant.session_id
        if running and not live:
            due = call.now + timedelta(seconds=inactivity_timeout_seconds(call.settings))
            await tx.timers.schedule(
                INACTIVITY_TIMER, call.cid, due, payload={"session_id": participant.session_id}
            )
        return seq

    async def remove_participant(
        self, tx: Transaction, call: Call, participant: ParticipantRecord, reason: str
    ) -> int:
        """For moderation (KickUser, BlockUser): one participant leaves in the caller's transaction, with
        the same events and inactivity timer as any other leave."""
        return await self._leave(tx, call, participant, reason)

    @staticmethod
    def _key_problems(call_type: str, call_id: str, participant_session_id: str) -> ViolationCollector:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        check_pattern(
            participant_session_id,
            PARTICIPANT_SESSION_ID,
            "participant_session_id",
            "participant session id (1..64 of A-Z a-z 0-9 _ -)",
            problems,
        )
        return problems

    # -- JoinCall ----------------------------------------------------------------------------------

    async def join(
        self,
        call_type: str,
        call_id: str,
        user_id: str,
        *,
        participant_session_id: str = "",
        custom: dict[str, Any] | None = None,
        create: bool = False,
        data: CallData | None = None,
    ) -> JoinResult:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems, generated_if_empty=create)
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        if participant_session_id and not PARTICIPANT_SESSION_ID.fullmatch(participant_session_id):
            problems.add(
                "participant_session_id",
                f"{participant_session_id!r} is not a valid participant session id"
                " (1..64 of A-Z a-z 0-9 _ -)",
            )
        custom = custom or {}
        check_custom_size(custom, self._limits.max_participant_custom_bytes, "custom", problems)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)
        generated = create and not call_id
        if generated:
            call_id = new_call_id()
        cid = f"{call_type}:{call_id}"
        create_data: CallData | None = None
        if create:
            # The same rules (and the same call.created event) as GetOrCreateCall; the joining user is the
            # creator unless `data` names one. An empty id creates a call with a generated one.
            create_data = data or CallData()
            if not create_data.created_by_id:
                create_data.created_by_id = user_id
            self._calls.check_get_or_create(call_type, call_id, create_data, 0)
        psid = participant_session_id or uuid.uuid4().hex

        async def join_call(tx: Transaction) -> JoinResult:
            if generated and create_data is not None:
                # A generated id only ever creates: never joins somebody else's call.
                await self._calls.get_or_create_in(tx, call_type, call_id, create_data, 0, create_only=True)
            try:
                call = await open_call(tx, cid, now=self._clock(), check=False)
            except NotFound:
                if create_data is None:
                    raise
                # Created in the join's transaction: a join refused after it (backstage, full, no
                # permission) creates no call either.
                await self._calls.get_or_create_in(tx, call_type, call_id, create_data, 0)
                call = await open_call(tx, cid, now=self._clock(), check=False)
            # The joining user, their member role and overrides, read once: a user token joins as itself
            # (checked above), so its user record is the joiner's (a default one when the user does not
            # exist, as load_caller gives).
            joiner = await tx.sessions.joiner(cid, user_id)
            principal = current_principal()
            if call.caller is None and not principal.is_server:
                call.caller = Caller(principal, joiner.user if joiner else UserRecord(id=user_id))
            caller = await caller_of(tx, call)
            require_self(caller, user_id)
            capabilities = await joining_capabilities(tx, caller, call, user_id, joiner)
            now = call.now
            if joiner is None:
                raise NotFound(
                    f"user {user_id!r} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
                )
            # The running session with its live participants and this participant id (live or not).
            session: SessionRecord | None = None
            live: list[ParticipantRecord] = []
            existing: ParticipantRecord | None = None
            if call.record.current_session_id:
                session, live, existing = await tx.sessions.with_participants(
                    call.record.current_session_id, psid
                )
                if existing is not None:
                    if existing.user_id != user_id:
                        raise FailedPrecondition(
                            f"participant session id {psid!r} belongs to another user in call {cid!r}",
                            reason="PARTICIPANT_SESSION_ID_TAKEN",
                            metadata={"cid": cid, "participant_session_id": psid},
                        )
                    if existing.left_at is not None:
                        raise FailedPrecondition(
                            f"participant {psid!r} already left call {cid!r}; join with a new "
                            "participant_session_id",
                            reason="PARTICIPANT_LEFT",
                            metadata={
                                "cid": cid,
                                "participant_session_id": psid,
                                "left_reason": existing.left_reason,
                            },
                        )
                    # Idempotent re-join: the same participant (the one in `live`), its lease renewed, no
                    # events.
                    await self._renew_lease(tx, existing, now)
                    assert session is not None
                    return JoinResult(
                        call.view(), session, live, existing, call.record.last_seq, now, capabilities
                    )
            if call.ended and "join-ended-call" not in capabilities:
                raise _call_ended(cid)
            settings = call.settings
            if call.record.backstage and "join-backstage" not in capabilities:
                ahead = int(settings.get("backstage", {}).get("join_ahead_time_seconds") or 0)
                opens_at = _joinable_from(call.record.starts_at, ahead)
                if opens_at is None or now < opens_at:
                    metadata: dict[str, object] = {"cid": cid}
                    if opens_at is not None:
                        metadata["joinable_from"] = opens_at.isoformat()
                    raise FailedPrecondition(
                        f"call {cid!r} is in backstage; it can be joined once it goes live"
                        + (f" or from {opens_at.isoformat()}" if opens_at else ""),
                        reason="CALL_IN_BACKSTAGE",
                        metadata=metadata,
                    )
            maximum = int(settings.get("limits", {}).get("max_participants") or 0)
            if maximum and len(live) >= maximum:
                raise ResourceExhausted(
                    f"call {cid!r} is full ({maximum} participants)",
                    reason="CALL_FULL",
                    metadata={"cid": cid, "max_participants": maximum},
                )
            if session is None:
                session = SessionRecord(id=str(uuid.uuid4()), call_cid=cid, started_at=now)
                seconds = max_duration_seconds(settings)
                if seconds > 0:
                    session.timer_ends_at = now + timedelta(seconds=seconds)
                await tx.sessions.insert(session)
                if session.timer_ends_at is not None:
                    await tx.timers.schedule(
                        MAX_DURATION_TIMER, cid, session.timer_ends_at, payload={"session_id": session.id}
                    )
                call.session_started(session.id)
                call.record_event(SessionStarted(session))
            elif not live:
                # The running session was left empty: its inactivity timer stops (it exists only then).
                await tx.timers.cancel(INACTIVITY_TIMER, cid)
            participant = ParticipantRecord(
                session_id=session.id,
                participant_session_id=psid,
                call_cid=cid,
                user_id=user_id,
                role=joiner.member_role or joiner.user.role,
                custom=custom,
                custom_version=1,
                published_tracks=[],
                joined_at=now,
                lease_expires_at=now + self._lease_ttl,
            )
            # Inserted with its lease set; the lease timer goes in with it.
            await tx.sessions.insert_participant(participant)
            await self._schedule_lease(tx, participant)
            call.record_event(ParticipantJoined(participant))
            live = sorted([*live, participant], key=_join_order)
            seq = await record_counts(tx, call, session.id, live)
            return JoinResult(call.view(), session, live, participant, seq, now, capabilities)

        return await self._store.write(join_call)

    # -- LeaveCall / KeepAlive / UpdateParticipant ------------------------------------------------

    async def leave(
        self,
        call_type: str,
        call_id: str,
        participant_session_id: str,
        *,
        reason: str = LEFT,
        authorize: bool = True,
    ) -> None:
        """`authorize=False` for the server's own bookkeeping (a holding stream ended)."""
        self._key_problems(call_type, call_id, participant_session_id).raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def leave_call(tx: Transaction) -> None:
            call = await open_call(tx, cid, now=self._clock(), check=False)
            # The participant with the running session's live participants (one query), else the latest
            # participant with this id in an earlier session.
            live: list[ParticipantRecord] | None = None
            participant: ParticipantRecord | None = None
            if call.record.current_session_id:
                live, participant = await tx.sessions.live_and_one(
                    call.record.current_session_id, participant_session_id
                )
            if participant is None:
                live = None
                participant = await tx.sessions.find_participant(cid, participant_session_id)
            if participant is None:
                raise participant_not_found(cid, participant_session_id)
            if participant.left_at is not None:
                departed = await tx.sessions.find_participant(cid, participant_session_id)
                if authorize and departed is not None:
                    require_own_participant(await caller_of(tx, call), departed)
                return  # already left: leaving is idempotent
            if reason == DISCONNECTED and participant.held_by not in (None, self.replica_id):
                return  # the client reconnected to another replica, whose stream holds it now
            if authorize:
                require_own_participant(await caller_of(tx, call), participant)
            await self._leave(tx, call, participant, reason, live)

        await self._store.write(leave_call)

    async def keep_alive(
        self, call_type: str, call_id: str, participant_session_id: str, *, authorize: bool = True
    ) -> ParticipantRecord:
        self._key_problems(call_type, call_id, participant_session_id).raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def keep_participant(tx: Transaction) -> ParticipantRecord:
            call = await open_call(tx, cid, now=self._clock(), check=False)
            participant = await self._current_participant(tx, call.record, participant_session_id)
            if authorize:
                require_own_participant(await caller_of(tx, call), participant)
            await self._renew_lease(tx, participant, call.now)
            return participant

        return await self._store.write(keep_participant)

    async def update_participant(
        self, call_type: str, call_id: str, participant_session_id: str, published_tracks: list[int]
    ) -> tuple[ParticipantRecord, datetime]:
        problems = self._key_problems(call_type, call_id, participant_session_id)
        names: list[str] = []
        for index, value in enumerate(published_tracks):
            name = TRACK_NAMES.get(value)
            if name is None:
                problems.add(f"published_tracks[{index}]", f"{value} is not a track type")
            elif name not in names:
                names.append(name)
        problems.raise_if_any()
        # One canonical order (the enum's), so that reporting the same set twice is no change.
        names.sort(key=lambda name: list(TRACK_NAMES.values()).index(name))
        cid = f"{call_type}:{call_id}"

        async def update_tracks(tx: Transaction) -> tuple[ParticipantRecord, datetime]:
            call = await open_call(tx, cid, now=self._clock(), check=False)
            participant = await self._current_participant(tx, call.record, participant_session_id)
            caller = await caller_of(tx, call)
            require_own_participant(caller, participant)
            needed = dict.fromkeys(TRACK_CAPABILITIES[name] for name in names)
            await require(tx, caller, call.record, *needed, grants=call.grants)
            if participant.published_tracks != names:
                participant.published_tracks = names
                await tx.sessions.save_participant(participant)
                call.record_event(ParticipantUpdated(participant))
            return participant, call.now

        return await self._store.write(update_tracks)

    # -- queries -----------------------------------------------------------------------------------

    async def query_participants(self, call_type: str, call_id: str, page: PageRequest) -> ParticipantsPage:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def participants_page(tx: Transaction) -> ParticipantsPage:
            call = await live_call(tx, cid)
            await require(tx, await load_caller(tx), call, "read-call")
            now = self._clock()
            session_id = call.current_session_id or ""
            if not session_id:
                # Still validate the filter, sort and cursor so a bad query fails the same way always.
                found = await tx.sessions.query_live_participants("", page, self._store.signer)
                return ParticipantsPage(found, "", 0, {}, now)
            found = await tx.sessions.query_live_participants(session_id, page, self._store.signer)
            by_role = await tx.sessions.live_counts_by_role(session_id)
            return ParticipantsPage(found, session_id, sum(by_role.values()), by_role, now)

        return await self._store.read(participants_page)

    async def query_sessions(self, call_type: str, call_id: str, page: PageRequest) -> SessionsPage:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def sessions_page(tx: Transaction) -> SessionsPage:
            call = await live_call(tx, cid)
            await require(tx, await load_caller(tx), call, "read-call")
            found = await tx.sessions.query_sessions(cid, page, self._store.signer)
            people = await tx.sessions.participants([s.id for s in found.items])
            return SessionsPage(found, people, self._clock())

        return await self._store.read(sessions_page)

    # -- backstage ---------------------------------------------------------------------------------

    async def go_live(self, call_type: str, call_id: str) -> CallView:
        return await self._set_backstage(call_type, call_id, backstage=False)

    async def stop_live(self, call_type: str, call_id: str) -> CallView:
        return await self._set_backstage(call_type, call_id, backstage=True)

    async def _set_backstage(self, call_type: str, call_id: str, *, backstage: bool) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def set_backstage(tx: Transaction) -> CallView:
            call = await open_call(tx, cid, "update-call", now=self._clock())
            call.set_backstage(backstage)
            return call.view()

        return await self._store.write(set_backstage)

    # -- timers ------------------------------------------------------------------------------------

    async def _on_lease_expired(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        call = await tx.calls.open(timer.call_cid, now)
        if call is None:
            return
        session_id = str(timer.payload.get("session_id", ""))
        participant = await tx.sessions.get_participant(session_id, timer.key)
        if participant is None or participant.left_at is not None:
            return
        if participant.held_by not in (None, self.replica_id):
            return  # another replica's stream holds it: that replica's lease covers it
        if self._holds(participant):
            # A stream of this process holds the presence (its hold not written yet): written now.
            await self._hold(tx, [(call.cid, participant.participant_session_id)], now)
            return
        if participant.lease_expires_at is not None and participant.lease_expires_at > now:
            # Renewed meanwhile (renewals move the timer, so this is only a safety net).
            await tx.timers.schedule(
                LEASE_TIMER,
                call.cid,
                participant.lease_expires_at,
                key=timer.key,
                payload={"session_id": session_id},
            )
            return
        await self._leave(tx, call, participant, LEASE_EXPIRED)

    async def _on_replica_lease_expired(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        """A replica stopped renewing its lease (it died, or shut down and nobody reconnected): each
        participant it held gets a lease of its own that ran out when the replica's did, and its lease
        timer (due at once, fired in the participant's call's transaction) removes it unless a stream of
        another replica or a KeepAlive takes it over first."""
        if timer.key == self.replica_id and not self._closing:
            # This process is alive: it was only late renewing (a stall longer than the lease).
            await self._beat(tx, now)
            return
        released = await tx.sessions.release_held(timer.key, timer.due_at)
        await tx.timers.schedule_many(
            LEASE_TIMER,
            [
                (p.call_cid, p.participant_session_id, timer.due_at, {"session_id": p.session_id})
                for p in released
            ],
        )
        if released:
            log.info(
                "replica %s stopped renewing its lease; %d participants it held expire",
                timer.key,
                len(released),
            )
        self._timers.wake()

    async def _on_inactivity(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        call = await tx.calls.open(timer.call_cid, now)
        session_id = str(timer.payload.get("session_id", ""))
        if call is None or call.record.current_session_id != session_id:
            return
        session = await tx.sessions.get(session_id)
        if session is None or session.ended_at is not None:
            return
        if await tx.sessions.live_participants(session_id):
            return  # someone joined (a join cancels this timer; this is only a safety net)
        await end_session(tx, call, session, END_INACTIVITY, LEFT)

    async def _on_max_duration(self, tx: Transaction, timer: TimerRecord, now: datetime) -> None:
        call = await tx.calls.open(timer.call_cid, now)
        session_id = str(timer.payload.get("session_id", ""))
        if call is None or call.record.deleted_at is not None or call.record.current_session_id != session_id:
            return
        session = await tx.sessions.get(session_id)
        if session is None or session.ended_at is not None:
            return
        await end_session(tx, call, session, END_MAX_DURATION, MAX_DURATION)
        if not call.ended:
            call.end("max_duration")

    # -- presence (WatchCall streams) --------------------------------------------------------------

    async def holdable(self, tx: Transaction, cid: str, participant_session_id: str) -> ParticipantRecord:
        """The participant a WatchCall stream may hold: the caller's own, live (read in the stream's
        opening transaction)."""
        call_type, _, call_id = cid.partition(":")
        self._key_problems(call_type, call_id, participant_session_id).raise_if_any()
        participant = await self._current_participant(tx, await live_call(tx, cid), participant_session_id)
        require_own_participant(await load_caller(tx), participant)
        return participant

    async def stream_opened(self, participant: ParticipantRecord) -> None:
        """A WatchCall stream now holds this participant (checked by holdable) for this replica. The
        hold is written by the keeper a moment later, shared by the streams opened meanwhile, when the
        participant's own lease has more than half of its time left (a participant that has just joined);
        one closer to its end is held at once."""
        key = (participant.call_cid, participant.participant_session_id)
        self._held[key] = self._held.get(key, 0) + 1
        if self._keeper is None and not self._closing:
            # Started by the first stream that holds a participant, so inside that RPC: it gets a fresh
            # context with the server's authority, not the opening stream's caller.
            self._keeper = asyncio.create_task(
                self._keep_held(), name="presence-keeper", context=authority_context(SERVER)
            )
        expires = participant.lease_expires_at
        if participant.held_by == self.replica_id:
            return
        if expires is None or expires - self._clock() < self._lease_ttl / 2:
            await self._store.write(lambda tx: self._hold(tx, [key], self._clock()))
        else:
            self._opened.add(key)
            self._hold_soon.set()

    async def stream_closed(self, call_type: str, call_id: str, participant_session_id: str) -> None:
        """The holding stream ended: the participant leaves ("disconnected"), unless another stream of
        this process still holds it or the server is shutting down (then the replica's lease decides, so
        that a client reconnecting to another replica keeps its place)."""
        key = (f"{call_type}:{call_id}", participant_session_id)
        remaining = self._held.get(key, 0) - 1
        if remaining > 0:
            self._held[key] = remaining
            return
        self._held.pop(key, None)
        self._opened.discard(key)
        if self._closing:
            return
        try:
            await self.leave(call_type, call_id, participant_session_id, reason=DISCONNECTED, authorize=False)
        except CallplaneError:
            pass  # the call or participant is gone already
        except Exception:
            log.exception("could not record that %s left %s:%s", participant_session_id, call_type, call_id)

    async def _hold(self, tx: Transaction, held: list[tuple[str, str]], now: datetime) -> None:
        """Writes this replica's hold on `held`, with its lease renewed (so it covers them from now)."""
        await self._beat(tx, now)
        await tx.sessions.take_hold(held, self.replica_id)

    async def _beat(self, tx: Transaction, now: datetime) -> None:
        """Renews this replica's lease: one statement, whatever the number of participants it holds."""
        await tx.timers.schedule(REPLICA_TIMER, "", now + self._lease_ttl, key=self.replica_id)

    async def _keep_held(self) -> None:
        """Renews this replica's lease every ttl/3 and writes the holds of the streams opened since the
        last write, together, a moment after they open: O(1) statements per tick."""
        loop = asyncio.get_running_loop()
        interval = max(self._lease_ttl.total_seconds() / 3, 0.05)
        next_beat = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hold_soon.wait(), max(next_beat - loop.time(), 0))
            if self._hold_soon.is_set():
                await asyncio.sleep(_GATHER_OPENINGS)  # streams opening in a burst share one write
            self._hold_soon.clear()
            opened = [key for key in self._opened if key in self._held]
            self._opened.clear()
            beat = loop.time() >= next_beat
            if not opened and not beat:
                continue
            if beat:
                next_beat = loop.time() + interval
            try:
                await self._store.write(partial(self._keep, opened=opened, beat=beat), upkeep=True)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The holds are retried with the next write; meanwhile their own leases still run.
                log.exception("could not renew the replica lease or hold %d participants", len(opened))
                self._opened.update(opened)
                next_beat = loop.time() + min(interval, 1.0)

    async def _keep(self, tx: Transaction, *, opened: list[tuple[str, str]], beat: bool) -> None:
        now = self._clock()
        if opened:
            await self._hold(tx, opened, now)
        elif beat:
            await self._beat(tx, now)

    async def close(self) -> None:
        """Server shutdown: stop renewing; open streams end without leaving (the replica's lease decides:
        clients that reconnect elsewhere within it keep their place)."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
