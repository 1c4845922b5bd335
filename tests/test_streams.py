"""Event streams end to end, on both backends: WatchCall (snapshot then changes, resume exactness, from
the start, from now, OUT_OF_RANGE, EVENTS_COMPACTED, progress only when asked for), WatchUser,
SubscribeEvents (filters and resume by position), events of hard-deleted calls, and shutdown (UNAVAILABLE
SHUTTING_DOWN, then an exact resume on a new server over the same database)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, json_format

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from callplane_server.domain.events import CustomEventSent
from callplane_server.services.limits import Limits
from callplane_server.services.streams import progress_every
from callplane_server.store import Transaction
from tests.errors import decode, expect_error
from tests.support import TEST_SECRET, RunningServer, TestClock, fresh_database, running_server, struct
from tests.support import channel as authed_channel

READ_TIMEOUT = 15.0
#: What tests that wait for progress ask for (this module's servers allow it: MIN_PROGRESS).
PROGRESS = 0.05
MIN_PROGRESS = 0.01


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    """This module's server lets streams ask for progress as often as every 10 ms, so a test can tell
    when a stream is set up, and a stream that asks for none shows it gets none."""
    async with running_server(
        backend, tmp_path_factory.mktemp(f"streams-{backend}"), min_progress_interval_seconds=MIN_PROGRESS
    ) as running:
        yield running


# -- helpers ----------------------------------------------------------------------------------------


def custom_of(event: event_pb2.Event) -> dict[str, Any]:
    return json_format.MessageToDict(event.call_updated.call.custom)


class StreamReader:
    """Reads one server stream (WatchCall, WatchUser or SubscribeEvents) message by message.

    A background task reads into a queue: timing out on `call.read()` itself would cancel the RPC."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                self._inbox.put_nowait(message)
            self._inbox.put_nowait(grpc.aio.EOF)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
            self._inbox.put_nowait(error)

    async def message(self, wait: float = READ_TIMEOUT) -> Any:
        """The next message; raises the stream's AioRpcError if it failed."""
        message = await asyncio.wait_for(self._inbox.get(), wait)
        if isinstance(message, grpc.aio.AioRpcError):
            self._inbox.put_nowait(message)  # stays failed
            raise message
        assert not isinstance(message, BaseException), f"stream read failed: {message!r}"
        assert message is not grpc.aio.EOF, "the stream ended"
        return message

    async def event(self, wait: float = READ_TIMEOUT) -> event_pb2.Event:
        """The next event, skipping progress messages."""
        while True:
            message = await self.message(wait)
            kind = message.WhichOneof("message")
            if kind == "event":
                return message.event
            assert kind == "progress", f"expected an event, got {kind}"

    async def events(self, count: int, wait: float = READ_TIMEOUT) -> list[event_pb2.Event]:
        return [await self.event(wait) for _ in range(count)]

    async def progress(self, wait: float = READ_TIMEOUT) -> event_service_pb2.Progress:
        """The next progress message (fails on an event: the test expected quiet)."""
        message = await self.message(wait)
        kind = message.WhichOneof("message")
        assert kind == "progress", f"expected progress, got {kind}: {message}"
        return message.progress

    async def quiet(self, seconds: float = 0.3) -> None:
        """Asserts nothing but progress arrives for `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                message = await self.message(left)
            except TimeoutError:
                return
            assert message.WhichOneof("message") == "progress", f"unexpected {message}"

    def cancel(self) -> None:
        self.call.cancel()


class Calls:
    """Shorthands over the module server's stubs."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.calls = call_service_pb2_grpc.CallServiceStub(server.channel)
        self.users = user_pb2_grpc.UserServiceStub(server.channel)
        self.types = call_type_service_pb2_grpc.CallTypeServiceStub(server.channel)
        self.events = event_service_pb2_grpc.EventServiceStub(server.channel)

    async def create(self, call_id: str, call_type: str = "default", **data: Any) -> str:
        await self.calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type=call_type, id=call_id, data=call_service_pb2.CallData(**data)
            )
        )
        return f"{call_type}:{call_id}"

    async def update(self, call_id: str, call_type: str = "default", **custom: Any) -> None:
        await self.calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(type=call_type, id=call_id, set_custom=struct(custom))
        )

    async def upsert_users(self, *user_ids: str) -> None:
        await self.users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=u) for u in user_ids])
        )

    # `progress`: the progress_interval to ask for, in seconds (None: none, as clients do by default).

    def watch(
        self, call_id: str, call_type: str = "default", progress: float | None = None, **request: Any
    ) -> StreamReader:
        message = event_service_pb2.WatchCallRequest(type=call_type, id=call_id, **request)
        return StreamReader(self.events.WatchCall(asking(message, progress)))

    def watch_user(self, user_id: str, progress: float | None = None, **request: Any) -> StreamReader:
        message = event_service_pb2.WatchUserRequest(user_id=user_id, **request)
        return StreamReader(self.events.WatchUser(asking(message, progress)))

    def subscribe(self, progress: float | None = None, **request: Any) -> StreamReader:
        message = event_service_pb2.SubscribeEventsRequest(**request)
        return StreamReader(self.events.SubscribeEvents(asking(message, progress)))

    async def emit_to_users(self, cid: str, recipients: list[str], **custom: Any) -> int:
        """A custom event addressed to `recipients`, written straight through the store (as the ringing
        and custom-event services do), so WatchUser can be tested without those RPCs."""
        store = self.server.server.store
        assert store is not None
        sent = CustomEventSent(user_id="system", custom=custom, to_user_ids=recipients)
        now = self.server.clock()

        async def record(tx: Transaction) -> int:
            call = await tx.calls.open(cid, now)
            assert call is not None
            return call.record_event(sent, recipients)

        return await store.write(record)

    async def log(self, cid: str) -> list[event_pb2.Event]:
        """The call's whole retained log, read through WatchCall after_seq=0."""
        store = self.server.server.store
        assert store is not None
        stored = await store.read(lambda tx: tx.events.call_events_after(cid, 0, 100_000))
        return [s.event for s in stored]


