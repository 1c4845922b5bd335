"""The Python client's live-call methods and its resumable stream iterators (acceptance 6).

The iterators are followed across a server restart on the same port and database: they reconnect by
themselves and continue with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from callplane import (
    CallplaneClient,
    CallplaneError,
    CallSnapshotMessage,
    EventMessage,
    EventStream,
    ProgressMessage,
    Reconnect,
)
from callplane.client.models import to_track, track_name
from callplane.v1 import session_pb2
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from tests.support import SERVER_TOKEN, TEST_SECRET, RunningServer, TestClock, fresh_database, running_server

FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def new_id(prefix: str = "pc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Collector:
    """Runs an EventStream in a task, keeping every message."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.messages: list[Any] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.stream:
            self.messages.append(message)
            self.changed.set()

    @property
    def events(self) -> list[EventMessage]:
        return [m for m in self.messages if isinstance(m, EventMessage)]

    async def wait_for(self, predicate: Any, seconds: float = 30) -> None:
        async with asyncio.timeout(seconds):
            while not predicate(self):
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the stream ended")
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        await self.stream.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await self.task


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[CallplaneClient]:
    async with CallplaneClient(server.target, token=SERVER_TOKEN, timeout=10) as client:
        yield client


# -- conversions ------------------------------------------------------------------------------------------


def test_track_names_round_trip() -> None:
    assert to_track("screen_share") == session_pb2.TRACK_TYPE_SCREEN_SHARE
    assert to_track("TRACK_TYPE_AUDIO") == session_pb2.TRACK_TYPE_AUDIO
    assert to_track(2) == 2
    assert track_name(session_pb2.TRACK_TYPE_SCREEN_SHARE_AUDIO) == "screen_share_audio"
    with pytest.raises(ValueError, match="unknown track type"):
        to_track("hologram")


async def test_watch_rejects_snapshot_with_after_seq(client: CallplaneClient) -> None:
    with pytest.raises(ValueError, match="not both"):
        client.call("default", "x").watch(snapshot=True, after_seq=1)


# -- iterators on one server ------------------------------------------------------------------------------


async def test_watch_yields_snapshot_events_and_progress(client: CallplaneClient) -> None:
    call = client.call("default", new_id())
    await call.get_or_create(custom={"n": 0})
    await call.update(set_custom={"n": 1})
    stream = call.watch(snapshot=True)
    first = await anext(stream)
    assert isinstance(first, CallSnapshotMessage)
    assert (first.seq, first.call.custom.to_dict()) == (2, {"n": 1})
    assert stream.cursor == 2
    await call.update(set_custom={"n": 2})
    event = await anext(stream)
    assert isinstance(event, EventMessage)
    assert (event.type, event.seq, event.call_cid) == ("call.updated", 3, call.cid)
    assert event.payload.call.custom["n"] == 2
    assert stream.cursor == 3
    await stream.close()


async def test_stream_errors_are_callplane_errors(client: CallplaneClient, server: RunningServer) -> None:
    with pytest.raises(CallplaneError) as caught:
        await anext(client.call("default", new_id("missing")).watch(after_seq=0))
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    call = client.call("default", new_id())
    await call.get_or_create()
    with pytest.raises(CallplaneError) as caught:
        await anext(call.watch(after_seq=5))
    assert caught.value.reason == "RESUME_POINT_IN_FUTURE"
    with pytest.raises(CallplaneError) as caught:
        await anext(client.watch_user(new_id("nobody"), after_seq=0))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_compacted_resume_point_raises(backend: str, tmp_path: Path) -> None:
    async with running_server(backend, tmp_path, event_retention_seconds=60) as running:
        client = CallplaneClient(running.target, token=SERVER_TOKEN)
        call = client.call("default", new_id())
        await call.get_or_create()
        running.clock.advance(timedelta(seconds=120))
        await call.update(set_custom={"n": 1})
        await running.server.compact_events()
        with pytest.raises(CallplaneError) as caught:
            await anext(call.watch(after_seq=0))
        assert caught.value.reason == "EVENTS_COMPACTED"
        assert caught.value.metadata["earliest_seq"] == "2"
        await client.close()


# -- resume across a restart on the same port -------------------------------------------------------------


