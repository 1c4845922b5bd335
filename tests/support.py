"""Test support: fresh databases per backend, a controllable clock, an in-process server."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from google.protobuf import struct_pb2

from callplane.v1 import event_service_pb2
from callplane_server.app import CallplaneServer
from callplane_server.auth.tokens import create_token
from callplane_server.config import Config

POSTGRES_ENV = "CALLPLANE_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgres")

# Every server the tests start signs tokens with this secret (subprocess servers get it through
# CALLPLANE_API_SECRET); channels carry a server token unless a test says otherwise.
TEST_SECRET = "callplane-test-secret-" + "0" * 48
SERVER_TOKEN = create_token(TEST_SECRET, ttl=timedelta(days=1))
#: Lease of `long_lease_server` (conftest): longer than every timer tests run past.
LONG_LEASE_TTL = 600.0


def user_token(user_id: str, ttl: timedelta = timedelta(hours=1), **claims: object) -> str:
    return create_token(TEST_SECRET, user_id=user_id, ttl=ttl, **claims)  # type: ignore[arg-type]


class _BearerHeader:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


# grpc.aio files each interceptor under one call kind only, hence one class per kind.
class _UnaryBearer(_BearerHeader, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(client_call_details), request)


class _StreamBearer(_BearerHeader, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(client_call_details), request)


def channel(target: str, token: str | None = SERVER_TOKEN, **options: object) -> grpc.aio.Channel:
    """An insecure loopback channel that authenticates every call with `token` (None: no token)."""
    interceptors = [_UnaryBearer(token), _StreamBearer(token)] if token else None
    return grpc.aio.insecure_channel(target, interceptors=interceptors, **options)  # type: ignore[arg-type]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip locally; in CI a missing prerequisite is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (required when CI=true)", pytrace=False)
    pytest.skip(reason)


def callplane_command() -> str:
    """The installed `callplane` script (of this venv, else on PATH)."""
    script = Path(sys.executable).parent / "callplane"
    found = str(script) if script.exists() else shutil.which("callplane")
    if not found:
        pytest.fail("the `callplane` script is not installed: run `make venv` (pip install -e '.[dev]')")
    return found


def postgres_base_url() -> str:
    """The admin URL for the PostgreSQL tier; required in CI, skipped (with the reason) elsewhere."""
    url = os.environ.get(POSTGRES_ENV, "")
    if url:
        return url
    if in_ci():
        pytest.fail(f"CI=true requires the PostgreSQL tier: set {POSTGRES_ENV}", pytrace=False)
    pytest.skip(
        f"PostgreSQL tier not configured: set {POSTGRES_ENV}="
        "postgresql://postgres@127.0.0.1:5432/postgres to run it"
    )


@asynccontextmanager
async def fresh_database(backend: str, folder: Path) -> AsyncIterator[str]:
    """Yields the URL of a new, empty database, and drops it afterwards."""
    postgres_url = postgres_base_url() if backend == "postgres" else ""

    def unreachable(message: str) -> None:
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    async with new_database(backend, folder, postgres_url, on_unreachable=unreachable) as url:
        yield url


@asynccontextmanager
async def new_database(
    backend: str,
    folder: Path,
    postgres_url: str,
    *,
    prefix: str = "callplane_test",
    on_unreachable: Callable[[str], None] | None = None,
) -> AsyncIterator[str]:
    """A new, empty database: an SQLite file in `folder`, or a PostgreSQL database created next to
    `postgres_url` and dropped afterwards. `on_unreachable` hears why PostgreSQL could not be reached
    (it may skip); the connection error is raised otherwise."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'callplane-{uuid.uuid4().hex[:8]}.db'}"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as error:
        if on_unreachable is not None:
            on_unreachable(f"PostgreSQL unreachable at {base.render_as_string()}: {error}")
        raise
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class TestClock:
    """Injectable clock: starts at a fixed instant and advances `step` on every reading, so timestamps
    are distinct and ordered; set step to zero to make ties on purpose."""

    __test__ = False

    def __init__(self, start: datetime | None = None, step: timedelta = timedelta(milliseconds=1)) -> None:
        self.current = start or datetime(2026, 1, 1, tzinfo=UTC)
        self.step = step

    def __call__(self) -> datetime:
        now = self.current
        self.current = self.current + self.step
        return now

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@dataclass
class RunningServer:
    backend: str
    server: CallplaneServer
    clock: TestClock
    channel: grpc.aio.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(
    backend: str, folder: Path, *, tracer_provider: Any = None, **config: object
) -> AsyncIterator[RunningServer]:
    """An in-process server over a fresh database; `tracer_provider`: trace to it (tests/test_tracing.py)."""
    # Timers fire only when a test calls server.timers.run_due() after moving the clock.
    config.setdefault("run_timers", False)
    # Webhook delivery runs only where a test asks for it (its lease rounds would be writes of their own).
    config.setdefault("run_webhooks", False)
    config.setdefault("api_secret", TEST_SECRET)
    async with fresh_database(backend, folder) as url:
        clock = TestClock()
        server = CallplaneServer(
            Config(listen="127.0.0.1:0", database_url=url, data_dir=folder, **config),  # type: ignore[arg-type]
            clock=clock,
            tracer_provider=tracer_provider,
        )
        await server.start()
        authed = channel(f"127.0.0.1:{server.port}")
        try:
            yield RunningServer(backend, server, clock, authed)
        finally:
            await authed.close()
            await server.stop(grace=0)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    """A google.protobuf.Struct holding `value` (custom data and filters in requests)."""
    message = struct_pb2.Struct()
    message.update(value)
    return message


STREAM_TIMEOUT = 15.0


async def snapshot(events: Any, call_id: str, call_type: str = "default") -> event_service_pb2.CallSnapshot:
    """The current state of a call, from a WatchCall with `snapshot` (read, then the stream is closed)."""
    stream = events.WatchCall(event_service_pb2.WatchCallRequest(type=call_type, id=call_id, snapshot=True))
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in stream:
                assert message.WhichOneof("message") == "snapshot", message
                return message.snapshot
    finally:
        stream.cancel()
    raise AssertionError("WatchCall ended without a snapshot")


async def eventually(check: Callable[[], Any], seconds: float = 5.0) -> None:
    """Polls `check()` (async, truthy when done) for async work that follows a request or a client cancel
    (stream cleanup, a background batch)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def serve_subprocess(data_dir: Path, *args: str) -> asyncio.subprocess.Process:
    """`callplane serve` in a process of its own on a free port, with `args` (read the port with
    serving_port; stderr is piped)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callplane_server",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CALLPLANE_API_SECRET": TEST_SECRET},
    )


async def serving_port(process: asyncio.subprocess.Process) -> tuple[int, list[str]]:
    """The port a serve_subprocess server listens on, once it serves, and its log lines until then."""
    assert process.stderr is not None
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=60)).decode()
        if not line:
            raise AssertionError("server exited before serving:\n" + "".join(lines))
        lines.append(line)
        match = re.search(r"serving on port (\d+)", line)
        if match:
            return int(match.group(1)), lines