def asking(request: Any, seconds: float | None) -> Any:
    """`request` with progress_interval = `seconds` (None: left unset)."""
    if seconds is not None:
        request.progress_interval.FromNanoseconds(round(seconds * 1e9))
    return request


@pytest.fixture
def api(server: RunningServer) -> Calls:
    return Calls(server)


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- WatchCall ----------------------------------------------------------------------------------------


async def test_snapshot_then_changes(api: Calls) -> None:
    call_id = new_id()
    await api.create(call_id, custom=struct({"n": 0}))
    for n in (1, 2):
        await api.update(call_id, n=n)
    stream = api.watch(call_id, snapshot=True)
    first = await stream.message()
    assert first.WhichOneof("message") == "snapshot"
    snapshot = first.snapshot
    assert snapshot.seq == 3  # created, updated, updated
    assert snapshot.call.cid == f"default:{call_id}"
    assert json_format.MessageToDict(snapshot.call.custom) == {"n": 2}
    for n in (3, 4, 5):
        await api.update(call_id, n=n)
    received = await stream.events(3)
    assert [e.seq for e in received] == [4, 5, 6]
    assert [custom_of(e)["n"] for e in received] == [3, 4, 5]
    assert all(e.type == "call.updated" and e.call_cid == f"default:{call_id}" for e in received)
    stream.cancel()


async def test_snapshot_races_with_writers(api: Calls) -> None:
    """Snapshots taken while writers run: the state is the one at snapshot.seq, and the next event is
    seq + 1 (list-then-watch without the race)."""
    call_id = new_id()
    await api.create(call_id, custom=struct({"n": 0}))

    async def writer() -> None:
        for n in range(1, 21):
            await api.update(call_id, n=n)

    task = asyncio.create_task(writer())
    try:
        for _ in range(5):
            stream = api.watch(call_id, snapshot=True)
            snapshot = (await stream.message()).snapshot
            state = json_format.MessageToDict(snapshot.call.custom)
            if snapshot.seq < 21:  # the writers are not done: the next event follows the snapshot
                following = await stream.event()
                assert following.seq == snapshot.seq + 1
                assert custom_of(following)["n"] == state["n"] + 1
            stream.cancel()
            await asyncio.sleep(0.01)
    finally:
        await task
    log = await api.log(f"default:{call_id}")
    assert [e.seq for e in log] == list(range(1, 22))


async def test_after_seq_resumes_exactly(api: Calls) -> None:
    call_id = new_id()
    await api.create(call_id)
    for n in range(1, 7):
        await api.update(call_id, n=n)
    for after in (0, 1, 3, 7, 9):
        last = len(await api.log(f"default:{call_id}"))
        stream = api.watch(call_id, after_seq=after)
        got = await stream.events(last - after)
        assert [e.seq for e in got] == list(range(after + 1, last + 1))
        await stream.quiet(0.2)  # and nothing twice
        await api.update(call_id, n=100 + after)
        assert (await stream.event()).seq == last + 1
        stream.cancel()


