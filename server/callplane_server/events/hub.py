"""Tails the event log and fans events out to subscribers through bounded queues.

The log is the truth; the queues are only a fast path. A subscriber whose queue fills is marked
overflowed (its queue is emptied, so memory stays bounded) and catches up from the log, so a slow reader
never blocks the tailer, writers or other subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import partial

from callplane_server.auth.context import authority_context
from callplane_server.store import Store, Transaction
from callplane_server.store.events import NOTIFY_CHANNEL, StoredEvent, Written

log = logging.getLogger(__name__)

#: Recipients of one event: [(user_id, user_seq)].
Recipients = list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Withheld:
    """Stands for an event its subscriber may not see (an addressed event, to others): it moves the
    subscriber's cursor past the event, so its seqs stay contiguous, and is never sent."""

    position: int
    seq: int
    size: int = 0

    @classmethod
    def of(cls, stored: StoredEvent) -> Withheld:
        return cls(stored.position, stored.seq, stored.size)


#: Returns what to deliver to this subscriber for an event (None: not for it).
Matcher = Callable[[StoredEvent, Recipients], StoredEvent | Withheld | None]


class RecipientsNeeded(IntEnum):
    """Which events' recipients a subscriber's matcher is given (the tailer reads no more than needed)."""

    NONE = 0
    ADDRESSED = 1  # of addressed events only (who may see them)
    ALL = 2  # of every event (WatchUser)


class Overflow:
    """Queue marker: events were dropped; read them from the log."""


class Closed:
    """Queue marker: the server is shutting down."""


OVERFLOW = Overflow()
CLOSED = Closed()


