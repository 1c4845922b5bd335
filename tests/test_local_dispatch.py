"""Events committed by this process reach its subscribers from what the commit wrote: the tailer does not
read them back from the log (it stays for other replicas' commits and for gaps)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from tests.support import running_server


async def test_own_commits_are_dispatched_without_reading_them_back(backend: str, tmp_path: Path) -> None:
    # No polling: the only reads would be the tailer's, on a doorbell.
    async with running_server(backend, tmp_path, event_poll_interval_seconds=3600.0) as running:
        hub = running.server.hub
        assert hub is not None
        read_back: list[int] = []
        read_batch = hub._read_batch

        async def counting(*args: Any) -> Any:
            batch, recipients = await read_batch(*args)
            read_back.extend(stored.position for stored in batch)
            return batch, recipients

        hub._read_batch = counting  # type: ignore[method-assign]
        calls = call_service_pb2_grpc.CallServiceStub(running.channel)
        await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id="local"))
        stream = event_service_pb2_grpc.EventServiceStub(running.channel).WatchCall(
            event_service_pb2.WatchCallRequest(type="default", id="local")
        )
        await asyncio.wait_for(stream.read(), 10)  # the stream is live
        writes = 20
        for index in range(writes):
            request = call_service_pb2.UpdateCallRequest(type="default", id="local")
            request.custom.update({"n": index})
            await calls.UpdateCall(request)
        seen = []
        while len(seen) < writes:
            message = await asyncio.wait_for(stream.read(), 10)
            if message.HasField("event"):
                seen.append(message.event.call_updated.call.custom["n"])
        assert seen == list(range(writes))
        # Also on PostgreSQL, where each commit's NOTIFY comes back to this process too.
        assert read_back == []
        stream.cancel()