async def test_after_seq_zero_starts_at_the_first_event(api: Calls) -> None:
    call_id = new_id()
    cid = await api.create(call_id)
    await api.update(call_id, n=1)
    stream = api.watch(call_id, after_seq=0)
    first, second = await stream.events(2)
    assert (first.seq, first.type) == (1, "call.created")
    assert first.call_created.call.cid == cid
    assert (second.seq, second.type) == (2, "call.updated")
    stream.cancel()


async def test_unset_after_seq_follows_from_now(api: Calls) -> None:
    call_id = new_id()
    await api.create(call_id)
    await api.update(call_id, n=1)
    stream = api.watch(call_id)
    progress = await stream.progress()  # the stream is set up (its resume point is read) ...
    assert progress.seq == 2
    await api.update(call_id, n=2)  # ... so this is "from now" and the earlier two are not sent
    event = await stream.event()
    assert (event.seq, custom_of(event)) == (3, {"n": 2})
    stream.cancel()


async def test_progress_on_an_idle_stream_that_asks(api: Calls) -> None:
    call_id = new_id()
    await api.create(call_id)
    stream = api.watch(call_id, after_seq=0, progress=PROGRESS)
    assert (await stream.event()).seq == 1
    progress = await stream.progress()
    assert progress.seq == 1
    assert progress.HasField("at")
    await api.update(call_id, n=1)
    assert (await stream.event()).seq == 2
    assert (await stream.progress()).seq == 2  # progress carries the new resume point
    stream.cancel()


async def test_future_after_seq_is_out_of_range(api: Calls) -> None:
    call_id = new_id()
    cid = await api.create(call_id)
    details = await expect_error(
        api.watch(call_id, after_seq=2).message(), grpc.StatusCode.OUT_OF_RANGE, "RESUME_POINT_IN_FUTURE"
    )
    assert details.metadata["cid"] == cid
    assert details.metadata["last"] == "1"
    # the last seq itself is a valid resume point
    stream = api.watch(call_id, after_seq=1, progress=PROGRESS)
    await stream.progress()
    stream.cancel()


async def test_watch_missing_call_is_not_found(api: Calls) -> None:
    await expect_error(
        api.watch(new_id("missing"), after_seq=0).message(), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND"
    )
    await expect_error(
        api.watch(new_id("missing"), snapshot=True).message(), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND"
    )


async def test_snapshot_with_after_seq_is_invalid(api: Calls) -> None:
    call_id = new_id()
    await api.create(call_id)
    await expect_error(
        api.watch(call_id, snapshot=True, after_seq=0).message(),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["after_seq"],
    )


async def test_compacted_resume_point_is_failed_precondition(backend: str, tmp_path: Path) -> None:
    async with running_server(backend, tmp_path, event_retention_seconds=60) as running:
        api = Calls(running)
        call_id = new_id()
        cid = await api.create(call_id)
        for n in range(1, 4):
            await api.update(call_id, n=n)  # seq 1..4, all old after the clock moves
        running.clock.advance(timedelta(seconds=120))
        for n in range(4, 6):
            await api.update(call_id, n=n)  # seq 5, 6: recent
        dropped = await running.server.compact_events()
        assert dropped >= 4
        for after in (0, 1, 3):
            details = await expect_error(
                api.watch(call_id, after_seq=after).message(),
                grpc.StatusCode.FAILED_PRECONDITION,
                "EVENTS_COMPACTED",
            )
            assert details.metadata["earliest_seq"] == "5"
            assert details.metadata["cid"] == cid
        # the seq right before the earliest retained one is still a valid (exact) resume point
        stream = api.watch(call_id, after_seq=4)
        assert [e.seq for e in await stream.events(2)] == [5, 6]
        stream.cancel()
        # a snapshot needs no retained events
        stream = api.watch(call_id, snapshot=True)
        assert (await stream.message()).snapshot.seq == 6
        stream.cancel()

        # the same for WatchUser and SubscribeEvents
        await api.upsert_users("old-alice")
        await api.emit_to_users(cid, ["old-alice"], k=1)
        running.clock.advance(timedelta(seconds=120))
        await api.emit_to_users(cid, ["old-alice"], k=2)
        await running.server.compact_events()
        details = await expect_error(
            api.watch_user("old-alice", after_seq=0).message(),
            grpc.StatusCode.FAILED_PRECONDITION,
            "EVENTS_COMPACTED",
        )
        assert details.metadata["earliest_seq"] == "2"
        stream = api.watch_user("old-alice", after_seq=1)
        assert (await stream.event()).user_seq == 2
        stream.cancel()
        details = await expect_error(
            api.subscribe(after_position=0).message(), grpc.StatusCode.FAILED_PRECONDITION, "EVENTS_COMPACTED"
        )
        earliest = int(details.metadata["earliest_seq"])
        stream = api.subscribe(after_position=earliest - 1)
        assert (await stream.event()).position == earliest
        stream.cancel()


