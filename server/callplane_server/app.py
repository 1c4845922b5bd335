"""Assembles the server: store, services, servicers, health, reflection; starts and drains it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from callplane.v1 import (
    call_data_service_pb2,
    call_data_service_pb2_grpc,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    moderation_service_pb2,
    moderation_service_pb2_grpc,
    ring_service_pb2,
    ring_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from callplane_server import runtime, tracing
from callplane_server.api.call_data_servicer import CallDataServicer
from callplane_server.api.errors import Authenticator, RpcWrapper, WrappingRegistrar
from callplane_server.api.event_servicer import EventServicer
from callplane_server.api.health import HealthServicer
from callplane_server.api.metrics import RpcMetrics, ServerStateCollector
from callplane_server.api.moderation_servicer import ModerationServicer
from callplane_server.api.ring_servicer import RingServicer
from callplane_server.api.servicers import CallServicer, CallTypeServicer, UserServicer
from callplane_server.api.session_servicer import SessionServicer
from callplane_server.api.webhook_servicer import WebhookServicer
from callplane_server.auth.context import authority_context
from callplane_server.auth.tokens import SERVER, load_or_create_secret
from callplane_server.config import Config
from callplane_server.events.hub import EventHub
from callplane_server.services.call_data import CallDataService
from callplane_server.services.call_types import CallTypeService
from callplane_server.services.calls import CallService
from callplane_server.services.clock import Clock, system_clock
from callplane_server.services.moderation import ModerationService
from callplane_server.services.ringing import RingingService
from callplane_server.services.sessions import SessionService
from callplane_server.services.streams import EventStreamService
from callplane_server.services.timers import TimerRunner
from callplane_server.services.users import UserService
from callplane_server.services.webhooks import WebhookService
from callplane_server.store import Store, Transaction
from callplane_server.tracing import ServerTracing
from callplane_server.webhooks.delivery import DeliverySettings, WebhookDispatcher
from callplane_server.webhooks.signing import SecretBox

log = logging.getLogger("callplane")

SERVICE_NAMES = (
    call_type_service_pb2.DESCRIPTOR.services_by_name["CallTypeService"].full_name,
    user_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    call_service_pb2.DESCRIPTOR.services_by_name["CallService"].full_name,
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    ring_service_pb2.DESCRIPTOR.services_by_name["RingService"].full_name,
    call_data_service_pb2.DESCRIPTOR.services_by_name["CallDataService"].full_name,
    moderation_service_pb2.DESCRIPTOR.services_by_name["ModerationService"].full_name,
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
)
COMPACTION_INTERVAL_SECONDS = 60.0


class CallplaneServer:
    """One server process. `start()` binds and returns the port (use port 0 in tests)."""

    def __init__(
        self, config: Config, *, clock: Clock = system_clock, tracer_provider: TracerProvider | None = None
    ) -> None:
        """`tracer_provider`: trace RPCs, transactions and statements to it (`serve` passes the one the
        OTEL_* environment asks for); None: no tracing, and no cost for it."""
        self.config = config
        self.clock = clock
        self._tracer_provider = tracer_provider
        self.tracing: ServerTracing | None = None
        self.store: Store | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.hub: EventHub | None = None
        self.streams: EventStreamService | None = None
        self.timers: TimerRunner | None = None
        self.sessions: SessionService | None = None
        self.ringing: RingingService | None = None
        self.call_data: CallDataService | None = None
        self.moderation: ModerationService | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.api_secret = ""
        self.metrics = RpcMetrics()
        self.metrics_port = 0
        self._background: list[asyncio.Task[None]] = []
        #: Every method registered (full names), health and reflection included.
        self.rpc_methods: list[str] = []

    async def start(self) -> int:
        self.store = await Store.open(
            self.config.resolved_database_url,
            custom_indexes=self.config.custom_indexes,
            require_indexes=self.config.require_indexes,
        )
        if self._tracer_provider is not None:
            self.tracing = ServerTracing(self._tracer_provider)
            self.tracing.instrument_engines(list(self.store.database.engines.values()))
            self.store.database.tracer = self.tracing.tracer
        limits = self.config.limits
        self.hub = EventHub(
            self.store,
            poll_interval=self.config.event_poll_interval_seconds,
            queue_size=self.config.event_queue_size,
        )
        await self.hub.start()
        self.streams = EventStreamService(
            self.store, self.hub, self.clock, min_progress_interval=self.config.min_progress_interval_seconds
        )
        self.timers = TimerRunner(
            self.store, self.clock, poll_interval=self.config.timer_poll_interval_seconds
        )
        self.sessions = SessionService(
            self.store,
            self.clock,
            limits,
            self.timers,
            lease_ttl=timedelta(seconds=self.config.lease_ttl_seconds),
        )
        self.streams.presence = self.sessions
        self.ringing = RingingService(self.store, self.clock, self.timers)
        self.call_data = CallDataService(self.store, self.clock, limits)
        self.moderation = ModerationService(self.store, self.clock, self.sessions)
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
        self.api_secret = self.config.api_secret or load_or_create_secret(self.config.data_dir)
        box = SecretBox(self.api_secret)
        if self.config.run_webhooks:
            self.webhooks = WebhookDispatcher(
                self.store,
                self.hub,
                self.clock,
                box,
                DeliverySettings(
                    retry_period=timedelta(seconds=self.config.webhook_retry_period_seconds),
                    timeout=self.config.webhook_timeout_seconds,
                    concurrency=self.config.webhook_concurrency,
                    lease_seconds=self.config.webhook_lease_seconds,
                    allow_private=self.config.webhook_allow_private,
                ),
            )
        grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *self._keepalive_options()])
        # Typed as the server it stands in for: the add_*_to_server functions below only call the two
        # registration methods WrappingRegistrar provides.
        registrar = WrappingRegistrar(
            grpc_server,
            RpcWrapper(
                Authenticator(self.api_secret),
                self.metrics,
                log_requests=self.config.log_requests,
                tracer=None if self.tracing is None else self.tracing.tracer,
            ),
        )
        server = cast(grpc.aio.Server, registrar)
        call_type_service_pb2_grpc.add_CallTypeServiceServicer_to_server(
            CallTypeServicer(CallTypeService(self.store, self.clock)), server
        )
        user_pb2_grpc.add_UserServiceServicer_to_server(
            UserServicer(UserService(self.store, self.clock, limits)), server
        )
        call_service_pb2_grpc.add_CallServiceServicer_to_server(
            CallServicer(CallService(self.store, self.clock, limits)), server
        )
        event_service_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(self.streams), server)
        session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.sessions), server)
        ring_service_pb2_grpc.add_RingServiceServicer_to_server(RingServicer(self.ringing), server)
        call_data_service_pb2_grpc.add_CallDataServiceServicer_to_server(
            CallDataServicer(self.call_data), server
        )
        moderation_service_pb2_grpc.add_ModerationServiceServicer_to_server(
            ModerationServicer(self.moderation), server
        )
        webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server(
            WebhookServicer(
                WebhookService(
                    self.store,
                    self.clock,
                    box,
                    self.webhooks,
                    allow_private=self.config.webhook_allow_private,
                )
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.config.reflection:
            # The asyncio servicer, registered directly: enable_server_reflection() only picks it for a
            # grpc.aio.Server, and the registrar stands in for one (the sync servicer would block a thread
            # per stream and could not be wrapped like every other handler).
            # no-untyped-call: grpcio-reflection's generated registration function has no annotations.
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
                reflection.aio.ReflectionServicer(
                    (
                        *SERVICE_NAMES,
                        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                        reflection.SERVICE_NAME,
                    )
                ),
                server,
            )
        self.rpc_methods = list(registrar.methods)
        self.port = grpc_server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.listen}")
        # grpc.aio serves each RPC in a task descending from the ones start() creates, so start() runs in a
        # context with no principal: an RPC has exactly the principal its authentication sets, nothing
        # inherited from whoever started the server.
        await asyncio.create_task(grpc_server.start(), context=authority_context(None))
        self._server = grpc_server
        self.metrics.watch_state(
            ServerStateCollector(
                asyncio.get_running_loop(),
                self.store,
                self.hub,
                self.clock,
                self.timers,
                self.sessions,
                self.webhooks,
            )
        )
        if self.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._background.append(
            asyncio.create_task(
                self._compact_periodically(), name="event-compaction", context=authority_context(SERVER)
            )
        )
        if self.config.run_timers:
            self.timers.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        log.info(
            "callplane serving on port %d (%s, %s)",
            self.port,
            self.store.database.dialect,
            runtime.loop_name(),
        )
        return self.port

    def _keepalive_options(self) -> list[tuple[str, int]]:
        """HTTP/2 keepalive: a client that vanished without closing its connection (its network gone)
        is found by unanswered pings within 2/3 of a lease, which ends its streams and so the presence
        they hold. Pings go only to connections with open calls, also when those send no data (idle
        streams); clients may ping every 5 s."""
        interval_ms = max(int(self.config.lease_ttl_seconds * 1000 / 3), 1000)
        return [
            ("grpc.keepalive_time_ms", interval_ms),
            ("grpc.keepalive_timeout_ms", interval_ms),
            # grpc-core times keepalive pings out by this one (keepalive_timeout_ms alone closed nothing).
            ("grpc.http2.ping_timeout_ms", interval_ms),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]

    async def compact_events(self) -> int:
        """Drops events older than the retention period (by the injected clock); returns how many."""
        assert self.store is not None
        cutoff = self.clock() - timedelta(seconds=self.config.event_retention_seconds)

        async def compact(tx: Transaction) -> int:
            # Idempotency keys live as long as the events they point at.
            await tx.idempotency.compact(cutoff)
            await tx.webhooks.compact_deliveries(cutoff)
            # Events an enabled webhook endpoint still has to get are kept for it.
            return await tx.events.compact(cutoff, keep_after=await tx.webhooks.oldest_held_position())

        return await self.store.write(compact)

    async def _compact_periodically(self) -> None:
        while True:
            await asyncio.sleep(COMPACTION_INTERVAL_SECONDS)
            try:
                await self.compact_events()
            except Exception:
                log.exception("event compaction failed")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health says NOT_SERVING first so balancers stop routing (and health watches end once
        they have sent it), then in-flight RPCs drain.
        Every step is bounded, so a stuck component is logged by name instead of hanging shutdown."""
        await _bounded("health", self._health.enter_graceful_shutdown())
        for task in self._background:
            task.cancel()
        if self.timers is not None:
            await _bounded("timers", self.timers.close())
        if self.webhooks is not None:
            await _bounded("webhooks", self.webhooks.close())
        # Before the streams end: a stream ended by shutdown must not count as its participant leaving.
        if self.sessions is not None:
            await _bounded("sessions", self.sessions.close())
        # Watch streams end now with UNAVAILABLE (clients resume elsewhere); stop() would otherwise wait
        # the whole grace period for them.
        if self.hub is not None:
            await _bounded("event hub", self.hub.close())
        if self._server is not None:
            drain = self.config.shutdown_grace_seconds if grace is None else grace
            await _bounded("grpc server", self._server.stop(drain), drain + STEP_TIMEOUT_SECONDS)
        if self.store is not None:
            await _bounded("store", self.store.close())
        if self.tracing is not None:
            self.tracing.close()
        self.metrics.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