@pytest.mark.parametrize("graceful", [True, False], ids=["graceful-stop", "abrupt-stop"])
async def test_iterators_resume_across_a_server_restart(backend: str, tmp_path: Path, graceful: bool) -> None:
    async with fresh_database(backend, tmp_path) as url:
        clock = TestClock()

        def config(listen: str) -> Config:
            return Config(
                api_secret=TEST_SECRET,
                listen=listen,
                database_url=url,
                data_dir=tmp_path,
                run_timers=False,
                min_progress_interval_seconds=0.05,
                shutdown_grace_seconds=5,
            )

        first = CallplaneServer(config("127.0.0.1:0"), clock=clock)
        port = await first.start()
        servers = [first]
        collectors: list[Collector] = []
        try:
            async with CallplaneClient(
                f"127.0.0.1:{port}",
                token=SERVER_TOKEN,
                options=FAST_RECONNECT,
                reconnect=Reconnect(initial_backoff=0.05, max_backoff=0.3, give_up_after=30),
            ) as client:
                await client.upsert_users([{"id": "rs-alice"}, {"id": "rs-bob"}])
                call = client.call("default", new_id())
                await call.get_or_create(created_by_id="rs-alice", members=["rs-alice", "rs-bob"])
                await call.update(set_custom={"n": 1})

                # The firehose asks for progress; the others do not (they resume all the same).
                watch = Collector(call.watch(snapshot=True))
                firehose = Collector(
                    client.subscribe_events(call_cids=[call.cid], after_position=0, progress_interval=0.2)
                )
                bob = Collector(client.watch_user("rs-bob", after_seq=0))
                collectors.extend((watch, firehose, bob))
                await watch.wait_for(lambda c: c.messages)
                snapshot = watch.messages[0]
                assert isinstance(snapshot, CallSnapshotMessage) and snapshot.seq == 2
                await emit_to_user(first, call.cid, "rs-bob", 1)
                for n in (2, 3):
                    await call.update(set_custom={"n": n})
                await watch.wait_for(lambda c: len(c.events) == 3)  # custom, n=2, n=3
                await firehose.wait_for(lambda c: len(c.events) == 5)
                await bob.wait_for(lambda c: len(c.events) == 1)

                # The server goes away with the streams open ...
                await first.stop(grace=None if graceful else 0)
                second = CallplaneServer(config(f"127.0.0.1:{port}"), clock=clock)
                await second.start()  # ... and another comes up on the same port and database.
                servers.append(second)
                # Another client writes (this one's unary calls fail fast until its channel reconnects;
                # only its streams retry by themselves).
                async with CallplaneClient(f"127.0.0.1:{port}", token=SERVER_TOKEN) as writer:
                    other = writer.call(call.type, call.id)
                    for n in (4, 5, 6):
                        await other.update(set_custom={"n": n})
                    await emit_to_user(second, call.cid, "rs-bob", 2)
                    await other.end()

                await watch.wait_for(lambda c: c.events and c.events[-1].type == "call.ended")
                await firehose.wait_for(lambda c: c.events and c.events[-1].type == "call.ended")
                await bob.wait_for(lambda c: len(c.events) == 2)

                assert [e.seq for e in watch.events] == list(range(3, 11))
                assert [e.type for e in watch.events][-1] == "call.ended"
                assert [e.payload.call.custom["n"] for e in watch.events[1:-2]] == [2, 3, 4, 5, 6]
                assert [e.seq for e in firehose.events] == list(range(1, 11))
                positions = [e.position for e in firehose.events]
                assert positions == sorted(set(positions))
                assert [e.user_seq for e in bob.events] == [1, 2]
                for collector in (watch, firehose, bob):
                    assert collector.stream.reconnects >= 1
                    # progress never went backwards and never claimed more than was delivered
                    last = 0
                    for message in collector.messages:
                        if isinstance(message, ProgressMessage):
                            assert message.seq >= last
                        elif isinstance(message, EventMessage):
                            key = {watch: message.seq, firehose: message.position, bob: message.user_seq}[
                                collector
                            ]
                            assert key > last
                            last = key
                        if isinstance(message, ProgressMessage):
                            last = max(last, message.seq)
        finally:
            for collector in collectors:
                await collector.close()
            for server in servers:
                await server.stop(grace=0)


async def emit_to_user(server: CallplaneServer, cid: str, user_id: str, k: int) -> None:
    """A custom event addressed to one user, written straight through the store."""
    from callplane_server.domain.events import CustomEventSent
    from callplane_server.store import Transaction

    store = server.store
    assert store is not None
    sent = CustomEventSent(user_id="system", custom={"k": k}, to_user_ids=[user_id])
    now = server.clock()

    async def record(tx: Transaction) -> None:
        call = await tx.calls.open(cid, now)
        assert call is not None
        call.record_event(sent, [user_id])

    await store.write(record)