# -- WatchUser ----------------------------------------------------------------------------------------


async def test_watch_user_gets_only_its_events_in_user_seq_order(api: Calls) -> None:
    alice, bob = new_id("alice"), new_id("bob")
    await api.upsert_users(alice, bob)
    call_id = new_id()
    cid = await api.create(call_id)
    live = api.watch_user(alice, after_seq=0, progress=PROGRESS)
    await live.progress()
    await api.emit_to_users(cid, [alice], k=1)
    await api.emit_to_users(cid, [bob], k=2)
    await api.update(call_id, n=1)  # addressed to nobody
    await api.emit_to_users(cid, [alice, bob], k=3)
    got = await live.events(2)
    assert [e.user_seq for e in got] == [1, 2]
    assert [json_format.MessageToDict(e.custom.custom)["k"] for e in got] == [1, 3]
    assert [e.seq for e in got] == [2, 5]  # the call's own seq travels along
    assert all(e.call_cid == cid and e.type == "custom" for e in got)
    await live.quiet(0.2)

    bobs = api.watch_user(bob, after_seq=0)  # catch-up from the log numbers by bob's own user_seq
    got = await bobs.events(2)
    assert [(e.user_seq, json_format.MessageToDict(e.custom.custom)["k"]) for e in got] == [(1, 2), (2, 3)]
    bobs.cancel()

    resumed = api.watch_user(alice, after_seq=1)
    assert (await resumed.event()).user_seq == 2
    await api.emit_to_users(cid, [alice], k=4)
    assert (await resumed.event()).user_seq == 3
    assert (await live.event()).user_seq == 3
    resumed.cancel()
    live.cancel()


async def test_watch_user_from_now_and_progress(api: Calls) -> None:
    carol = new_id("carol")
    await api.upsert_users(carol)
    cid = await api.create(new_id())
    await api.emit_to_users(cid, [carol], k=1)
    stream = api.watch_user(carol, progress=PROGRESS)
    assert (await stream.progress()).seq == 1  # the start ("now"); progress carries the user_seq
    assert (await stream.progress()).seq == 1  # then, as asked, while idle
    await api.emit_to_users(cid, [carol], k=2)
    event = await stream.event()
    assert event.user_seq == 2
    assert (await stream.progress()).seq == 2
    stream.cancel()


async def test_watch_user_errors(api: Calls) -> None:
    dave = new_id("dave")
    await api.upsert_users(dave)
    await expect_error(
        api.watch_user(new_id("nobody"), after_seq=0).message(), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"
    )
    await expect_error(
        api.watch_user(dave, after_seq=1).message(), grpc.StatusCode.OUT_OF_RANGE, "RESUME_POINT_IN_FUTURE"
    )
    await expect_error(
        api.watch_user("bad id!", after_seq=0).message(), grpc.StatusCode.INVALID_ARGUMENT, fields=["user_id"]
    )


async def test_watch_user_through_send_call_event(api: Calls) -> None:
    """The same through the public RPC (SendCallEvent)."""
    from callplane.v1 import call_data_service_pb2, call_data_service_pb2_grpc

    erin, frank = new_id("erin"), new_id("frank")
    await api.upsert_users(erin, frank)
    call_id = new_id()
    cid = await api.create(call_id, created_by_id=erin)
    stub = call_data_service_pb2_grpc.CallDataServiceStub(api.server.channel)
    stream = api.watch_user(frank, after_seq=0, progress=PROGRESS)
    await stream.progress()
    sent = await stub.SendCallEvent(
        call_data_service_pb2.SendCallEventRequest(
            type="default", id=call_id, user_id=erin, custom=struct({"hi": 1}), to_user_ids=[frank]
        )
    )
    event = await stream.event()
    assert (event.user_seq, event.seq, event.call_cid, event.type) == (1, sent.seq, cid, "custom")
    stream.cancel()


# -- SubscribeEvents ------------------------------------------------------------------------------------