class Subscription:
    """One subscriber's bounded queue. A plain deque and, only while the stream waits, one future (and a
    timer only for a stream that asked for progress): no asyncio.Queue and no task per wait, because a
    server holds many thousands of these mostly idle, and waking one is on the path of every delivered
    event."""

    __slots__ = (
        "_items",
        "_waiter",
        "catching_up",
        "closed",
        "index_key",
        "matcher",
        "maxsize",
        "overflowed",
        "recipients",
    )

    def __init__(
        self, matcher: Matcher, maxsize: int, recipients: RecipientsNeeded = RecipientsNeeded.NONE
    ) -> None:
        self.matcher = matcher
        self.maxsize = maxsize
        self.recipients = recipients
        self.overflowed = False
        self.closed = False
        # Its stream reads the log instead of the queue (it started behind, or fell behind).
        self.catching_up = False
        # What the hub indexes it by: (call cid, user id); (None, None) for the firehose.
        self.index_key: tuple[str | None, str | None] = (None, None)
        self._items: deque[StoredEvent | Withheld | Overflow | Closed] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def offer(self, item: StoredEvent | Withheld) -> None:
        if self.overflowed or self.closed:
            return
        if len(self._items) >= self.maxsize:
            self.overflowed = True
            self._replace_contents(OVERFLOW)
        else:
            self._items.append(item)
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._replace_contents(CLOSED)

    async def next(
        self, idle_seconds: float | None = None
    ) -> StoredEvent | Withheld | Overflow | Closed | None:
        """The next item, or None when nothing came within `idle_seconds` (None: no time limit, and no
        timer: the wait ends only when an item comes)."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if idle_seconds is None else loop.call_later(idle_seconds, _resolve, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
        return self._items.popleft() if self._items else None

    def _replace_contents(self, marker: Overflow | Closed) -> None:
        self._items.clear()
        self._items.append(marker)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventHub:
    def __init__(
        self, store: Store, *, poll_interval: float = 0.25, queue_size: int = 256, batch_size: int = 500
    ) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._subscriptions: set[Subscription] = set()
        # The same subscriptions indexed by what they follow, so an event is offered only to those that
        # may want it: watchers of its call, inboxes of its recipients, and the firehose subscriptions.
        self._by_call: dict[str, set[Subscription]] = {}
        self._by_user: dict[str, set[Subscription]] = {}
        self._firehose: set[Subscription] = set()
        self._doorbell = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_listening: Callable[[], Awaitable[None]] | None = None
        self.last_position = 0
        self.closed = False
        # Called with the new last position whenever the tailer moves past committed events (webhook
        # workers' doorbell: they read the log themselves).
        self.position_listeners: list[Callable[[int], None]] = []

    async def start(self) -> None:
        _, self.last_position = await self._store.read(lambda tx: tx.events.position_bounds())
        self._store.commit_listeners.append(self._ring)
        self._store.event_listeners.append(self._committed)
        # Commits by other processes (PostgreSQL replicas) ring through LISTEN/NOTIFY; polling backs it up.
        self._stop_listening = await self._store.database.listen(NOTIFY_CHANNEL, self._notified)
        # No authority at all: the tailer decides nothing for anyone. Each subscription's matcher is bound
        # to its own subscriber when the stream subscribes; a matcher that asked "who is acting?" here
        # is refused (NO_PRINCIPAL) rather than answered "the server", which would see every event.
        self._task = asyncio.create_task(self._run(), name="event-tailer", context=authority_context(None))

    def _ring(self, _position: int) -> None:
        self._doorbell.set()

    def _notified(self, payload: str) -> None:
        """A NOTIFY (its payload: the last position of a commit). This process's own commits need no
        read: dispatched already, or about to be handed over by the commit that wrote them."""
        if payload.isdigit():
            position = int(payload)
            if position <= self.last_position or position in self._store.committing:
                return
        self._doorbell.set()

    def _committed(self, written: Written) -> None:
        """Events this process just committed: dispatched at once when they follow the last dispatched
        position (no reading them back); otherwise (a poll in between) the tailer reads them."""
        if self.closed or not written.events or written.events[0].position != self.last_position + 1:
            self._doorbell.set()
            return
        self._dispatch(written.events, written.recipients)

    def _dispatch(self, batch: list[StoredEvent], recipients: dict[int, Recipients]) -> None:
        for stored in batch:
            if stored.position <= self.last_position:
                continue  # delivered already (committed here, and read back by a poll that raced it)
            addressed = recipients.get(stored.position, [])
            for subscription in self._interested(stored, addressed):
                item = subscription.matcher(stored, addressed)
                if item is not None:
                    subscription.offer(item)
            self.last_position = stored.position
        if batch:
            self._moved()

    def _moved(self) -> None:
        for listener in self.position_listeners:
            listener(self.last_position)

    def _interested(self, stored: StoredEvent, addressed: Recipients) -> list[Subscription]:
        interested = [*self._by_call.get(stored.call_cid, ()), *self._firehose]
        for user_id, _user_seq in addressed:
            interested.extend(self._by_user.get(user_id, ()))
        return interested

    def ring(self) -> None:
        """Wake the tailer now (e.g. on a notification from another process)."""
        self._doorbell.set()

    async def close(self) -> None:
        self.closed = True
        if self._ring in self._store.commit_listeners:
            self._store.commit_listeners.remove(self._ring)
        if self._committed in self._store.event_listeners:
            self._store.event_listeners.remove(self._committed)
        for subscription in list(self._subscriptions):
            subscription.close()
        if self._stop_listening is not None:
            await self._stop_listening()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def subscribe(
        self,
        matcher: Matcher,
        *,
        recipients: RecipientsNeeded = RecipientsNeeded.NONE,
        call_cid: str | None = None,
        user_id: str | None = None,
    ) -> Subscription:
        """`matcher` sees the events of `call_cid` only, or those addressed to `user_id` only (with their
        recipients), or, with neither, every event (the firehose)."""
        subscription = Subscription(matcher, self._queue_size, recipients)
        if self.closed:
            subscription.close()
        self._subscriptions.add(subscription)
        subscription.index_key = (call_cid, user_id)
        self._index(call_cid, user_id).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        call_cid, user_id = subscription.index_key
        self._index(call_cid, user_id).discard(subscription)
        # Emptied per-call and per-user sets go, so the index does not keep every call ever watched.
        if call_cid is not None and not self._by_call.get(call_cid):
            self._by_call.pop(call_cid, None)
        if user_id is not None and not self._by_user.get(user_id):
            self._by_user.pop(user_id, None)

    def _index(self, call_cid: str | None, user_id: str | None) -> set[Subscription]:
        if call_cid is not None:
            return self._by_call.setdefault(call_cid, set())
        if user_id is not None:
            return self._by_user.setdefault(user_id, set())
        return self._firehose

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscriber_counts(self) -> dict[str, int]:
        """Subscriptions by what they follow: `call`, `user`, `firehose`."""
        return {
            "call": sum(map(len, self._by_call.values())),
            "user": sum(map(len, self._by_user.values())),
            "firehose": len(self._firehose),
        }

    def lagging_count(self) -> int:
        """Subscribers behind the tailer: catching up from the log, or dropped from their queue and
        not back yet (a reader too slow for the fast path)."""
        return sum(1 for s in list(self._subscriptions) if s.catching_up or s.overflowed)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._doorbell.wait(), self._poll_interval)
            self._doorbell.clear()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep tailing; subscribers fall back on the log anyway
                log.exception("event tailer failed; retrying")
                await asyncio.sleep(self._poll_interval)

    async def _read_batch(
        self, after: int, needed: RecipientsNeeded, tx: Transaction
    ) -> tuple[list[StoredEvent], dict[int, Recipients]]:
        batch = await tx.events.events_after_position(after, self._batch_size)
        if needed is RecipientsNeeded.ALL:
            recipients = await tx.events.recipients_of([e.position for e in batch])
        elif needed is RecipientsNeeded.ADDRESSED:
            recipients = await tx.events.recipients_of([e.position for e in batch if e.addressed])
        else:
            recipients = {}
        return batch, recipients

    async def _skip_unheard(self) -> bool:
        """With nobody subscribed nothing is read or decoded: the tailer moves to the last position
        handed out (positions commit in order, so everything up to it is in the log, where a stream
        that subscribes later catches up from). False when a subscription arrived meanwhile."""
        last = await self._store.read(lambda tx: tx.events.last_position())
        if self._subscriptions:
            return False
        if last > self.last_position:
            self.last_position = last
            self._moved()
        return True

    async def poll(self) -> int:
        """Dispatches every event committed since the last poll; returns how many."""
        dispatched = 0
        while True:
            if not self._subscriptions and await self._skip_unheard():
                return dispatched
            after = self.last_position
            needed = max((s.recipients for s in self._subscriptions), default=RecipientsNeeded.NONE)
            batch, recipients = await self._store.read(partial(self._read_batch, after, needed))
            self._dispatch(batch, recipients)
            dispatched += len(batch)
            if len(batch) < self._batch_size:
                return dispatched
