"""Runs durable timers exactly once: each fires in the transaction that deletes its row, so a crash
before commit leaves it pending (it fires after the restart) and a commit leaves nothing to fire twice.
Tests drive it with an injected clock and `run_due()`, never with sleeps."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from callplane_server.auth.context import acting_as, authority_context
from callplane_server.auth.tokens import SERVER
from callplane_server.distribution import Distribution
from callplane_server.domain.records import TimerRecord
from callplane_server.services.clock import Clock
from callplane_server.store import Store, Transaction

log = logging.getLogger(__name__)

#: Applies a fired timer's effect inside the transaction that deletes it. `now` is the firing time.
TimerHandler = Callable[[Transaction, TimerRecord, datetime], Awaitable[None]]


#: Seconds past due a timer fired (the poll interval, 0.5 s, is the usual lateness).
LATENESS_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class TimerRunner:
    def __init__(self, store: Store, clock: Clock, *, poll_interval: float = 0.5, batch: int = 100) -> None:
        self._store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._batch = batch
        self._handlers: dict[str, TimerHandler] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        #: How late timers fired (seconds past due, by the clock), and how many fired, by kind.
        self.lateness = Distribution(LATENESS_BOUNDS)
        self.fired: collections.Counter[str] = collections.Counter()

    def register(self, kind: str, handler: TimerHandler) -> None:
        self._handlers[kind] = handler

    def start(self) -> None:
        # The server's own work, whoever happens to start the runner.
        self._task = asyncio.create_task(self._run(), name="timers", context=authority_context(SERVER))

    def wake(self) -> None:
        self._wakeup.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
            self._wakeup.clear()
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer run failed; retrying")

    async def run_due(self) -> int:
        """Fires every timer due by the clock now; returns how many fired."""
        fired = 0
        while True:
            now = self._clock()

            async def due_by(tx: Transaction, now: datetime = now) -> list[TimerRecord]:
                return await tx.timers.due(now, self._batch)

            due = await self._store.read(due_by)
            if not due:
                return fired
            for timer in due:
                if await self._fire(timer, now):
                    fired += 1
                    self.fired[timer.kind] += 1
                    self.lateness.observe(max((now - timer.due_at).total_seconds(), 0.0))
            if len(due) < self._batch:
                return fired

    async def _fire(self, timer: TimerRecord, now: datetime) -> bool:
        handler = self._handlers.get(timer.kind)
        if handler is None:
            log.error("no handler for timer kind %r; leaving it pending", timer.kind)
            return False

        async def work(tx: Transaction) -> bool:
            # Lock order as every writer of a call: the call row first, then the timer row (a timer of no
            # call, such as a replica's lease, has none).
            if timer.call_cid:
                await tx.calls.open(timer.call_cid, now)
            claimed = await tx.timers.claim(timer.id, now)
            if claimed is None:
                return False
            # Ring timeouts, lease expiry, session ends: nobody's request, so the server's authority (also
            # when a test or tool calls run_due() directly).
            with acting_as(SERVER):
                await handler(tx, claimed, now)
            return True

        try:
            return await self._store.write(work)
        except Exception:
            log.exception("timer %s %s/%s failed; it stays pending", timer.kind, timer.call_cid, timer.key)
            return False