async def test_subscribe_events_filters(api: Calls) -> None:
    kind_a, kind_b = new_id("ta"), new_id("tb")
    for name in (kind_a, kind_b):
        await api.types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    by_type = api.subscribe(call_types=[kind_a])
    by_cid = api.subscribe(call_cids=[f"{kind_b}:two"])
    by_event = api.subscribe(call_types=[kind_a, kind_b], event_types=["call.ended"])
    combined = api.subscribe(call_types=[kind_a], event_types=["call.updated"])
    for stream in (by_type, by_cid, by_event, combined):
        await stream.progress()

    a1 = await api.create("one", kind_a)
    b1 = await api.create("one", kind_b)
    b2 = await api.create("two", kind_b)
    await api.update("one", kind_a, n=1)
    await api.update("two", kind_b, n=1)
    await api.calls.EndCall(call_service_pb2.EndCallRequest(type=kind_b, id="one"))
    await api.calls.EndCall(call_service_pb2.EndCallRequest(type=kind_a, id="one"))

    got = await by_type.events(3)
    assert [(e.call_cid, e.type) for e in got] == [
        (a1, "call.created"),
        (a1, "call.updated"),
        (a1, "call.ended"),
    ]
    assert got[0].position < got[1].position < got[2].position
    got = await by_cid.events(2)
    assert [(e.call_cid, e.type) for e in got] == [(b2, "call.created"), (b2, "call.updated")]
    got = await by_event.events(2)
    assert [(e.call_cid, e.type) for e in got] == [(b1, "call.ended"), (a1, "call.ended")]
    got = await combined.events(1)
    assert [(e.call_cid, e.type) for e in got] == [(a1, "call.updated")]
    for stream in (by_type, by_cid, by_event, combined):
        await stream.quiet(0.2)
        stream.cancel()


async def test_subscribe_events_resumes_by_position(api: Calls) -> None:
    kind = new_id("tr")
    await api.types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=kind))
    for n in range(3):
        await api.create(f"c{n}", kind)
        await api.update(f"c{n}", kind, n=n)
    everything = api.subscribe(call_types=[kind], after_position=0, progress=PROGRESS)
    log = await everything.events(6)
    positions = [e.position for e in log]
    assert positions == sorted(positions) and len(set(positions)) == 6
    for index in range(6):
        resumed = api.subscribe(call_types=[kind], after_position=positions[index])
        rest = await resumed.events(5 - index) if index < 5 else []
        assert [e.position for e in rest] == positions[index + 1 :]
        assert [e.SerializeToString() for e in rest] == [e.SerializeToString() for e in log[index + 1 :]]
        await resumed.quiet(0.15)
        resumed.cancel()
    # progress reports how far the (filtered) log was scanned: past the events of other call types
    other = await api.create(new_id())
    await api.update(other.split(":")[1], n=1)
    last_position = (await api.log(other))[-1].position
    while (progress := await everything.progress()).seq < last_position:
        pass
    assert progress.seq >= last_position
    everything.cancel()
    # a future position is OUT_OF_RANGE
    await expect_error(
        api.subscribe(after_position=10**9).message(), grpc.StatusCode.OUT_OF_RANGE, "RESUME_POINT_IN_FUTURE"
    )


# -- progress is opt-in -----------------------------------------------------------------------------------


async def test_a_stream_that_does_not_ask_gets_no_progress(api: Calls) -> None:
    """Only the start message ("now"): then an idle stream that asked for no progress_interval gets
    nothing, even from a server that would allow one every 10 ms, until there is something to send."""
    carol = new_id("carol")
    await api.upsert_users(carol)
    call_id = new_id()
    cid = await api.create(call_id)
    streams = {
        "WatchCall": api.watch(call_id),
        "WatchUser": api.watch_user(carol),
        "SubscribeEvents": api.subscribe(call_cids=[cid]),
    }
    for stream in streams.values():
        await stream.progress()
    await asyncio.sleep(30 * MIN_PROGRESS)  # room for many progress messages, were any due
    await api.emit_to_users(cid, [carol], k=1)
    for name, stream in streams.items():
        message = await stream.message()
        assert message.WhichOneof("message") == "event", f"{name}: expected the event, got {message}"
        stream.cancel()


