"""A write whose caller has given up (deadline passed, RPC cancelled) is rolled back, not committed after the
client was told DEADLINE_EXCEEDED, and is logged DEADLINE_EXCEEDED; writes of other callers are unaffected.
Every test runs on SQLite (group commit: each write under its own SAVEPOINT) and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from callplane.v1 import call_service_pb2, call_service_pb2_grpc
from callplane_server import deadlines
from callplane_server.store.events import EventRepository
from tests.support import RunningServer, running_server, struct

SHORT = 0.3  # seconds: the deadline of the write that must not land
LONG = 60.0


@asynccontextmanager
async def _write_lock_held(running: RunningServer) -> AsyncIterator[None]:
    """Another connection holds what an UpdateCall needs: SQLite's write lock, PostgreSQL's call rows."""
    url = make_url(running.server.config.resolved_database_url)
    if running.backend == "sqlite":
        holder = sqlite3.connect(url.database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    import asyncpg

    connection = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute("SELECT 1 FROM calls FOR UPDATE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


def _update(call_id: str, value: str) -> call_service_pb2.UpdateCallRequest:
    return call_service_pb2.UpdateCallRequest(type="default", id=call_id, set_custom=struct({"v": value}))


async def _custom(stub: call_service_pb2_grpc.CallServiceStub, call_id: str) -> dict[str, object]:
    reply = await stub.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id))
    return dict(reply.call.custom)


def _logged(caplog: pytest.LogCaptureFixture, line: str) -> bool:
    return any(line in record.getMessage() for record in caplog.records if record.name == "callplane.rpc")


async def test_write_waiting_past_its_deadline_is_rolled_back(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callplane.rpc")
    async with running_server(backend, tmp_path) as running:
        stub = call_service_pb2_grpc.CallServiceStub(running.channel)
        for call_id in ("late", "patient"):
            await stub.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
        async with _write_lock_held(running):
            # Both writers wait behind the lock; only one of them gives up meanwhile.
            patient = asyncio.ensure_future(stub.UpdateCall(_update("patient", "kept"), timeout=LONG))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpdateCall(_update("late", "lost"), timeout=SHORT)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await patient
        # A write queued after the expired one has committed, so the expired one was handled before it.
        await stub.UpdateCall(_update("patient", "after"), timeout=LONG)
        assert await _custom(stub, "late") == {}
        assert await _custom(stub, "patient") == {"v": "after"}
        assert _logged(caplog, "rpc /callplane.v1.CallService/UpdateCall DEADLINE_EXCEEDED")


async def test_deadline_passing_during_the_work_rolls_back_that_write_only(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline passes after the write's statements ran, before its commit: on SQLite its savepoint is
    rolled back while the writes grouped with it commit."""
    caplog.set_level(logging.INFO, logger="callplane.rpc")
    flush = EventRepository.flush

    async def slow_flush(self: EventRepository) -> int:
        deadline = deadlines.current_deadline()
        if deadline is not None and deadline - time.monotonic() < LONG / 2:
            # Fault injection: the short-deadline write is slow after its statements, inside its
            # transaction, until its deadline has passed.
            await asyncio.sleep(max(deadline - time.monotonic(), 0) + 0.05)
        return await flush(self)

    async with running_server(backend, tmp_path) as running:
        stub = call_service_pb2_grpc.CallServiceStub(running.channel)
        for call_id in ("slow", "first", "second"):
            await stub.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
        monkeypatch.setattr(EventRepository, "flush", slow_flush)
        first = asyncio.ensure_future(stub.UpdateCall(_update("first", "kept"), timeout=LONG))
        slow = asyncio.ensure_future(stub.UpdateCall(_update("slow", "lost"), timeout=SHORT))
        second = asyncio.ensure_future(stub.UpdateCall(_update("second", "kept"), timeout=LONG))
        await first
        await second
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        monkeypatch.undo()
        await stub.UpdateCall(_update("first", "after"), timeout=LONG)
        assert await _custom(stub, "slow") == {}
        assert await _custom(stub, "second") == {"v": "kept"}
        assert _logged(caplog, "rpc /callplane.v1.CallService/UpdateCall DEADLINE_EXCEEDED")
