"""The server's log: one line per RPC with the status the client saw (CANCELLED for a stream its client
cancelled), no tracebacks for clients that go away, and outages that name their cause."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from callplane.v1 import (
    call_data_service_pb2,
    call_data_service_pb2_grpc,
    call_service_pb2,
    call_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from tests.support import RunningServer, channel, struct

WATCH_CALL = "rpc /callplane.v1.EventService/WatchCall"


def _rpc_lines(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "callplane.rpc" and record.getMessage().startswith(prefix)
    ]


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Waits for the server to log what a test expects (bounded, so a missing line fails the test)."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _call(server: RunningServer, call_id: str) -> None:
    stub = call_service_pb2_grpc.CallServiceStub(server.channel)
    await stub.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))


async def test_stream_cancelled_by_its_client_is_logged_cancelled(
    server: RunningServer, caplog: pytest.LogCaptureFixture, unique: Callable[[str], str]
) -> None:
    caplog.set_level(logging.INFO, logger="callplane.rpc")
    call_id = unique("cancelled")
    await _call(server, call_id)
    events = event_service_pb2_grpc.EventServiceStub(server.channel)
    stream = events.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id))
    await stream.read()  # the stream is open and idle on the server
    stream.cancel()
    await _until(lambda: bool(_rpc_lines(caplog, WATCH_CALL)), "the WatchCall log line")
    [line] = _rpc_lines(caplog, WATCH_CALL)
    assert line.startswith(f"{WATCH_CALL} CANCELLED "), line


async def test_cancelling_stalled_streams_logs_one_debug_line_each_and_no_traceback(
    server: RunningServer, caplog: pytest.LogCaptureFixture, unique: Callable[[str], str]
) -> None:
    """Streams whose client stopped reading block in a write (flow control); cancelling them must not
    log grpc's ExecuteBatchError traceback at ERROR for each."""
    caplog.set_level(logging.INFO, logger="callplane.rpc")
    caplog.set_level(logging.DEBUG, logger="grpc._cython.cygrpc")
    streams_count = 20
    call_id = unique("stalled")
    sender = unique("sender")
    await user_pb2_grpc.UserServiceStub(server.channel).UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=sender)])
    )
    await _call(server, call_id)
    # Without BDP probing the HTTP/2 windows stay at 64 KiB, so a few events fill them.
    watcher = channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
    try:
        events = event_service_pb2_grpc.EventServiceStub(watcher)
        streams = [
            events.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id))
            for _ in range(streams_count)
        ]
        for stream in streams:
            await stream.read()  # open; from here on nobody reads
        data = call_data_service_pb2_grpc.CallDataServiceStub(server.channel)
        payload = struct({"filler": "x" * 4000})
        for _ in range(60):
            await data.SendCallEvent(
                call_data_service_pb2.SendCallEventRequest(
                    type="default", id=call_id, user_id=sender, custom=payload
                )
            )
        await asyncio.sleep(0.5)  # let the server's writes reach the full windows
        for stream in streams:
            stream.cancel()
        await _until(lambda: len(_rpc_lines(caplog, WATCH_CALL)) == streams_count, "a log line per stream")
    finally:
        await watcher.close()
    assert all(line.startswith(f"{WATCH_CALL} CANCELLED ") for line in _rpc_lines(caplog, WATCH_CALL))
    loud = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not loud, [record.getMessage() for record in loud]
    grpc_lines = [
        record
        for record in caplog.records
        if record.name == "grpc._cython.cygrpc" and "servicer method" in record.getMessage()
    ]
    assert len(grpc_lines) <= streams_count
    assert all(record.levelno == logging.DEBUG and not record.exc_info for record in grpc_lines)
