"""grpc.health.v1.Health, as grpc_health's asyncio servicer serves it, except on shutdown: once a Watch
stream has sent NOT_SERVING it ends (UNAVAILABLE, reason SHUTTING_DOWN) instead of staying open, so the
watch a load balancer keeps open does not hold the server's stop() for its whole grace period."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callplane_server.errors import NotFound, Unavailable

# A HealthCheckResponse.ServingStatus value (the stubs declare the enum in a way mypy cannot name).
ServingStatus: TypeAlias = int


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._statuses: dict[str, ServingStatus] = {"": health_pb2.HealthCheckResponse.SERVING}
        # Replaced on every change: a watcher waits on the one current when it last looked.
        self._changed = asyncio.Event()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            raise NotFound(
                f"no health status for service {request.service!r}",
                reason="SERVICE_NOT_FOUND",
                metadata={"service": request.service},
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sent: ServingStatus | None = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
                # Look again: the status may have changed while the write waited (a shutdown that came
                # then must still send NOT_SERVING before the stream ends).
                continue
            if self._shutting_down:
                raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
            await changed.wait()

    async def set(self, service: str, status: ServingStatus) -> None:
        """Sets the status of `service` ("" is the whole server); ignored once shutting down."""
        if not self._shutting_down:
            self._statuses[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service becomes NOT_SERVING for good; watchers get it, then their streams end."""
        self._shutting_down = True
        for service in self._statuses:
            self._statuses[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
