"""Several server processes on one PostgreSQL database: a watcher on one sees every write made through
another (LISTEN/NOTIFY doorbell, and polling), with the same gap-free seqs, and reads on one see writes
acknowledged by another. An embedded SQLite database takes one server process and refuses a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from callplane_server.store.database import DatabaseInUse
from tests.support import TEST_SECRET, TestClock, fresh_database
from tests.support import channel as authed_channel


async def test_watcher_on_one_replica_sees_writes_through_another(tmp_path: Path) -> None:
    async with fresh_database("postgres", tmp_path) as url:
        config = Config(api_secret=TEST_SECRET, listen="127.0.0.1:0", database_url=url, run_timers=False)
        replicas = [CallplaneServer(config, clock=TestClock()) for _ in range(2)]
        ports = [await replica.start() for replica in replicas]
        try:
            async with (
                authed_channel(f"127.0.0.1:{ports[0]}") as writer_channel,
                authed_channel(f"127.0.0.1:{ports[1]}") as watcher_channel,
            ):
                writer = call_service_pb2_grpc.CallServiceStub(writer_channel)
                reader = call_service_pb2_grpc.CallServiceStub(watcher_channel)
                create = call_service_pb2.GetOrCreateCallRequest(type="default", id="shared")
                await writer.GetOrCreateCall(create)
                get = call_service_pb2.GetCallRequest(type="default", id="shared")
                assert not (await reader.GetCall(get)).call.custom
                watch = event_service_pb2_grpc.EventServiceStub(watcher_channel).WatchCall(
                    event_service_pb2.WatchCallRequest(type="default", id="shared", snapshot=True)
                )
                snapshot = (await watch.read()).snapshot
                for index in range(20):
                    request = call_service_pb2.UpdateCallRequest(type="default", id="shared")
                    request.custom.update({"n": index})
                    await writer.UpdateCall(request)
                    # Acknowledged on one replica, so visible on the other: no replica serves a stale call.
                    assert (await reader.GetCall(get)).call.custom["n"] == index
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


async def test_a_second_server_on_one_sqlite_database_is_refused(tmp_path: Path) -> None:
    async with fresh_database("sqlite", tmp_path) as url:
        config = Config(api_secret=TEST_SECRET, listen="127.0.0.1:0", database_url=url, run_timers=False)
        first = CallplaneServer(config, clock=TestClock())
        await first.start()
        try:
            with pytest.raises(DatabaseInUse, match="one server process"):
                await CallplaneServer(config, clock=TestClock()).start()
        finally:
            await first.stop(grace=0)
        # Stopping releases the database for the next server.
        second = CallplaneServer(config, clock=TestClock())
        await second.start()
        await second.stop(grace=0)
