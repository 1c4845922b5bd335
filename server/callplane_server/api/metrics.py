"""Prometheus metrics for RPCs, named as grpc-ecosystem's go-grpc-prometheus names them, so existing
dashboards and alerts work: `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`
and `grpc_server_handling_seconds` (unary RPCs); open streams per RPC; and the server's state that is
not an RPC (`callplane_*`, see ServerStateCollector), read when scraped. Served over HTTP at /metrics
when configured."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from callplane_server.events.hub import EventHub
    from callplane_server.services.clock import Clock
    from callplane_server.services.sessions import SessionService
    from callplane_server.services.timers import TimerRunner
    from callplane_server.store import Store, Transaction
    from callplane_server.webhooks.delivery import WebhookDispatcher

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    """Counters per server (its own registry, so several servers can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle a unary RPC, from authentication to the reply.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # labels() takes a lock and builds a key each time; RPC paths and codes are few, so keep the children.
        self._open_streams = Gauge(
            "callplane_streams_open",
            "Streaming RPCs open now.",
            ["grpc_service", "grpc_method"],
            registry=self.registry,
        )
        self._counters: dict[tuple[str, str], Callable[[], None]] = {}
        self._timers: dict[str, Callable[[float], None]] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def handled(self, method: str, kind: str, code: str, seconds: float) -> None:
        key = (method, code)
        increment = self._counters.get(key)
        if increment is None:
            service, name = _split(method)
            increment = self._handled.labels(kind, service, name, code).inc
            self._counters[key] = increment
        increment()
        if kind == "unary":
            observe = self._timers.get(method)
            if observe is None:
                service, name = _split(method)
                observe = self._seconds.labels(kind, service, name).observe
                self._timers[method] = observe
            observe(seconds)

    def stream_opened(self, method: str) -> Callable[[], None]:
        """Counts a stream of `method` as open; returns what to call when it ends."""
        gauge = self._open_streams.labels(*_split(method))
        gauge.inc()
        return gauge.dec

    def watch_state(self, collector: ServerStateCollector) -> None:
        self.registry.register(collector)

    def serve(self, listen: str) -> int:
        """Serves /metrics on `host:port` (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        self._http, self._http_thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.registry
        )
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
        return int(bound)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.strip("/").partition("/")
    return service, name


#: A scrape waits this long for the database's part of the state (then reports the rest).
STATE_READ_SECONDS = 5.0


@dataclass(frozen=True)
class _DatabaseState:
    last_position: int
    timers_due: int
    oldest_due_at: datetime | None
    participants_present: int


class ServerStateCollector(Collector):
    """The state that is not an RPC, read when scraped: from memory (the hub, timers, presence, pools,
    webhook workers) and, in one read transaction on the server's event loop, from the database (the
    newest event position, due timers, participants present). Nothing is kept up to date per request,
    so a server nobody scrapes pays nothing for these."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        store: Store,
        hub: EventHub,
        clock: Clock,
        timers: TimerRunner,
        sessions: SessionService,
        webhooks: WebhookDispatcher | None,
    ) -> None:
        self._loop = loop
        self._store = store
        self._hub = hub
        self._clock = clock
        self._timers = timers
        self._sessions = sessions
        self._webhooks = webhooks

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not read the database (it would from the event loop's own thread)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        yield from self._events()
        yield from self._timer_families()
        yield from self._presence()
        yield from self._pools()
        yield from self._webhook_families()
        database = self._read_database()
        if database is None:
            return
        yield _gauge(
            "callplane_event_position", "The newest committed event position.", database.last_position
        )
        yield _gauge(
            "callplane_event_tailer_lag_events",
            "Committed events this server's tailer has not dispatched to its subscribers yet.",
            max(database.last_position - self._hub.last_position, 0),
        )
        yield _gauge("callplane_timers_due", "Timers due and not fired yet.", database.timers_due)
        oldest = database.oldest_due_at
        yield _gauge(
            "callplane_timers_oldest_due_seconds",
            "How long the earliest due timer has been due (0: none due).",
            0.0 if oldest is None else max((self._clock() - oldest).total_seconds(), 0.0),
        )
        yield _gauge(
            "callplane_participants_present",
            "Participants present in every call (all servers of the database).",
            database.participants_present,
        )

    def _read_database(self) -> _DatabaseState | None:
        try:
            if asyncio.get_running_loop() is self._loop:
                return None  # scraped from the loop's own thread: waiting on it would deadlock
        except RuntimeError:
            pass  # no loop in this thread (the HTTP server's): the usual case
        now = self._clock()

        async def read(tx: Transaction) -> _DatabaseState:
            due, oldest = await tx.timers.backlog(now)
            return _DatabaseState(
                await tx.events.last_position(), due, oldest, await tx.sessions.present_count()
            )

        try:
            future = asyncio.run_coroutine_threadsafe(self._store.read(read), self._loop)
            return future.result(STATE_READ_SECONDS)
        except Exception as error:  # the scrape still reports what memory knows
            log.warning("metrics: the database's part of the state was not read: %s", error)
            return None

    def _events(self) -> Iterator[GaugeMetricFamily]:
        subscribers = GaugeMetricFamily(
            "callplane_event_subscribers",
            "Event stream subscriptions, by what they follow.",
            labels=["follows"],
        )
        for follows, count in self._hub.subscriber_counts().items():
            subscribers.add_metric([follows], count)
        yield subscribers
        yield _gauge(
            "callplane_event_subscribers_lagging",
            "Subscribers reading the log instead of their queue: started behind, or fell behind.",
            self._hub.lagging_count(),
        )
        yield _gauge(
            "callplane_event_dispatched_position",
            "The last position this server's tailer dispatched.",
            self._hub.last_position,
        )

    def _timer_families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        fired = CounterMetricFamily("callplane_timers_fired", "Timers fired by this server.", labels=["kind"])
        for kind, count in sorted(self._timers.fired.items()):
            fired.add_metric([kind], count)
        yield fired
        lateness = self._timers.lateness
        yield HistogramMetricFamily(
            "callplane_timer_lateness_seconds",
            "How long after its due time a timer fired.",
            buckets=lateness.cumulative(),
            sum_value=lateness.total,
        )

    def _presence(self) -> Iterator[GaugeMetricFamily]:
        yield _gauge(
            "callplane_presence_streams_held",
            "Participants whose presence a WatchCall stream of this server holds.",
            self._sessions.presence_held,
        )

    def _pools(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        pools = GaugeMetricFamily(
            "callplane_db_pool_connections",
            "Database connections of this server's pools, by role and state.",
            labels=["role", "state"],
        )
        seen: set[int] = set()
        for role, engine in self._store.database.engines.items():
            pool = engine.sync_engine.pool
            if id(pool) in seen or not isinstance(pool, QueuePool):
                continue
            seen.add(id(pool))
            pools.add_metric([role, "in_use"], pool.checkedout())
            pools.add_metric([role, "idle"], pool.checkedin())
        yield pools
        sizes = self._store.database.group_commit_sizes
        if sizes is not None:
            yield HistogramMetricFamily(
                "callplane_group_commit_writes",
                "Writes committed together per SQLite group commit.",
                buckets=sizes.cumulative(),
                sum_value=sizes.total,
            )

    def _webhook_families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self._webhooks is None:
            return
        attempts = CounterMetricFamily(
            "callplane_webhook_attempts", "Webhook delivery attempts by this server.", labels=["result"]
        )
        for result in ("succeeded", "failed"):
            attempts.add_metric([result], self._webhooks.attempts[result])
        yield attempts
        lag = GaugeMetricFamily(
            "callplane_webhook_backlog_events",
            "Events after an endpoint's delivered position (the endpoints this server delivers).",
            labels=["webhook_id"],
        )
        in_flight = GaugeMetricFamily(
            "callplane_webhook_in_flight", "Webhook requests in flight, by endpoint.", labels=["webhook_id"]
        )
        for webhook_id, worker in list(self._webhooks.workers.items()):
            lag.add_metric([webhook_id], worker.behind(self._hub.last_position))
            in_flight.add_metric([webhook_id], worker.in_flight)
        yield lag
        yield in_flight


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
