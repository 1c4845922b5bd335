"""Shared fixtures. Every behavioural test module runs once per backend: SQLite always, PostgreSQL when
CALLPLANE_TEST_POSTGRES_URL is set (required when CI=true)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from callplane.v1 import (
    call_data_service_pb2_grpc,
    call_service_pb2_grpc,
    call_type_service_pb2_grpc,
    event_service_pb2_grpc,
    ring_service_pb2_grpc,
    session_service_pb2_grpc,
    user_pb2_grpc,
)
from tests.support import BACKENDS, LONG_LEASE_TTL, POSTGRES_ENV, RunningServer, in_ci, running_server


def pytest_report_header(config: pytest.Config) -> str:
    import os

    tier = (
        "configured" if os.environ.get(POSTGRES_ENV) else ("REQUIRED but missing" if in_ci() else "skipped")
    )
    return f"callplane backends: sqlite, postgres ({tier})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per skip reason (e.g. the PostgreSQL tier), instead of one per skipped test."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped tests by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count} skipped: {reason}")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    """A real grpc.aio server on 127.0.0.1:0 over a fresh database, one per test module and backend."""
    async with running_server(backend, tmp_path_factory.mktemp(backend)) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def long_lease_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """Like `server`, with leases longer than every timer tests run past (LONG_LEASE_TTL), so participants
    expire only where a test means them to."""
    async with running_server(
        backend, tmp_path_factory.mktemp(backend), lease_ttl_seconds=LONG_LEASE_TTL
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def delivering_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    """Like `server`, delivering webhooks, to receivers on this machine too (--webhook-allow-private)."""
    async with running_server(
        backend, tmp_path_factory.mktemp(backend), run_webhooks=True, webhook_allow_private=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_target(server: RunningServer) -> str:
    return server.target


@pytest.fixture(scope="module")
def calls(server: RunningServer) -> call_service_pb2_grpc.CallServiceStub:
    return call_service_pb2_grpc.CallServiceStub(server.channel)


@pytest.fixture(scope="module")
def users(server: RunningServer) -> user_pb2_grpc.UserServiceStub:
    return user_pb2_grpc.UserServiceStub(server.channel)


@pytest.fixture(scope="module")
def call_types(server: RunningServer) -> call_type_service_pb2_grpc.CallTypeServiceStub:
    return call_type_service_pb2_grpc.CallTypeServiceStub(server.channel)


@pytest.fixture(scope="module")
def sessions(server: RunningServer) -> session_service_pb2_grpc.SessionServiceStub:
    return session_service_pb2_grpc.SessionServiceStub(server.channel)


@pytest.fixture(scope="module")
def events(server: RunningServer) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(server.channel)


@pytest.fixture(scope="module")
def data(server: RunningServer) -> call_data_service_pb2_grpc.CallDataServiceStub:
    return call_data_service_pb2_grpc.CallDataServiceStub(server.channel)


@pytest.fixture(scope="module")
def rings(server: RunningServer) -> ring_service_pb2_grpc.RingServiceStub:
    return ring_service_pb2_grpc.RingServiceStub(server.channel)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique ids, since a module's tests share one database."""
    return lambda prefix="x": f"{prefix}-{uuid.uuid4().hex[:10]}"
