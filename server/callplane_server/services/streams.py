"""Watch streams with etcd-style guarantees: ordered, unique, reliable, resumable, snapshot-then-changes,
with progress on idle streams that ask for it (etcd's progress_notify). Each stream first catches up from
the log, then follows its bounded queue; any doubt (overflow, a gap) sends it back to the log. An idle
stream that asked for no progress costs no timer and sends nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

from callplane_server.auth.context import current_principal
from callplane_server.domain.call_types import merge_settings
from callplane_server.domain.records import CallView, ParticipantRecord, SessionRecord
from callplane_server.domain.validation import USER_ID, check_call_key, check_pattern
from callplane_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
    ViolationCollector,
)
from callplane_server.events.hub import (
    CLOSED,
    OVERFLOW,
    EventHub,
    Recipients,
    RecipientsNeeded,
    Subscription,
    Withheld,
)
from callplane_server.services.authz import Caller, load_caller, require, require_admin, require_self
from callplane_server.services.call_lookup import call_not_found, live_call
from callplane_server.services.clock import Clock
from callplane_server.store import Store, Transaction
from callplane_server.store.events import StoredEvent

# A catching-up stream holds at most one batch while its client is slow to read: bounded in count and
# bytes, so one slow reader of large events cannot hold much memory.
CATCH_UP_BATCH = 200
#: SubscribeEvents.call_cids at most for a (non-admin) user token.
MAX_SUBSCRIBED_CALLS = 100
CATCH_UP_BYTES = 256 * 1024
SNAPSHOT_MEMBERS = 100


@dataclass
class Snapshot:
    seq: int
    view: CallView
    session: SessionRecord | None
    participants: list[ParticipantRecord]
    pins: list[dict[str, object]]
    at: datetime


@dataclass
class ProgressMark:
    seq: int
    at: datetime


class Live:
    """Stream item: the stream is set up and caught up but has nothing to send yet (a resumed stream with
    no new events). The servicer sends the response headers, so the client knows the stream started
    without waiting for a message that may be long in coming."""


LIVE = Live()


def progress_every(requested: timedelta | None, minimum: float) -> float | None:
    """Seconds between progress messages on an idle stream that asked for `requested` (None or zero: it
    did not ask, and gets none); a request below the server's `minimum` is raised to it, so no client
    can make the server send faster than that."""
    if requested is None or requested <= timedelta(0):
        return None
    return max(requested.total_seconds(), minimum)


def _check_progress_interval(requested: timedelta | None, problems: ViolationCollector) -> None:
    if requested is not None and requested < timedelta(0):
        problems.add("progress_interval", f"must not be negative, got {requested.total_seconds()} s")


@dataclass(frozen=True)
class EventFilter:
    call_types: Sequence[str] = ()
    call_cids: Sequence[str] = ()
    event_types: Sequence[str] = ()

    def matches(self, stored: StoredEvent) -> bool:
        return (
            (not self.call_types or stored.call_type in self.call_types)
            and (not self.call_cids or stored.call_cid in self.call_cids)
            and (not self.event_types or stored.type in self.event_types)
        )


@dataclass(frozen=True)
class Audience:
    """Whom a stream is for. An addressed custom event reaches only its recipients, on every stream and
    replay; its sender gets it only by addressing itself. Server tokens and global admins (who may read
    the firehose anyway) see every event."""

    user_id: str | None = None  # None: sees everything

    @classmethod
    def of(cls, caller: Caller) -> Audience:
        return EVERYONE if caller.is_admin else cls(caller.user_id)

    @property
    def recipients_needed(self) -> RecipientsNeeded:
        return RecipientsNeeded.NONE if self.user_id is None else RecipientsNeeded.ADDRESSED

    def sees(self, stored: StoredEvent, recipients: Recipients) -> bool:
        return (
            self.user_id is None
            or not stored.addressed
            or any(user_id == self.user_id for user_id, _ in recipients)
        )

    async def screen(self, tx: Transaction, events: list[StoredEvent]) -> list[StoredEvent | Withheld]:
        """Events read from the log, with those this audience may not see withheld."""
        if self.user_id is None:
            return list(events)
        addressed = [stored.position for stored in events if stored.addressed]
        recipients = await tx.events.recipients_of(addressed) if addressed else {}
        return [
            stored if self.sees(stored, recipients.get(stored.position, [])) else Withheld.of(stored)
            for stored in events
        ]


EVERYONE = Audience()


class Presence(Protocol):
    """Implemented by the session service: a WatchCall stream can hold a participant's presence."""

    async def holdable(self, tx: Transaction, cid: str, participant_session_id: str) -> ParticipantRecord:
        """The caller's own live participant in the call, which a stream may hold (read in the stream's
        opening transaction), or the error that refuses the stream."""
        ...

    async def stream_opened(self, participant: ParticipantRecord) -> None: ...

    async def stream_closed(self, call_type: str, call_id: str, participant_session_id: str) -> None: ...


