"""The clients' retry policy (protos/callplane/v1/callplane_grpc_service_config.json).

The Python client is run over real gRPC on loopback against a small grpc.aio CallService that answers
UNAVAILABLE to the first attempts and counts every attempt it receives: gRPC's own retry machinery
(the service config) must send an idempotent RPC again and must not resend a non-idempotent one. No
database is involved there. Then the real server on both backends, with its database taken away
(PostgreSQL refusing connections: DATABASE_UNAVAILABLE; SQLite out of pages: STORAGE_FULL): its own RPC
counters show how many attempts of each RPC it handled. The Node client's equivalent is
clients/node/test/retry.test.js (run by tests/test_polyglot.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool
from sqlalchemy.engine import make_url

from callplane import SERVICE_CONFIG, CallplaneClient, CallplaneError
from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    event_service_pb2,
    moderation_service_pb2,
    ring_service_pb2,
    session_service_pb2,
    user_pb2,
    webhook_service_pb2,
)
from tests.support import SERVER_TOKEN, RunningServer, running_server

ROOT = Path(__file__).resolve().parents[1]
CONFIG_SOURCE = ROOT / "protos" / "callplane" / "v1" / "callplane_grpc_service_config.json"
# Every proto module is imported above so that the pool knows all services.
_PROTO_MODULES = (
    call_data_service_pb2,
    call_service_pb2,
    call_type_service_pb2,
    event_service_pb2,
    moderation_service_pb2,
    ring_service_pb2,
    session_service_pb2,
    user_pb2,
    webhook_service_pb2,
)


@dataclass
class Flaky:
    """How many more attempts of each method answer UNAVAILABLE, and how many attempts arrived."""

    failures_left: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    async def attempt(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.failures_left.get(method, 0) > 0:
            self.failures_left[method] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry")


class FlakyCallService(call_service_pb2_grpc.CallServiceServicer):
    def __init__(self, flaky: Flaky) -> None:
        self.flaky = flaky

    async def GetCall(
        self, request: call_service_pb2.GetCallRequest, context: grpc.aio.ServicerContext
    ) -> call_service_pb2.GetCallResponse:
        await self.flaky.attempt("GetCall", context)
        call = call_pb2.Call(type=request.type, id=request.id, cid=f"{request.type}:{request.id}")
        return call_service_pb2.GetCallResponse(call=call)

    async def EndCall(
        self, request: call_service_pb2.EndCallRequest, context: grpc.aio.ServicerContext
    ) -> call_service_pb2.EndCallResponse:
        await self.flaky.attempt("EndCall", context)
        call = call_pb2.Call(type=request.type, id=request.id, cid=f"{request.type}:{request.id}")
        return call_service_pb2.EndCallResponse(call=call)


@pytest_asyncio.fixture
async def flaky_server() -> AsyncIterator[tuple[str, Flaky]]:
    flaky = Flaky()
    server = grpc.aio.server()
    call_service_pb2_grpc.add_CallServiceServicer_to_server(FlakyCallService(flaky), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", flaky
    finally:
        await server.stop(None)


def _config() -> dict[str, object]:
    config: dict[str, object] = json.loads(SERVICE_CONFIG)
    return config


def _retried_methods() -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = []
    for method_config in _config()["methodConfig"]:  # type: ignore[attr-defined]
        names += [(name["service"], name["method"]) for name in method_config["name"]]
    return names


def test_the_packaged_config_is_the_one_in_protos() -> None:
    assert json.loads(CONFIG_SOURCE.read_text()) == _config()


def test_the_config_names_only_unary_rpcs_that_exist() -> None:
    pool = descriptor_pool.Default()
    names = _retried_methods()
    assert len(names) == len(set(names)), "a method is listed twice"
    for service, method in names:
        descriptor = pool.FindServiceByName(service).FindMethodByName(method)
        assert descriptor is not None, f"{service}/{method} does not exist"
        assert not descriptor.client_streaming and not descriptor.server_streaming, (
            f"{service}/{method} streams: streams resume themselves and must not be retried by gRPC"
        )
    for method_config in _config()["methodConfig"]:  # type: ignore[attr-defined]
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_non_idempotent_writes_are_not_retried() -> None:
    names = {method for _, method in _retried_methods()}
    # A retry of these after an UNAVAILABLE that hid a commit would change something twice (or fail
    # with another error than the first attempt's success).
    for method in ("EndCall", "UpdateCall", "DeleteCall", "SendCallEvent", "JoinCall", "RingCall"):
        assert method not in names


async def test_an_idempotent_rpc_is_retried_on_unavailable(flaky_server: tuple[str, Flaky]) -> None:
    target, flaky = flaky_server
    flaky.failures_left["GetCall"] = 2
    async with CallplaneClient(target) as client:
        state = await client.call("default", "retry").get()
    assert state.call.cid == "default:retry"
    assert flaky.attempts["GetCall"] == 3


async def test_retries_stop_after_max_attempts(flaky_server: tuple[str, Flaky]) -> None:
    target, flaky = flaky_server
    flaky.failures_left["GetCall"] = 100
    async with CallplaneClient(target) as client:
        with pytest.raises(CallplaneError) as raised:
            await client.call("default", "down").get()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert flaky.attempts["GetCall"] == 5  # maxAttempts


async def test_a_non_idempotent_rpc_is_not_retried(flaky_server: tuple[str, Flaky]) -> None:
    target, flaky = flaky_server
    flaky.failures_left["EndCall"] = 1
    async with CallplaneClient(target) as client:
        with pytest.raises(CallplaneError) as raised:
            await client.call("default", "once").end()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert flaky.attempts["EndCall"] == 1
        # The caller decides: the second attempt, its own, succeeds.
        await client.call("default", "once").end()
    assert flaky.attempts["EndCall"] == 2


async def test_channel_options_can_turn_retries_off(flaky_server: tuple[str, Flaky]) -> None:
    target, flaky = flaky_server
    flaky.failures_left["GetCall"] = 1
    async with CallplaneClient(target, options=[("grpc.enable_retries", 0)]) as client:
        with pytest.raises(CallplaneError):
            await client.call("default", "off").get()
    assert flaky.attempts["GetCall"] == 1


# --- the real server, its database taken away ---------------------------------------------------------


@contextlib.asynccontextmanager
async def database_outage(running: RunningServer) -> AsyncIterator[None]:
    """Every write fails with UNAVAILABLE until the block ends: PostgreSQL refuses connections (and the
    server's pooled ones are ended); SQLite's writer may not grow the file by a page."""
    if running.backend == "postgres":
        url = make_url(running.server.config.database_url)
        admin = await asyncpg.connect(
            url.set(drivername="postgresql", database="postgres").render_as_string(False)
        )
        try:
            await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", url.database
            )
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')
            await admin.close()
    else:
        async with running.server.store.database.write_engine.connect() as connection:
            pages = (await connection.exec_driver_sql("PRAGMA page_count")).scalar_one()
            await connection.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
            await connection.commit()
        try:
            yield
        finally:
            async with running.server.store.database.write_engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA max_page_count = 1073741823")
                await connection.commit()


def handled(running: RunningServer, method: str, code: str) -> int:
    value = running.server.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": "callplane.v1.UserService",
            "grpc_method": method,
            "grpc_code": code,
        },
    )
    return int(value or 0)


async def test_the_server_gets_idempotent_writes_again_and_others_once(backend: str, tmp_path: Path) -> None:
    big = {"blob": "x" * 3000}  # a few of these need new pages
    async with running_server(backend, tmp_path) as running:
        async with CallplaneClient(running.target, token=SERVER_TOKEN, timeout=60) as client:
            await client.upsert_users([{"id": f"p{index}"} for index in range(50)])
        async with database_outage(running):
            # One client (channel) each: retry throttling is per channel.
            async with CallplaneClient(running.target, token=SERVER_TOKEN, timeout=60) as client:
                with pytest.raises(CallplaneError) as upsert:
                    await client.upsert_users([{"id": f"u{index}", "custom": big} for index in range(50)])
            async with CallplaneClient(running.target, token=SERVER_TOKEN, timeout=60) as client:
                with pytest.raises(CallplaneError) as partial:
                    await client.update_users_partial(
                        [{"id": f"p{index}", "set": {"custom.blob": big["blob"]}} for index in range(50)]
                    )
        for raised in (upsert, partial):
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE, raised.value
            assert raised.value.reason in ("DATABASE_UNAVAILABLE", "STORAGE_FULL"), raised.value
        assert handled(running, "UpsertUsers", "UNAVAILABLE") == 5  # maxAttempts
        assert handled(running, "UpdateUsersPartial", "UNAVAILABLE") == 1
        # Once the database is back, the same client's retried RPC succeeds at the first attempt.
        async with CallplaneClient(running.target, token=SERVER_TOKEN, timeout=60) as client:
            await client.upsert_users([{"id": "bob"}])
        assert handled(running, "UpsertUsers", "OK") == 2