async def test_a_resumed_stream_with_nothing_to_send_still_starts(api: Calls) -> None:
    """A resumed stream with nothing new sends no message, but its response headers come at once: the
    client knows the stream is up (the Python client's reconnect loop waits for exactly that)."""
    dora = new_id("dora")
    await api.upsert_users(dora)
    call_id = new_id()
    cid = await api.create(call_id)
    await api.emit_to_users(cid, [dora], k=1)
    position = (await api.log(cid))[-1].position
    streams = {
        "WatchCall": api.watch(call_id, after_seq=2),
        "WatchUser": api.watch_user(dora, after_seq=1),
        "SubscribeEvents": api.subscribe(call_cids=[cid], after_position=position),
    }
    for name, stream in streams.items():
        await asyncio.wait_for(stream.call.initial_metadata(), READ_TIMEOUT)
        assert not stream.call.done(), name
    await api.emit_to_users(cid, [dora], k=2)
    assert (await streams["WatchCall"].message()).event.seq == 3
    assert (await streams["WatchUser"].message()).event.user_seq == 2
    assert (await streams["SubscribeEvents"].message()).event.position > position
    for stream in streams.values():
        stream.cancel()


def test_the_progress_interval_asked_for_is_raised_to_the_server_minimum() -> None:
    assert progress_every(None, 1.0) is None  # not asked: no periodic progress
    assert progress_every(timedelta(0), 1.0) is None  # zero: the same
    assert progress_every(timedelta(milliseconds=10), 1.0) == 1.0
    assert progress_every(timedelta(seconds=1), 1.0) == 1.0
    assert progress_every(timedelta(seconds=30, milliseconds=500), 1.0) == 30.5


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-1, 0), (0, -1), (1, -1), (-1, 1), (0, 1_000_000_000), (315_576_000_001, 0)],
    ids=["negative", "negative-nanos", "mixed-signs", "mixed-signs-negative", "nanos-overflow", "too-long"],
)
async def test_a_bad_progress_interval_is_invalid_argument(api: Calls, seconds: int, nanos: int) -> None:
    call_id = new_id()
    await api.create(call_id)
    bad = duration_pb2.Duration(seconds=seconds, nanos=nanos)
    for stream in (
        api.watch(call_id, progress_interval=bad),
        api.watch_user("anyone", progress_interval=bad),
        api.subscribe(progress_interval=bad),
    ):
        await expect_error(stream.message(), grpc.StatusCode.INVALID_ARGUMENT, fields=["progress_interval"])


# -- hard delete -----------------------------------------------------------------------------------------


async def test_events_of_a_hard_deleted_call_still_stream(api: Calls) -> None:
    call_id = new_id()
    cid = await api.create(call_id)
    await api.update(call_id, n=1)
    open_watch = api.watch(call_id, after_seq=2, progress=PROGRESS)
    await open_watch.progress()
    firehose = api.subscribe(call_cids=[cid], after_position=0)
    await api.calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id, hard=True))

    deleted = await open_watch.event()
    assert (deleted.seq, deleted.type, deleted.call_deleted.hard) == (3, "call.deleted", True)
    open_watch.cancel()

    replay = api.watch(call_id, after_seq=0)
    got = await replay.events(3)
    assert [(e.seq, e.type) for e in got] == [(1, "call.created"), (2, "call.updated"), (3, "call.deleted")]
    await replay.quiet(0.15)
    replay.cancel()
    assert [e.type for e in await firehose.events(3)] == ["call.created", "call.updated", "call.deleted"]

    # the same cid created again continues the seq: one gap-free log per cid
    await api.create(call_id)
    recreated = await firehose.event()
    assert (recreated.seq, recreated.type) == (4, "call.created")
    firehose.cancel()
    await expect_error(
        api.watch(call_id, after_seq=5).message(), grpc.StatusCode.OUT_OF_RANGE, "RESUME_POINT_IN_FUTURE"
    )


# -- shutdown and resume on a new server ----------------------------------------------------------------