StreamItem = Snapshot | StoredEvent | ProgressMark | Live


@dataclass
class _Follow:
    """How one kind of stream reads the log and numbers its events."""

    read_after: Callable[[int], Awaitable[Sequence[StoredEvent | Withheld]]]
    key: Callable[[StoredEvent | Withheld], int]
    # Per-call and per-user numbers are contiguous, so a jump means something was missed.
    contiguous: bool
    progress: Callable[[int], int] = field(default=lambda cursor: cursor)


class EventStreamService:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        clock: Clock,
        *,
        min_progress_interval: float = 1.0,
        presence: Presence | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._clock = clock
        # The shortest progress interval a stream may ask for (shorter requests are raised to it).
        self._min_progress_interval = min_progress_interval
        self.presence = presence

    # -- WatchCall ---------------------------------------------------------------------------------

    async def watch_call(
        self,
        call_type: str,
        call_id: str,
        *,
        snapshot: bool,
        after_seq: int | None,
        participant_session_id: str = "",
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[StreamItem]:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        if snapshot and after_seq is not None:
            problems.add("after_seq", "give snapshot or after_seq, not both")
        _check_progress_interval(progress_interval, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"
        audience = EVERYONE
        if not current_principal().is_server:
            # Checked once, when the stream starts (holding presence also needs the caller's own
            # participant: SessionService.keep_alive checks that).
            audience = await self._store.read(lambda tx: self._require_readable(tx, [cid]))

        def matcher(stored: StoredEvent, recipients: Recipients) -> StoredEvent | Withheld | None:
            if stored.call_cid != cid:
                return None
            return stored if audience.sees(stored, recipients) else Withheld.of(stored)

        # Subscribe before reading anything, so nothing committed after the read can be missed.
        subscription = self._hub.subscribe(matcher, recipients=audience.recipients_needed, call_cid=cid)
        holds_presence = False
        try:
            # The resume point and the participant to hold are checked (in one read) before presence
            # is taken: a stream refused at its start (OUT_OF_RANGE, EVENTS_COMPACTED, not one's own
            # participant) must change nothing, and ending a stream that held presence records the
            # participant's leave.
            presence = self.presence if participant_session_id else None

            async def opening(tx: Transaction) -> tuple[int, ParticipantRecord | None]:
                cursor = 0 if snapshot else await self._call_resume_point(tx, cid, after_seq)
                held = await presence.holdable(tx, cid, participant_session_id) if presence else None
                return cursor, held

            cursor, held = await self._store.read(opening)
            # Presence is taken before the first message, so a client that leaves right after it
            # still leaves through this stream's end rather than waiting for its lease.
            if presence is not None and held is not None:
                await presence.stream_opened(held)
                holds_presence = True
            if snapshot:
                state = await self._store.read(lambda tx: self._snapshot(tx, cid))
                cursor = state.seq
                yield state

            async def read(position: int, tx: Transaction) -> list[StoredEvent | Withheld]:
                events = await tx.events.call_events_after(
                    cid, position, CATCH_UP_BATCH, max_bytes=CATCH_UP_BYTES
                )
                return await audience.screen(tx, events)

            async def read_after(position: int) -> list[StoredEvent | Withheld]:
                return await self._store.read(partial(read, position))

            follow = _Follow(read_after=read_after, key=lambda stored: stored.seq, contiguous=True)
            async for item in self._follow(
                subscription,
                cursor,
                follow,
                started=snapshot,
                resumed=after_seq is not None,
                progress_every=progress_every(progress_interval, self._min_progress_interval),
            ):
                yield item
        finally:
            self._hub.unsubscribe(subscription)
            if holds_presence and self.presence is not None:
                # Shielded: the client is gone (cancellation), but the leave must still be recorded.
                await asyncio.shield(self.presence.stream_closed(call_type, call_id, participant_session_id))

    @staticmethod
    async def _require_readable(tx: Transaction, cids: Sequence[str]) -> Audience:
        """Checks read-call on each call; returns whom the stream is for."""
        caller = await load_caller(tx)
        for cid in cids:
            await require(tx, caller, await live_call(tx, cid), "read-call")
        return Audience.of(caller)

    async def _call_resume_point(self, tx: Transaction, cid: str, after_seq: int | None) -> int:
        bounds = await tx.events.call_seq_bounds(cid)
        if bounds is None:
            raise call_not_found(cid)
        earliest, last = bounds
        return _check_resume(after_seq, earliest, last, "after_seq", {"cid": cid})

    async def _snapshot(self, tx: Transaction, cid: str) -> Snapshot:
        call = await live_call(tx, cid, for_share=True)
        call_type = await tx.call_types.get(call.type)
        members = (await tx.members.first([cid], SNAPSHOT_MEMBERS))[cid]
        view = CallView(
            call, merge_settings(call_type.settings if call_type else {}, call.settings_override), members
        )
        session = await tx.sessions.get(call.current_session_id) if call.current_session_id else None
        participants = await tx.sessions.live_participants(session.id) if session else []
        return Snapshot(call.last_seq, view, session, participants, list(call.pins), self._clock())

    # -- WatchUser ---------------------------------------------------------------------------------

    async def watch_user(
        self, user_id: str, *, after_seq: int | None, progress_interval: timedelta | None = None
    ) -> AsyncIterator[StreamItem]:
        problems = ViolationCollector()
        check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        _check_progress_interval(progress_interval, problems)
        problems.raise_if_any()
        require_self(Caller(current_principal(), None), user_id)

        def matcher(stored: StoredEvent, recipients: Recipients) -> StoredEvent | None:
            for recipient, user_seq in recipients:
                if recipient == user_id:
                    copy = type(stored.event)()
                    copy.CopyFrom(stored.event)
                    copy.user_seq = user_seq
                    return StoredEvent(
                        stored.position, stored.call_cid, stored.call_type, user_seq, stored.type, copy
                    )
            return None

        subscription = self._hub.subscribe(matcher, recipients=RecipientsNeeded.ALL, user_id=user_id)
        try:

            async def resume(tx: Transaction) -> int:
                if not await tx.users.existing_ids([user_id]):
                    raise NotFound(
                        f"user {user_id!r} does not exist",
                        reason="USER_NOT_FOUND",
                        metadata={"user_id": user_id},
                    )
                earliest, last = await tx.events.user_seq_bounds(user_id)
                return _check_resume(after_seq, earliest, last, "after_seq", {"user_id": user_id})

            cursor = await self._store.read(resume)

            async def read_after(position: int) -> list[StoredEvent]:
                events = await self._store.read(
                    lambda tx: tx.events.user_events_after(
                        user_id, position, CATCH_UP_BATCH, max_bytes=CATCH_UP_BYTES
                    )
                )
                return [
                    StoredEvent(
                        e.position, e.call_cid, e.call_type, e.event.user_seq, e.type, e.event, e.size
                    )
                    for e in events
                ]

            # For user streams, StoredEvent.seq carries the user_seq (see matcher and read_after).
            follow = _Follow(read_after=read_after, key=lambda stored: stored.seq, contiguous=True)
            async for item in self._follow(
                subscription,
                cursor,
                follow,
                resumed=after_seq is not None,
                progress_every=progress_every(progress_interval, self._min_progress_interval),
            ):
                yield item
        finally:
            self._hub.unsubscribe(subscription)

    # -- SubscribeEvents ---------------------------------------------------------------------------

    async def subscribe(
        self,
        filters: EventFilter,
        *,
        after_position: int | None,
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[StreamItem]:
        problems = ViolationCollector()
        _check_progress_interval(progress_interval, problems)
        problems.raise_if_any()
        audience = EVERYONE
        if not current_principal().is_server:
            audience = await self._store.read(lambda tx: self._authorize_subscription(tx, filters))

        def matcher(stored: StoredEvent, recipients: Recipients) -> StoredEvent | None:
            # Positions are not contiguous here: what this audience may not see is simply left out.
            return stored if filters.matches(stored) and audience.sees(stored, recipients) else None

        subscription = self._hub.subscribe(matcher, recipients=audience.recipients_needed)
        try:

            async def resume(tx: Transaction) -> int:
                earliest, last = await tx.events.position_bounds()
                return _check_resume(after_position, earliest, last, "after_position", {})

            cursor = await self._store.read(resume)

            async def read(position: int, tx: Transaction) -> list[StoredEvent | Withheld]:
                events = await tx.events.events_after_position(
                    position,
                    CATCH_UP_BATCH,
                    call_types=filters.call_types,
                    call_cids=filters.call_cids,
                    event_types=filters.event_types,
                    max_bytes=CATCH_UP_BYTES,
                )
                return await audience.screen(tx, events)

            async def read_after(position: int) -> list[StoredEvent | Withheld]:
                return await self._store.read(partial(read, position))

            # Filtered positions are not contiguous; progress reports how far the log was scanned.
            follow = _Follow(
                read_after=read_after,
                key=lambda stored: stored.position,
                contiguous=False,
                progress=lambda cursor: max(cursor, self._hub.last_position),
            )
            async for item in self._follow(
                subscription,
                cursor,
                follow,
                resumed=after_position is not None,
                progress_every=progress_every(progress_interval, self._min_progress_interval),
            ):
                yield item
        finally:
            self._hub.unsubscribe(subscription)

    async def _authorize_subscription(self, tx: Transaction, filters: EventFilter) -> Audience:
        """Admins see every event; other user tokens name their calls (call_cids), each readable."""
        caller = await load_caller(tx)
        if caller.is_admin:
            return EVERYONE
        if not filters.call_cids:
            require_admin(caller, "SubscribeEvents without call_cids")
        cids = list(dict.fromkeys(filters.call_cids))
        if len(cids) > MAX_SUBSCRIBED_CALLS:
            raise InvalidArgument.for_field(
                "call_cids", f"at most {MAX_SUBSCRIBED_CALLS} calls per user subscription, got {len(cids)}"
            )
        problems = ViolationCollector()
        for index, cid in enumerate(cids):
            call_type, separator, call_id = cid.partition(":")
            probe = ViolationCollector()
            check_call_key(call_type, call_id, probe)
            if not separator or probe.violations:
                problems.add(f"call_cids[{index}]", f"{cid!r} is not a call cid (type:id)")
        problems.raise_if_any()
        return await self._require_readable(tx, cids)

    # -- the one follow loop -----------------------------------------------------------------------

    async def _follow(
        self,
        subscription: Subscription,
        cursor: int,
        follow: _Follow,
        *,
        resumed: bool,
        started: bool = False,
        progress_every: float | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Catches up from the log, then follows the subscription. `resumed`: the cursor is the client's
        resume point, so the log after it is read first (a stream from now or from a snapshot has nothing
        to read: the subscription came before the read that set its cursor, so every later event is in
        its queue); `started`: the client already got a message (a snapshot); a stream neither resumed
        nor started starts from now, and says where that is; `progress_every`: seconds of quiet after
        which a progress message is sent (None: never)."""
        catching_up = resumed
        if not resumed and not started:
            # A stream that starts "from now" tells the client where that is at once, so a connection
            # lost before the first event can still resume exactly (and the client knows it is live).
            yield ProgressMark(follow.progress(cursor), self._clock())
            started = True
        while True:
            subscription.catching_up = catching_up
            if catching_up:
                # Reset first: anything dispatched from now on is queued, and duplicates of what the
                # log read returns are skipped by the cursor below.
                subscription.overflowed = False
                batch = await follow.read_after(cursor)
                for stored in batch:
                    if not isinstance(stored, Withheld):
                        yield stored
                        started = True
                    cursor = follow.key(stored)
                if len(batch) == CATCH_UP_BATCH or sum(stored.size for stored in batch) >= CATCH_UP_BYTES:
                    continue  # maybe more in the log
                catching_up = subscription.catching_up = False
            if not started:
                # About to wait with nothing sent yet: let the client know the stream is up.
                yield LIVE
                started = True
            item = await subscription.next(progress_every)
            if item is None:
                yield ProgressMark(follow.progress(cursor), self._clock())
                continue
            if item is CLOSED:
                raise Unavailable(
                    "the server is shutting down; reconnect and resume after the last seq you received",
                    reason="SHUTTING_DOWN",
                    metadata={"resume_after": cursor},
                )
            if item is OVERFLOW:
                catching_up = True
                continue
            assert isinstance(item, StoredEvent | Withheld)
            key = follow.key(item)
            if key <= cursor:
                continue
            if follow.contiguous and key != cursor + 1:
                catching_up = True
                continue
            if not isinstance(item, Withheld):
                yield item
            cursor = key


def _check_resume(
    after: int | None, earliest: int, last: int, field: str, metadata: dict[str, object]
) -> int:
    if after is None:
        return last
    if after > last:
        raise OutOfRange(
            f"{field} {after} is in the future; the latest is {last}",
            reason="RESUME_POINT_IN_FUTURE",
            metadata={**metadata, field: after, "last": last},
        )
    if after + 1 < earliest:
        raise FailedPrecondition(
            f"events after {after} are no longer retained; the earliest retained is {earliest}",
            reason="EVENTS_COMPACTED",
            metadata={**metadata, field: after, "earliest_seq": earliest},
        )
    return after
