"""Process lifecycle: migrations on start keep data across restarts; SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callplane.v1 import call_service_pb2, call_service_pb2_grpc
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from tests.support import BACKENDS, TEST_SECRET, TestClock, fresh_database, serve_subprocess, serving_port
from tests.support import channel as authed_channel


@pytest.mark.parametrize("backend", BACKENDS)
async def test_restart_migrates_idempotently_and_keeps_data(backend: str, tmp_path: Path) -> None:
    async with fresh_database(backend, tmp_path) as url:
        for attempt in range(2):
            server = CallplaneServer(
                Config(api_secret=TEST_SECRET, listen="127.0.0.1:0", database_url=url), clock=TestClock()
            )
            port = await server.start()
            async with authed_channel(f"127.0.0.1:{port}") as channel:
                stub = call_service_pb2_grpc.CallServiceStub(channel)
                response = await stub.GetOrCreateCall(
                    call_service_pb2.GetOrCreateCallRequest(type="default", id="kept")
                )
                # Created on the first start only: the second start found the same row after migrating.
                assert response.created is (attempt == 0)
            await server.stop(grace=0)


async def _serve(
    data_dir: Path, *, shutdown_grace: float, extra: tuple[str, ...] = ()
) -> asyncio.subprocess.Process:
    """`callplane serve` in a process of its own, on a free port (read it with serving_port)."""
    return await serve_subprocess(data_dir, "--shutdown-grace", str(shutdown_grace), *extra)


@pytest.mark.parametrize("log_requests", [True, False], ids=["--log-requests", "default"])
async def test_sigterm_drains_logs_and_exits_zero(tmp_path: Path, log_requests: bool) -> None:
    """Also: a successful unary RPC is logged at INFO only with --log-requests (refusals always are)."""
    process = await _serve(tmp_path, shutdown_grace=5, extra=("--log-requests",) if log_requests else ())
    try:
        port, lines = await serving_port(process)
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="callplane.v1.CallService"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = call_service_pb2_grpc.CallServiceStub(channel)
            await stub.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(type="default", id="before-stop")
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetCall(call_service_pb2.GetCallRequest(type="default", id="missing"))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        assert process.stderr is not None
        rest = (await process.stderr.read()).decode()
        log = "".join(lines) + rest
        assert ("rpc /callplane.v1.CallService/GetOrCreateCall OK" in log) is log_requests
        assert "rpc /callplane.v1.CallService/GetCall NOT_FOUND" in log
        assert "shutting down" in log and "stopped" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_with_a_health_watch_open_exits_without_waiting_the_grace(tmp_path: Path) -> None:
    """Load balancers keep a Health/Watch open; on SIGTERM it gets NOT_SERVING and then ends, so the
    server does not wait its shutdown grace (60 s here) for it."""
    process = await _serve(tmp_path, shutdown_grace=60)
    try:
        port, _lines = await serving_port(process)
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(watch.read(), timeout=15)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        # Far below the 60 s grace: the watch did not hold the drain.
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        print(f"exited {time.monotonic() - signalled:.3f}s after SIGTERM with a health watch open")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
