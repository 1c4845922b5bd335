"""Delivers the event log to webhook endpoints: one worker per endpoint this replica holds a lease on.

A worker reads the log after its endpoint's cursor into a bounded window, keeps one queue per call and
sends the head of each queue (events of one call in order, of different calls in parallel up to the
endpoint's concurrency). Results are recorded in batches, with the cursor moved to just before the
oldest event not yet delivered, in one transaction fenced by the lease and the endpoint's epoch: a
replica that died or lost its lease repeats at most the attempts it had not recorded."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from urllib.parse import urlsplit

import aiohttp
from google.protobuf import json_format

from callplane_server.domain.webhooks import (
    DeliveryRecord,
    DeliveryStatus,
    EventFilter,
    WebhookRecord,
    message_id,
    retry_delay,
)
from callplane_server.events.hub import EventHub
from callplane_server.services.clock import Clock
from callplane_server.store import Store, Transaction
from callplane_server.store.events import StoredEvent
from callplane_server.store.webhooks import Lease, Progress
from callplane_server.webhooks.signing import SecretBox, Signer
from callplane_server.webhooks.targets import is_public, literal_address, resolver

log = logging.getLogger(__name__)

USER_AGENT = "Callplane-Webhooks/1"
#: Bytes of an answer's body kept in the delivery log's `last_error`.
ERROR_BODY_BYTES = 200
#: A worker with nothing due looks at the log at least this often (its doorbell may have been missed).
IDLE_CHECK_SECONDS = 1.0
#: Lease rounds of an SQLite database's only process (changes ring it at once; this is a backstop).
SOLE_WRITER_ROUND_SECONDS = 60.0
#: Events read from the log per statement.
READ_BATCH = 500
#: A cursor that moved past filtered-out events only is written at most this often.
CURSOR_ONLY_WRITE_SECONDS = 1.0


@dataclass(frozen=True)
class DeliverySettings:
    #: An event not delivered within this long of its first attempt makes its endpoint FAILING.
    retry_period: timedelta = timedelta(hours=24)
    #: Each attempt gives up after this many seconds.
    timeout: float = 10.0
    #: Attempts in flight per endpoint.
    concurrency: int = 16
    #: Events one endpoint's worker holds at most (read from the log, not yet delivered).
    window: int = 1000
    #: ...and at most about this many bytes of them (stored payloads; one event may pass it).
    window_bytes: int = 8 * 1024 * 1024
    #: A replica's hold on the endpoints it delivers lasts this long unless renewed (every third of it).
    lease_seconds: float = 15.0
    #: Allow targets on loopback, private and link-local addresses.
    allow_private: bool = False


@dataclass
class _Item:
    """One event on its way to the endpoint."""

    event: StoredEvent
    record: DeliveryRecord
    in_flight: bool = False
    ordered: bool = True  # False: sent again on request (RedeliverWebhook positions), outside the order
    _body: str | None = None

    @property
    def body(self) -> str:
        """The event's proto3 JSON, made once however often the event is retried."""
        if self._body is None:
            self._body = json_format.MessageToJson(self.event.event, indent=None)
        return self._body

    def due(self, now: datetime) -> bool:
        return not self.in_flight and (
            self.record.next_attempt_at is None or self.record.next_attempt_at <= now
        )