async def test_shutdown_ends_streams_with_unavailable_then_resume_is_exact(
    backend: str, tmp_path: Path
) -> None:
    async with fresh_database(backend, tmp_path) as url:
        config = Config(
            api_secret=TEST_SECRET,
            listen="127.0.0.1:0",
            database_url=url,
            data_dir=tmp_path,
            run_timers=False,
            shutdown_grace_seconds=30,
        )
        clock = TestClock()
        first = CallplaneServer(config, clock=clock)
        await first.start()
        channel = authed_channel(f"127.0.0.1:{first.port}")
        api = Calls(RunningServer(backend, first, clock, channel))
        call_id = new_id()
        cid = await api.create(call_id)
        await api.upsert_users("shut-alice")
        await api.emit_to_users(cid, ["shut-alice"], k=1)
        watch = api.watch(call_id, after_seq=0)
        user = api.watch_user("shut-alice", after_seq=0)
        firehose = api.subscribe(call_cids=[cid], after_position=0)
        assert [e.seq for e in await watch.events(2)] == [1, 2]
        assert (await user.event()).user_seq == 1
        seen_position = (await firehose.event()).position
        await api.update(call_id, n=1)
        assert (await watch.event()).seq == 3
        await firehose.events(2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.create_task(first.stop())  # the configured 30 s grace
        for stream in (watch, user, firehose):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while True:
                    message = await stream.message()
                    if stream is firehose and message.WhichOneof("message") == "event":
                        seen_position = message.event.position
            details = decode(caught.value)
            assert details.code == grpc.StatusCode.UNAVAILABLE, details
            assert details.reason == "SHUTTING_DOWN", details
        await stopping
        # streams ended at once: stop() did not wait out the grace period for them
        assert loop.time() - started < 10
        await channel.close()

        second = CallplaneServer(config, clock=clock)
        await second.start()
        try:
            channel = authed_channel(f"127.0.0.1:{second.port}")
            api = Calls(RunningServer(backend, second, clock, channel))
            await api.update(call_id, n=2)
            await api.emit_to_users(cid, ["shut-alice"], k=2)
            watch = api.watch(call_id, after_seq=3)
            assert [e.seq for e in await watch.events(2)] == [4, 5]
            await watch.quiet(0.2)
            user = api.watch_user("shut-alice", after_seq=1)
            assert (await user.event()).user_seq == 2
            await user.quiet(0.2)
            expected = [e.position for e in await api.log(cid) if e.position > seen_position]
            firehose = api.subscribe(call_cids=[cid], after_position=seen_position)
            rest = await firehose.events(len(expected))
            assert [e.position for e in rest] == expected
            await firehose.quiet(0.2)
            for stream in (watch, user, firehose):
                stream.cancel()
            await channel.close()
        finally:
            await second.stop(grace=0)


async def test_streams_on_a_stopped_hub_fail_fast(backend: str, tmp_path: Path) -> None:
    """A stream opened while the server is draining ends at once with UNAVAILABLE (it never hangs)."""
    async with running_server(backend, tmp_path) as running:
        api = Calls(running)
        call_id = new_id()
        await api.create(call_id)
        hub = running.server.hub
        assert hub is not None
        await hub.close()
        stream = api.watch(call_id, after_seq=0)

        async def drain() -> None:
            while True:
                await stream.message(wait=5)

        details = await expect_error(drain(), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        assert details.metadata["resume_after"] == "1"


# -- memory bound for a watcher that never reads (acceptance 3) -----------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _c_heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc mallinfo2: small blocks + mmapped
    blocks). This is where upb keeps protobuf messages and gRPC keeps its buffers, which tracemalloc does
    not see. None where mallinfo2 is missing (not glibc >= 2.33)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


MEMORY_QUEUE_SIZE = 8
MEMORY_WRITERS = 4
MEMORY_WRITES_PER_WRITER = 25
MEMORY_BLOB_BYTES = 100_000  # the server below allows 128 KB of call custom data


async def test_a_watcher_that_never_reads_cannot_grow_server_memory(backend: str, tmp_path: Path) -> None:
    async with running_server(
        backend,
        tmp_path,
        event_queue_size=MEMORY_QUEUE_SIZE,
        min_progress_interval_seconds=MIN_PROGRESS,
        limits=Limits(max_call_custom_bytes=128_000),
    ) as running:
        hub = running.server.hub
        assert hub is not None
        api = Calls(running)
        call_id = new_id("mem")
        cid = await api.create(call_id)
        blob = "x" * MEMORY_BLOB_BYTES

        async def write_many(writer: int, count: int) -> None:
            for n in range(count):
                await api.calls.UpdateCall(
                    call_service_pb2.UpdateCallRequest(
                        type="default", id=call_id, custom=struct({"blob": blob, "w": writer, "n": n})
                    )
                )

        # Warm up caches, pools and gRPC buffers so the baseline is steady state.
        await write_many(-1, 10)
        start_seq = len(await api.log(cid))

        # The fast watcher and the slow one each get their own connection, as separate clients would.
        fast_channel = authed_channel(running.target)
        slow_channel = authed_channel(running.target, options=[("grpc.http2.bdp_probe", 0)])
        try:
            fast = StreamReader(
                event_service_pb2_grpc.EventServiceStub(fast_channel).WatchCall(
                    asking(
                        event_service_pb2.WatchCallRequest(type="default", id=call_id, after_seq=start_seq),
                        PROGRESS,
                    )
                )
            )
            slow_call = event_service_pb2_grpc.EventServiceStub(slow_channel).WatchCall(
                event_service_pb2.WatchCallRequest(type="default", id=call_id, after_seq=start_seq)
            )
            await fast.progress()
            async with asyncio.timeout(10):
                while hub.subscriber_count < 2:  # noqa: ASYNC110 (the hub has no event for this)
                    await asyncio.sleep(0.01)
            fast_seqs: list[int] = []

            async def follow_fast(until: int) -> None:
                while not fast_seqs or fast_seqs[-1] < until:
                    fast_seqs.append((await fast.event()).seq)

            gc.collect()
            tracemalloc.start()
            try:
                python_before = tracemalloc.get_traced_memory()[0]
                c_before = _c_heap_in_use()
                max_queue = 0
                peak_c = 0

                async def sample() -> None:
                    nonlocal max_queue, peak_c
                    while True:
                        for subscription in list(hub._subscriptions):
                            size = subscription.qsize()
                            assert size <= subscription.maxsize == MEMORY_QUEUE_SIZE
                            max_queue = max(max_queue, size)
                        c_now = _c_heap_in_use()
                        if c_now is not None and c_before is not None:
                            peak_c = max(peak_c, c_now - c_before)
                        await asyncio.sleep(0.02)

                sampler = asyncio.create_task(sample())
                final = start_seq + MEMORY_WRITERS * MEMORY_WRITES_PER_WRITER
                follower = asyncio.create_task(follow_fast(final))
                await asyncio.gather(
                    *(write_many(w, MEMORY_WRITES_PER_WRITER) for w in range(MEMORY_WRITERS))
                )
                await asyncio.wait_for(follower, 60)
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                gc.collect()
                python_growth = tracemalloc.get_traced_memory()[0] - python_before
                python_peak = tracemalloc.get_traced_memory()[1] - python_before
                c_after = _c_heap_in_use()
            finally:
                tracemalloc.stop()

            produced = sum(len(e.SerializeToString()) for e in await api.log(cid) if e.seq > start_seq)
            print(
                f"\n[{backend}] produced {produced / 1e6:.1f} MB in {final - start_seq} events; "
                f"max queue {max_queue}/{MEMORY_QUEUE_SIZE}; python heap growth {python_growth / 1e6:.2f} MB "
                f"(peak {python_peak / 1e6:.2f} MB); C heap growth "
                f"{((c_after or 0) - (c_before or 0)) / 1e6:.2f} MB (peak {peak_c / 1e6:.2f} MB)"
            )

            # The other watcher received every event, in order, while the slow one read nothing.
            assert fast_seqs == list(range(start_seq + 1, final + 1))
            # The slow subscriber's queue never went past its bound; it overflowed (and was emptied).
            slow_subscriptions = [s for s in hub._subscriptions if s.overflowed]
            assert slow_subscriptions, "the slow watcher's queue never overflowed"
            # The bound. While it does not read, the server holds for the slow watcher at most its queue
            # (MEMORY_QUEUE_SIZE events of ~100 KB = 0.8 MB), the one event its handler is blocked on in
            # `yield`, and what gRPC accepted before HTTP/2 flow control stopped it (one 64 KB stream
            # window): about 1 MB. We allow 4 MB on the C heap (where upb keeps messages and gRPC its
            # buffers; tracemalloc does not see them) for allocator and pool noise, and 2 MB on the
            # Python heap. A server that kept everything for the slow watcher grows by about what was
            # produced (10 MB; measured 11 MB with the queue made unbounded), so the bounds must stay
            # well under that for the test to mean something.
            c_bound, python_bound = 4_000_000, 2_000_000
            assert produced >= 2 * c_bound
            assert python_growth < python_bound, f"python heap grew {python_growth} bytes"
            if c_before is not None and c_after is not None:
                assert c_after - c_before < c_bound, f"C heap grew {c_after - c_before} bytes"

            # Then the slow watcher reads, and still gets everything, gap-free (the rest from the log).
            slow = StreamReader(slow_call)
            slow_seqs = [e.seq for e in await slow.events(final - start_seq, wait=30)]
            assert slow_seqs == list(range(start_seq + 1, final + 1))
            await slow.quiet(0.2)
            fast.cancel()
            slow.cancel()
        finally:
            await fast_channel.close()
            await slow_channel.close()
