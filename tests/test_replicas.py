"""Several server processes on one database: a watcher on one sees every write made through another
(LISTEN/NOTIFY doorbell on PostgreSQL, polling everywhere), with the same gap-free seqs."""

from __future__ import annotations

from pathlib import Path

import pytest

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from tests.support import BACKENDS, TEST_SECRET, TestClock, fresh_database
from tests.support import channel as authed_channel


@pytest.mark.parametrize("backend", BACKENDS)
async def test_watcher_on_one_replica_sees_writes_through_another(backend: str, tmp_path: Path) -> None:
    async with fresh_database(backend, tmp_path) as url:
        config = Config(api_secret=TEST_SECRET, listen="127.0.0.1:0", database_url=url, run_timers=False)
        replicas = [CallplaneServer(config, clock=TestClock()) for _ in range(2)]
        ports = [await replica.start() for replica in replicas]
        try:
            async with (
                authed_channel(f"127.0.0.1:{ports[0]}") as writer_channel,
                authed_channel(f"127.0.0.1:{ports[1]}") as watcher_channel,
            ):
                writer = call_service_pb2_grpc.CallServiceStub(writer_channel)
                create = call_service_pb2.GetOrCreateCallRequest(type="default", id="shared")
                await writer.GetOrCreateCall(create)
                watch = event_service_pb2_grpc.EventServiceStub(watcher_channel).WatchCall(
                    event_service_pb2.WatchCallRequest(type="default", id="shared", snapshot=True)
                )
                snapshot = (await watch.read()).snapshot
                for index in range(20):
                    request = call_service_pb2.UpdateCallRequest(type="default", id="shared")
                    request.custom.update({"n": index})
                    await writer.UpdateCall(request)
                seen = []
                while len(seen) < 20:
                    message = await watch.read()
                    if message.HasField("event"):
                        seen.append(message.event)
                assert [e.seq for e in seen] == list(range(snapshot.seq + 1, snapshot.seq + 21))
                assert [e.call_updated.call.custom["n"] for e in seen] == list(range(20))
                watch.cancel()
        finally:
            for replica in replicas:
                await replica.stop(grace=0)