STEP_TIMEOUT_SECONDS = 10.0
#: How long shutdown waits for the last spans to be exported.
SPAN_EXPORT_SECONDS = 2.0


async def _bounded(step: str, work: Awaitable[object], limit: float = STEP_TIMEOUT_SECONDS) -> None:
    try:
        await asyncio.wait_for(work, limit)
    except TimeoutError:
        log.error("shutdown step %r did not finish within %.0fs; going on", step, limit)


async def serve(config: Config) -> None:
    try:
        tracer_provider = tracing.from_environment()
    except ValueError as error:  # an OTEL_* variable names what is not supported
        raise SystemExit(f"callplane: {error}") from None
    server = CallplaneServer(config, tracer_provider=tracer_provider)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down: draining for up to %.0fs", config.shutdown_grace_seconds)
    await server.stop()
    if tracer_provider is not None:
        # Exports the spans still batched; bounded, since an unreachable collector is retried for seconds.
        await _bounded("span export", _in_daemon_thread(tracer_provider.shutdown), SPAN_EXPORT_SECONDS)
    log.info("stopped")


async def _in_daemon_thread(work: Callable[[], object]) -> None:
    """Runs `work` in a daemon thread and waits for it; one given up on does not hold the process's exit
    (asyncio.to_thread's executor is joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def run() -> None:
        try:
            work()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(done.set)

    threading.Thread(target=run, name="callplane-span-export", daemon=True).start()
    await done.wait()