async def test_a_stream_gives_up_after_the_configured_time(backend: str, tmp_path: Path) -> None:
    async with fresh_database(backend, tmp_path) as url:
        server = CallplaneServer(
            Config(
                api_secret=TEST_SECRET,
                listen="127.0.0.1:0",
                database_url=url,
                data_dir=tmp_path,
                run_timers=False,
            ),
            clock=TestClock(),
        )
        port = await server.start()
        async with CallplaneClient(
            f"127.0.0.1:{port}",
            token=SERVER_TOKEN,
            options=FAST_RECONNECT,
            reconnect=Reconnect(initial_backoff=0.05, max_backoff=0.1, give_up_after=0.5),
        ) as client:
            call = client.call("default", new_id())
            await call.get_or_create()
            stream = call.watch(after_seq=0)
            assert (await anext(stream)).seq == 1
            await server.stop(grace=0)
            with pytest.raises(CallplaneError) as caught:
                async with asyncio.timeout(20):
                    while True:
                        await anext(stream)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert stream.reconnects >= 1


async def test_an_idle_resumed_stream_outlives_give_up_after(backend: str, tmp_path: Path) -> None:
    """A resumed stream with nothing to send, asking for no progress, receives no message for longer than
    `give_up_after`; when its server then goes away it still reconnects (idle time is not failing time:
    the stream counts as connected once the server sent its headers) and resumes exactly."""
    async with fresh_database(backend, tmp_path) as url:
        clock = TestClock()

        def config(listen: str) -> Config:
            return Config(
                api_secret=TEST_SECRET, listen=listen, database_url=url, data_dir=tmp_path, run_timers=False
            )

        first = CallplaneServer(config("127.0.0.1:0"), clock=clock)
        port = await first.start()
        servers = [first]
        try:
            give_up_after = 2.0
            async with CallplaneClient(
                f"127.0.0.1:{port}",
                token=SERVER_TOKEN,
                options=FAST_RECONNECT,
                reconnect=Reconnect(initial_backoff=0.05, max_backoff=0.2, give_up_after=give_up_after),
            ) as client:
                call = client.call("default", new_id())
                await call.get_or_create()
                collector = Collector(call.watch(after_seq=1))
                hub = first.hub
                assert hub is not None
                async with asyncio.timeout(10):
                    while hub.subscriber_count < 1:  # noqa: ASYNC110 (the hub has no event for this)
                        await asyncio.sleep(0.01)
                await asyncio.sleep(give_up_after + 0.5)  # idle for longer than give_up_after
                assert collector.messages == []
                await first.stop(grace=None)
                second = CallplaneServer(config(f"127.0.0.1:{port}"), clock=clock)
                await second.start()
                servers.append(second)
                async with CallplaneClient(f"127.0.0.1:{port}", token=SERVER_TOKEN) as writer:
                    await writer.call(call.type, call.id).update(set_custom={"n": 1})
                await collector.wait_for(lambda c: c.events)
                assert [e.seq for e in collector.events] == [2]
                assert collector.stream.reconnects >= 1
                await collector.close()
        finally:
            for server in servers:
                await server.stop(grace=0)


async def test_progress_comes_only_when_asked_for(backend: str, tmp_path: Path) -> None:
    async with (
        running_server(backend, tmp_path, min_progress_interval_seconds=0.01) as running,
        CallplaneClient(running.target, token=SERVER_TOKEN) as client,
    ):
        call = client.call("default", new_id())
        await call.get_or_create()
        asked = call.watch(after_seq=1, progress_interval=0.02)
        silent = call.watch(after_seq=1)
        progress = await anext(asked)
        assert isinstance(progress, ProgressMessage) and progress.seq == 1
        assert asked.cursor == 1
        next_silent = asyncio.ensure_future(anext(silent))
        await asyncio.sleep(0.3)  # room for many progress messages, were any due
        assert not next_silent.done()
        await call.update(set_custom={"n": 1})
        event = await next_silent
        assert isinstance(event, EventMessage) and event.seq == 2
        async for message in asked:
            if isinstance(message, ProgressMessage) and message.seq == 2:
                break  # progress after the event carries its seq
            assert isinstance(message, EventMessage | ProgressMessage)
        await asked.close()
        await silent.close()


# -- the live-call methods end to end ---------------------------------------------------------------------


