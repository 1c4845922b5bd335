"""Test support: fresh databases per backend, a controllable clock, an in-process server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from callplane_server.app import CallplaneServer
from callplane_server.config import Config

POSTGRES_ENV = "CALLPLANE_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


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
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'callplane-{uuid.uuid4().hex[:8]}.db'}"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_base_url())
    name = f"callplane_test_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as error:
        message = f"PostgreSQL unreachable at {base.render_as_string()}: {error}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
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
async def running_server(backend: str, folder: Path, **config: object) -> AsyncIterator[RunningServer]:
    # Timers fire only when a test calls server.timers.run_due() after moving the clock.
    config.setdefault("run_timers", False)
    async with fresh_database(backend, folder) as url:
        clock = TestClock()
        server = CallplaneServer(
            Config(listen="127.0.0.1:0", database_url=url, data_dir=folder, **config),  # type: ignore[arg-type]
            clock=clock,
        )
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            yield RunningServer(backend, server, clock, channel)
        finally:
            await channel.close()
            await server.stop(grace=0)