class EndpointWorker:
    """Delivers one endpoint while this replica holds it."""

    def __init__(self, dispatcher: WebhookDispatcher, lease: Lease) -> None:
        self._dispatcher = dispatcher
        self.lease = lease
        self.webhook_id = lease.webhook_id
        self._doorbell = asyncio.Event()
        self._window: dict[int, _Item] = {}
        self._window_bytes = 0
        self._by_call: dict[str, deque[int]] = {}
        self._requeued: dict[int, _Item] = {}
        self._skip: set[int] = set()
        self._results: list[DeliveryRecord] = []
        self._attempts: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._scanned = 0
        self._recorded_cursor = 0
        self._last_cursor_write = 0.0
        self._failing: tuple[datetime, str] | None = None
        self._last_error: str | None = None
        self._filter = EventFilter()
        self._url = ""
        self._refused_host: str | None = None
        self._signer = Signer([])
        self._overlap: tuple[Signer, datetime] | None = None
        self._pending_records: dict[int, DeliveryRecord] = {}
        self._requeued_records: list[DeliveryRecord] = []
        self._stopped = False
        self.task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(
            self._run(), name=f"webhook-{self.webhook_id}", context=contextvars.Context()
        )

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self._cancel_attempts()
        self._stopped = True

    def wake(self) -> None:
        self._doorbell.set()

    def _cancel_attempts(self) -> None:
        for attempt in list(self._attempts):
            attempt.cancel()

    def configure(self, webhook: WebhookRecord) -> None:
        """Takes the endpoint's current URL, filters and secrets (a change within one epoch applies to
        the next attempts; events already read stay)."""
        box = self._dispatcher.box
        current = box.open(webhook.id, webhook.sealed_secret)
        self._signer = Signer([current])
        # A rotated secret signs too until its overlap ends (by the injected clock).
        self._overlap = None
        expires = webhook.previous_secret_expires_at
        if webhook.sealed_previous_secret is not None and expires is not None:
            previous = box.open(webhook.id, webhook.sealed_previous_secret)
            self._overlap = (Signer([current, previous]), expires)
        self._filter = webhook.filter
        self._url = webhook.url
        host = urlsplit(webhook.url).hostname or ""
        literal = literal_address(host)
        self._refused_host = (
            host
            if literal is not None and not self._dispatcher.settings.allow_private and not is_public(literal)
            else None
        )

    def _signer_now(self, now: datetime) -> Signer:
        if self._overlap is not None and now < self._overlap[1]:
            return self._overlap[0]
        return self._signer

    def _now(self) -> datetime:
        return self._dispatcher.clock()

    async def _run(self) -> None:
        try:
            progress = await self._dispatcher.store.read(lambda tx: tx.webhooks.progress(self.webhook_id))
            if progress is None:
                return
            self._load(progress)
            while True:
                self._doorbell.clear()
                if not await self._flush():
                    self._cancel_attempts()  # another replica (or epoch) goes on from the recorded state
                    return
                if self._failing is not None:
                    # Recorded: the endpoint is FAILING and nothing more is sent; the attempts still in
                    # flight (heads of other calls) are recorded too before the worker ends.
                    if not self._in_flight:
                        return
                else:
                    await self._fill()
                    self._dispatch()
                await self._wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook %s: delivery worker failed; restarting", self.webhook_id)
            await asyncio.sleep(IDLE_CHECK_SECONDS)  # e.g. the database is down: not in a tight loop
        finally:
            self._stopped = True
            self._dispatcher.worker_ended(self)

    def _load(self, progress: Progress) -> None:
        webhook = progress.webhook
        self.configure(webhook)
        self._scanned = self._recorded_cursor = webhook.delivered_position
        for record in progress.ahead:
            if record.status is DeliveryStatus.SUCCEEDED:
                self._skip.add(record.position)
            else:
                self._pending_records[record.position] = record
        self._requeued_records = progress.requeued

    # -- reading the log -------------------------------------------------------------------------

    async def _fill(self) -> None:
        """Reads events after the last one read, while the window has room."""
        dispatcher = self._dispatcher
        if self._requeued_records:
            await self._load_requeued()
        settings = dispatcher.settings
        while (
            len(self._window) < settings.window
            and self._window_bytes < settings.window_bytes
            and self._scanned < dispatcher.hub.last_position
        ):
            room = min(settings.window - len(self._window), READ_BATCH)
            batch = await dispatcher.store.read(
                partial(_events_after, self._scanned, room, settings.window_bytes - self._window_bytes)
            )
            after = self._scanned
            if not batch:
                return
            if batch[0].position > after + 1:
                log.warning(
                    "webhook %s: events %d..%d were compacted before they were delivered",
                    self.webhook_id,
                    after + 1,
                    batch[0].position - 1,
                )
            for stored in batch:
                self._scanned = stored.position
                if stored.position in self._skip:
                    self._skip.discard(stored.position)
                    continue
                if not self._filter.matches(stored.type, stored.call_type):
                    continue
                record = self._pending_records.pop(stored.position, None) or _new_record(
                    self.webhook_id, stored
                )
                self._window[stored.position] = _Item(stored, record)
                self._window_bytes += stored.size
                self._by_call.setdefault(stored.call_cid, deque()).append(stored.position)

    async def _load_requeued(self) -> None:
        records, self._requeued_records = self._requeued_records, []
        positions = [record.position for record in records]
        found = await self._dispatcher.store.read(lambda tx: tx.events.events_at(positions))
        events = {stored.position: stored for stored in found}
        for record in records:
            stored = events.get(record.position)
            if stored is None:
                continue  # compacted meanwhile: nothing left to send
            self._requeued[record.position] = _Item(stored, record, ordered=False)

    # -- sending ---------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Sends every head that is due, up to the concurrency. Called again as each attempt ends, so
        a freed slot (or the next event of a call just answered) does not wait for the results to be
        recorded: only a call's order waits for answers, not for bookkeeping."""
        if self._failing is not None or self._stopped:
            return
        now = self._now()
        limit = self._dispatcher.settings.concurrency
        for item in self._requeued.values():
            if self._in_flight >= limit:
                return
            if item.due(now):
                self._send(item)
        for positions in self._by_call.values():
            if self._in_flight >= limit:
                return
            item = self._window[positions[0]]
            if item.due(now):
                self._send(item)

    def _send(self, item: _Item) -> None:
        item.in_flight = True
        self._in_flight += 1
        attempt = asyncio.create_task(self._attempt(item))
        self._attempts.add(attempt)
        attempt.add_done_callback(self._attempts.discard)

    async def _attempt(self, item: _Item) -> None:
        started_at = self._now()
        started = time.monotonic()
        status_code = 0
        error = ""
        try:
            if self._refused_host is not None:
                error = f"refused: {self._refused_host} is not a public address (--webhook-allow-private)"
            else:
                body = item.body
                headers = self._signer_now(started_at).headers(
                    message_id(item.event.position), datetime.now(UTC), body
                )
                headers["user-agent"] = USER_AGENT
                timeout = self._dispatcher.settings.timeout
                try:
                    async with self._dispatcher.http.post(
                        self._url,
                        data=body.encode(),
                        headers=headers,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=timeout),
                    ) as response:
                        status_code = response.status
                        if not 200 <= status_code < 300:
                            snippet = (await response.content.read(ERROR_BODY_BYTES)).decode(errors="replace")
                            error = f"HTTP {status_code}" + (
                                f": {snippet.strip()}" if snippet.strip() else ""
                            )
                except TimeoutError:
                    error = f"timed out after {timeout:g} s"
                except aiohttp.ClientConnectorError as failure:
                    # Its own text drops the cause's message (e.g. our resolver's refusal).
                    error = f"cannot connect to {failure.host}:{failure.port}: {failure.os_error}"
                except (aiohttp.ClientError, OSError) as failure:
                    error = f"{type(failure).__name__}: {failure}"
        finally:
            item.in_flight = False
            self._in_flight -= 1
        self._completed(item, started_at, time.monotonic() - started, status_code, error)

    def _completed(
        self, item: _Item, started_at: datetime, seconds: float, status_code: int, error: str
    ) -> None:
        self._dispatcher.attempts["failed" if error else "succeeded"] += 1
        now = self._now()
        record = item.record
        record.attempts += 1
        record.first_attempt_at = record.first_attempt_at or started_at
        record.last_attempt_at = now
        record.last_status_code = status_code
        record.last_latency = timedelta(seconds=seconds)
        record.last_error = error
        position = item.event.position
        if not error:
            record.status = DeliveryStatus.SUCCEEDED
            record.next_attempt_at = None
            if item.ordered:
                self._window.pop(position, None)
                self._window_bytes -= item.event.size
                queue = self._by_call[item.event.call_cid]
                queue.popleft()
                if not queue:
                    del self._by_call[item.event.call_cid]
            else:
                self._requeued.pop(position, None)
        elif now - record.first_attempt_at >= self._dispatcher.settings.retry_period:
            record.status = DeliveryStatus.FAILED
            record.next_attempt_at = None
            self._failing = (now, f"event {position}: {error}")
            log.warning(
                "webhook %s is FAILING: event %d (%s of %s) was not delivered within %s; last error: %s",
                self.webhook_id,
                position,
                item.event.type,
                item.event.call_cid,
                self._dispatcher.settings.retry_period,
                error,
            )
        else:
            record.status = DeliveryStatus.PENDING
            record.next_attempt_at = now + retry_delay(record.attempts)
            self._last_error = f"event {position}: {error}"
        self._results.append(replace(record))
        self._doorbell.set()
        self._dispatch()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def behind(self, newest: int) -> int:
        """Events between this endpoint's delivered point and `newest` (filtered-out ones included)."""
        return max(newest - self._cursor(), 0)

    # -- recording -------------------------------------------------------------------------------

    def _cursor(self) -> int:
        """Every matching event up to here is delivered (the window holds the rest, oldest first)."""
        return next(iter(self._window)) - 1 if self._window else self._scanned

    async def _flush(self) -> bool:
        """Records results and the cursor; False when the fence refused them (lease or epoch lost)."""
        cursor = self._cursor()
        moved = cursor > self._recorded_cursor
        idle = not self._results and self._failing is None
        if idle and (not moved or time.monotonic() - self._last_cursor_write < CURSOR_ONLY_WRITE_SECONDS):
            return True
        results, self._results = self._results, []
        failing, last_error = self._failing, self._last_error
        dispatcher = self._dispatcher
        try:
            accepted = await dispatcher.store.write(
                lambda tx: tx.webhooks.record(
                    dispatcher.me,
                    self.webhook_id,
                    self.lease.epoch,
                    results,
                    cursor if moved else None,
                    failing=failing,
                    last_error=last_error,
                ),
                touches_calls=False,
            )
        except Exception:
            self._results = results + self._results  # kept for the next try
            raise
        if not accepted:
            log.info("webhook %s: lease or epoch moved on; this worker stops", self.webhook_id)
            return False
        self._last_error = None
        self._last_cursor_write = time.monotonic()
        self._recorded_cursor = max(self._recorded_cursor, cursor)
        return True

    async def _wait(self) -> None:
        if self._doorbell.is_set():
            return
        timeout = IDLE_CHECK_SECONDS
        now = self._now()
        if self._in_flight < self._dispatcher.settings.concurrency:
            heads = [self._window[positions[0]] for positions in self._by_call.values()]
            waiting = [
                item.record.next_attempt_at
                for item in (*heads, *self._requeued.values())
                if not item.in_flight and item.record.next_attempt_at is not None
            ]
            if waiting:
                timeout = min(timeout, max(0.0, (min(waiting) - now).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._doorbell.wait(), timeout)


async def _events_after(after: int, limit: int, max_bytes: int, tx: Transaction) -> list[StoredEvent]:
    return await tx.events.events_after_position(after, limit, max_bytes=max_bytes)


async def _unclaimed(me: str, now: float, tx: Transaction) -> tuple[list[Lease], bool]:
    return await tx.webhooks.unclaimed(me, now)


async def _webhook(webhook_id: str, tx: Transaction) -> WebhookRecord | None:
    return await tx.webhooks.get(webhook_id)


def _new_record(webhook_id: str, stored: StoredEvent) -> DeliveryRecord:
    return DeliveryRecord(
        webhook_id=webhook_id,
        position=stored.position,
        call_cid=stored.call_cid,
        seq=stored.seq,
        event_type=stored.type,
        status=DeliveryStatus.PENDING,
    )


class WebhookDispatcher:
    """This replica's part: holds leases on endpoints (all of them on SQLite, whatever it can claim on
    PostgreSQL) and runs a worker for each."""

    def __init__(
        self, store: Store, hub: EventHub, clock: Clock, box: SecretBox, settings: DeliverySettings
    ) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.box = box
        self.settings = settings
        self.me = uuid.uuid4().hex
        self.http: aiohttp.ClientSession
        self._workers: dict[str, EndpointWorker] = {}
        #: Attempts made by this replica, by outcome (`succeeded`, `failed`).
        self.attempts: collections.Counter[str] = collections.Counter()
        self._refresh = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_position: Callable[[int], None] = lambda _position: self.wake()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=resolver(self.settings.allow_private), limit=0, enable_cleanup_closed=True
        )
        self.http = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)
        if self.store.sole_writer:
            # One process owns an SQLite database: leases left behind are its previous life's.
            await self.store.write(lambda tx: tx.webhooks.release(""), upkeep=True, touches_calls=False)
        self.hub.position_listeners.append(self._on_position)
        self._task = asyncio.create_task(self._run(), name="webhooks", context=contextvars.Context())

    async def close(self) -> None:
        if self._on_position in self.hub.position_listeners:
            self.hub.position_listeners.remove(self._on_position)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        workers = list(self._workers.values())
        self._workers.clear()
        for worker in workers:
            await worker.stop()
        with contextlib.suppress(Exception):
            await self.store.write(lambda tx: tx.webhooks.release(self.me), upkeep=True, touches_calls=False)
        await self.http.close()

    def refresh(self) -> None:
        """An endpoint changed (through this replica's API): look at leases and versions now."""
        self._refresh.set()

    def wake(self) -> None:
        """New events (or, in tests, a clock moved on): every worker looks again."""
        for worker in self._workers.values():
            worker.wake()

    def worker_ended(self, worker: EndpointWorker) -> None:
        if self._workers.get(worker.webhook_id) is worker:
            del self._workers[worker.webhook_id]
            self._refresh.set()

    @property
    def workers(self) -> dict[str, EndpointWorker]:
        return self._workers

    async def _run(self) -> None:
        while True:
            self._refresh.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook leases: round failed; retrying")
            # SQLite: every change comes through this process's API, which rings `refresh`.
            period = SOLE_WRITER_ROUND_SECONDS if self.store.sole_writer else self.settings.lease_seconds / 3
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), period)

    async def tick(self) -> None:
        """One lease round: renew, claim, and start, reload or stop workers to match."""
        now = time.time()
        held: list[Lease] | None = None
        if self.store.sole_writer:
            # Nobody else delivers from this database: no lease to renew, only new endpoints to claim.
            held, waiting = await self.store.read(partial(_unclaimed, self.me, now))
            if waiting:
                held = None
        if held is None:
            held = await self.store.write(
                lambda tx: tx.webhooks.hold(self.me, now, now + self.settings.lease_seconds, claim=True),
                upkeep=True,
                touches_calls=False,
            )
        leases = {lease.webhook_id: lease for lease in held}
        for webhook_id, worker in list(self._workers.items()):
            lease = leases.get(webhook_id)
            if lease is None or lease.epoch != worker.lease.epoch:
                del self._workers[webhook_id]
                await worker.stop()
            elif lease.version != worker.lease.version:
                webhook = await self.store.read(partial(_webhook, webhook_id))
                if webhook is not None:
                    worker.configure(webhook)
                    worker.lease = lease
                    worker.wake()
        for webhook_id, lease in leases.items():
            if webhook_id not in self._workers:
                worker = EndpointWorker(self, lease)
                self._workers[webhook_id] = worker
                worker.start()