async def test_live_call_methods(client: CallplaneClient) -> None:
    host, guest = new_id("host"), new_id("guest")
    await client.upsert_users([{"id": host}, {"id": guest}])
    call = client.call("default", new_id())
    await call.get_or_create(created_by_id=host, members=[host, {"user_id": guest, "role": "user"}])
    events = call.watch(after_seq=0, include_progress=False)

    joined = await call.join(host, participant_session_id="host-1", custom={"mood": "ok"})
    assert joined.participant.user_id == host
    assert joined.participant.custom.to_dict() == {"mood": "ok"}
    assert joined.session.id and joined.lease_ttl_seconds > 0 and joined.seq > 0
    other = await call.join(guest)
    assert other.participant.participant_session_id

    alive = await call.keep_alive("host-1")
    assert alive.lease_expires_at is not None
    updated = await call.update_participant("host-1", published_tracks=["audio", "video"])
    assert updated.published_tracks == ["audio", "video"]

    page = await call.query_participants(sort="user_id")
    assert page.total_participants == 2
    assert sorted(p.user_id for p in page) == sorted([host, guest])
    assert sum(page.participants_by_role.values()) == 2 and page.session_id == joined.session.id
    page = await call.query_participants(filter_conditions={"published_tracks": {"$in": ["video"]}})
    assert [p.participant_session_id for p in page] == ["host-1"]

    mine = await call.update_participant_custom("host-1", host, {"hand": True}, mode="shallow-merge")
    assert mine.custom.to_dict() == {"mood": "ok", "hand": True}
    session = await call.update_session_custom(host, {"topic": "x"})
    assert session.custom.to_dict() == {"topic": "x"}
    session = await call.update_session_custom(
        host, {"agenda": [1]}, mode="shallow-merge", keys_to_delete=["topic"], etag=session.custom_etag
    )
    assert session.custom.to_dict() == {"agenda": [1]}
    with pytest.raises(CallplaneError) as caught:
        await call.update_session_custom(host, {"late": 1}, etag="stale")
    assert caught.value.code == grpc.StatusCode.ABORTED

    sent = await call.send_event(host, {"hello": 1}, to_user_ids=[guest], request_id="r-1")
    again = await call.send_event(host, {"hello": 1}, to_user_ids=[guest], request_id="r-1")
    assert (again.seq, again.duplicate, sent.duplicate) == (sent.seq, True, False)

    pins = await call.pin("host-1", host)
    assert [(p.participant_session_id, p.user_id) for p in pins] == [("host-1", host)]
    assert await call.unpin("host-1", host) == []

    await call.leave(other.participant.participant_session_id)
    await call.leave("host-1")

    sessions = await call.query_sessions()
    assert sessions[0].id == joined.session.id
    assert {p.user_id for p in sessions[0].participants} == {host, guest}

    seen: list[str] = []
    async for message in events:
        seen.append(message.type)
        if message.type == "call.session_participant_left" and seen.count(message.type) == 2:
            break
    for expected in (
        "call.created",
        "call.session_started",
        "call.session_participant_joined",
        "call.session_participant_updated",
        "call.participant_custom_updated",
        "call.session_custom_updated",
        "custom",
        "call.pins_updated",
        "call.session_participant_left",
    ):
        assert expected in seen, f"{expected} not in {seen}"
    assert seen.count("custom") == 1  # the retried send_event sent nothing again


async def test_backstage_and_ringing_methods(client: CallplaneClient) -> None:
    caller, callee, other = new_id("caller"), new_id("callee"), new_id("other")
    await client.upsert_users([{"id": caller}, {"id": callee}, {"id": other}])
    callee_events = client.watch_user(callee, after_seq=0, include_progress=False)

    call = client.call("default", new_id())
    state = await call.get_or_create(
        created_by_id=caller, members=[caller, callee, other], ring=True, video=True
    )
    assert state.created
    ring = await anext(callee_events)
    assert (ring.type, ring.call_cid, ring.user_seq) == ("call.ring", call.cid, 1)
    assert ring.payload.video and ring.payload.caller_user_id == caller

    await call.accept(callee)
    await call.reject(other, reason="busy")
    with pytest.raises(ValueError, match="reason must be one of"):
        await call.reject(other, reason="timeout")

    second = client.call("default", new_id())
    await second.get_or_create(created_by_id=caller, members=[caller, callee])
    rang = await second.ring(caller, members_ids=[callee])
    assert rang.members_ids == [callee] and rang.call.cid == second.cid
    await second.reject(caller, reason="cancel")
    received: list[tuple[str, str]] = []
    async for message in callee_events:
        received.append((message.call_cid, message.type))
        if message.type == "call.rejected":
            break
    assert [t for cid, t in received if cid == second.cid] == ["call.ring", "call.rejected"]
    assert (call.cid, "call.accepted") in received

    live = client.call("default", new_id())
    await live.get_or_create(created_by_id=caller, settings_override={"backstage": {"enabled": True}})
    assert live.data is not None and live.data.backstage
    assert not (await live.go_live()).backstage
    assert (await live.stop_live()).backstage
