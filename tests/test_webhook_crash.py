"""Webhook delivery survives `kill -9` (issue 14, acceptance point 2).

Real `callplane serve` processes deliver to a real HTTP receiver in the test process, which answers
slowly (so that deliveries are in flight when a server is killed) and refuses some first attempts with a
503 (so that retries wait in the delivery log when it is):
- SQLite: the only server is killed while it delivers and writers write, then started again on the same
  database.
- PostgreSQL: two replicas on one database; each is killed in turn (so whichever holds the endpoint's
  lease is killed once while it delivers) and started again, while writers go on through the other.
- Both: killed once more with a backlog and every call's next event held in flight, then started again
  with nothing written after (on PostgreSQL both replicas, so the dead holder's lease has to run out).
Afterwards every event of the log that the endpoint's filters match reached the receiver at least once,
in order per call (each event first sent only after an earlier event of its call was answered), every
repeat carries the same `webhook-id` and body as the first, and every write acknowledged before a kill
is in the log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.protobuf import json_format
from sqlalchemy.engine import make_url

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from tests.support import channel, eventually, fresh_database, serve_subprocess, serving_port

CALLS = 8
CALL_TYPE = "default"
#: The endpoint's filter: call.updated only, so each call's call.created is skipped (the cursor moves
#: past events it does not send).
EVENT_TYPES = ["call.updated"]
#: Deliveries the receiver takes before (and again after) a kill.
DELIVERIES_PER_PHASE = 60
#: Writers wait while this many more updates were sent than the receiver has seen (a bounded backlog).
MAX_AHEAD = 120
#: Every write stops after this many updates per call (a bound, whatever the timing).
MAX_UPDATES_PER_CALL = 150
#: Updates per call written while the receiver holds every request (a backlog for after the crash).
BACKLOG_PER_CALL = 10
#: The first request for every event whose position is a multiple of this is answered 503 (a retry
#: waits in the delivery log, across crashes too).
REFUSE_EVERY = 19
#: Whole test, every wait included.
TEST_SECONDS = 240.0
#: A PostgreSQL replica holds the endpoint this long unless renewed (short: handover is quick).
LEASE_SECONDS = "2"


# -- the receiver ----------------------------------------------------------------------------------


@dataclass
class Receipt:
    """One request the receiver got."""

    message_id: str
    raw: bytes
    body: dict[str, Any]
    started: int  # tick when it arrived
    status: int = 0  # what the receiver answered (0: not yet)
    answered: int | None = None  # tick when its handler returned 200 (None: it never did)


class Receiver:
    """A Standard Webhooks endpoint on 127.0.0.1 that verifies signatures, records every request and
    answers each after 10..50 ms (so deliveries are in flight most of the time): 200, or 503 to the first
    request for every REFUSE_EVERY-th position."""

    def __init__(self) -> None:
        self.secret = ""
        self.receipts: list[Receipt] = []
        self.first: dict[str, Receipt] = {}
        self.bad_signatures: list[str] = []
        self.delivered: set[int] = set()  # positions answered 200
        self.refused: set[int] = set()  # positions answered 503 (once)
        self.in_flight = 0
        self.changed = asyncio.Condition()
        # Cleared: requests are held unanswered (in flight) until it is set again.
        self.gate = asyncio.Event()
        self.gate.set()
        self._ticks = itertools.count()
        self._random = random.Random(14)
        self._server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("/hook"))

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        try:
            yield self
        finally:
            await self._server.close()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        started = next(self._ticks)
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            body = standardwebhooks.Webhook(self.secret).verify(raw, headers)
        except standardwebhooks.WebhookVerificationError as error:
            self.bad_signatures.append(f"{headers.get('webhook-id')}: {error}")
            return web.Response(status=400, text="bad signature")
        receipt = Receipt(headers["webhook-id"], raw, body, started)
        self.receipts.append(receipt)
        position = int(body["position"])
        refuse = position % REFUSE_EVERY == 0 and receipt.message_id not in self.first
        self.first.setdefault(receipt.message_id, receipt)
        self.in_flight += 1
        try:
            await self.gate.wait()
            await asyncio.sleep(self._random.uniform(0.01, 0.05))
            receipt.status = 503 if refuse else 200
            if refuse:
                self.refused.add(position)
            else:
                receipt.answered = next(self._ticks)
                self.delivered.add(position)
        finally:
            self.in_flight -= 1
        async with self.changed:
            self.changed.notify_all()
        return web.Response(status=receipt.status, text="try again" if refuse else "")

    def distinct(self) -> int:
        return len(self.first)


# -- the servers -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Server:
    """One `callplane serve` process and a channel to it."""

    name: str
    process: asyncio.subprocess.Process
    port: int
    channel: grpc.aio.Channel
    log: Path
    drain: asyncio.Task[None]

    @property
    def calls(self) -> call_service_pb2_grpc.CallServiceStub:
        return call_service_pb2_grpc.CallServiceStub(self.channel)

    @property
    def events(self) -> event_service_pb2_grpc.EventServiceStub:
        return event_service_pb2_grpc.EventServiceStub(self.channel)

    @property
    def webhooks(self) -> webhook_service_pb2_grpc.WebhookServiceStub:
        return webhook_service_pb2_grpc.WebhookServiceStub(self.channel)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed or released. (The channel stays open until stop(): the
        calls in flight on it fail as a client sees a crash, UNAVAILABLE, rather than cancelled here.)"""
        self.process.kill()
        await self.process.wait()
        await self.drain

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        await self.channel.close()
        await self.drain


async def _keep_log(stream: asyncio.StreamReader, path: Path) -> None:
    """Writes a server's log to a file (reading it also keeps the pipe from filling up)."""
    with path.open("ab") as out:
        while line := await stream.readline():
            out.write(line)
            out.flush()


class Servers:
    """Starts servers on one database, each with a data dir of its own (by name)."""

    def __init__(self, database_url: str, folder: Path) -> None:
        self.database_url = database_url
        self.folder = folder
        self.running: list[Server] = []

    async def start(self, name: str) -> Server:
        data_dir = self.folder / f"data-{name}"
        process = await serve_subprocess(
            data_dir, "--database-url", self.database_url, "--webhook-allow-private"
        )
        port, lines = await serving_port(process)
        log = self.folder / f"server-{name}.log"
        with log.open("a") as out:
            out.writelines(lines)
        assert process.stderr is not None
        drain = asyncio.get_running_loop().create_task(_keep_log(process.stderr, log))
        server = Server(name, process, port, channel(f"127.0.0.1:{port}"), log, drain)
        self.running.append(server)
        return server

    async def stop_all(self) -> None:
        for server in self.running:
            await server.stop()


# -- the writers -----------------------------------------------------------------------------------


@dataclass
class Writers:
    """One writer per call, each sending UpdateCall with custom {"n": 0, 1, ...} through the `targets` in
    turn; a write that fails (its server was killed) may or may not have happened."""

    cids: list[str]
    receiver: Receiver
    targets: list[Server]
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    acknowledged: set[tuple[str, int]] = field(default_factory=set)
    unacknowledged: set[tuple[str, int]] = field(default_factory=set)
    attempted: int = 0
    next_n: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ready.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for cid in self.cids:
                group.create_task(self._write(cid))

    async def _write(self, cid: str) -> None:
        call_id = cid.split(":", 1)[1]
        while not self.stop.is_set() and self.next_n.get(cid, 0) < MAX_UPDATES_PER_CALL:
            await self.ready.wait()
            # A bounded backlog: the receiver must keep up (it does again once delivery resumes).
            async with self.receiver.changed:
                await self.receiver.changed.wait_for(
                    lambda: self.stop.is_set() or self.attempted - self.receiver.distinct() < MAX_AHEAD
                )
            if self.stop.is_set():
                return
            await self.update(cid, call_id, self.targets[self.next_n.get(cid, 0) % len(self.targets)])

    async def update(self, cid: str, call_id: str, target: Server) -> bool:
        n = self.next_n.get(cid, 0)
        self.next_n[cid] = n + 1
        self.attempted += 1
        request = call_service_pb2.UpdateCallRequest(type=CALL_TYPE, id=call_id)
        request.custom.update({"n": n})
        try:
            await target.calls.UpdateCall(request, timeout=30)
        except grpc.aio.AioRpcError:
            self.unacknowledged.add((cid, n))
            return False
        self.acknowledged.add((cid, n))
        return True


# -- helpers ---------------------------------------------------------------------------------------


async def _create_webhook(server: Server, receiver: Receiver) -> str:
    created = await server.webhooks.CreateWebhook(
        webhook_service_pb2.CreateWebhookRequest(
            url=receiver.url, event_types=EVENT_TYPES, call_types=[CALL_TYPE], description="crash test"
        )
    )
    receiver.secret = created.secret
    return created.webhook.id


async def _create_calls(server: Server) -> list[str]:
    cids = []
    for index in range(CALLS):
        response = await server.calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(type=CALL_TYPE, id=f"crash-{index}")
        )
        cids.append(response.call.cid)
    return cids


async def _read_log(server: Server) -> list[event_pb2.Event]:
    """Every event of the log, from the first (SubscribeEvents from position 0 up to the position the
    server reports now)."""
    now = server.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest())
    start = await now.read()
    now.cancel()
    assert start.WhichOneof("message") == "progress", start
    last = start.progress.seq
    events: list[event_pb2.Event] = []
    if last == 0:
        return events
    stream = server.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest(after_position=0))
    try:
        async for message in stream:
            if message.WhichOneof("message") == "event":
                events.append(message.event)
                if message.event.position >= last:
                    break
    finally:
        stream.cancel()
    assert [event.position for event in events] == list(range(1, last + 1)), "the log has gaps"
    return events


async def _until(check: Callable[[], bool], seconds: float = 60.0) -> None:
    async def poll() -> bool:
        return check()

    await eventually(poll, seconds=seconds)


async def _deliveries_in_flight_after(receiver: Receiver, count: int) -> None:
    """Returns (without yielding to the loop afterwards) once the receiver saw `count` distinct events, is
    answering at least one, and refused one not yet delivered: a kill that follows at once catches
    deliveries in flight and a retry waiting."""
    await _until(
        lambda: (
            receiver.distinct() >= count
            and receiver.in_flight > 0
            and bool(receiver.refused - receiver.delivered)
        )
    )


async def _more_deliveries(receiver: Receiver, count: int) -> None:
    """Waits until `count` more events (not repeats) reached the receiver."""
    mark = receiver.distinct()
    await _until(lambda: receiver.distinct() >= mark + count)


def _matches(event: event_pb2.Event, created_after: int) -> bool:
    """The endpoint's filters, and only events after it was created."""
    return (
        event.position > created_after
        and event.type in EVENT_TYPES
        and event.call_cid.split(":", 1)[0] == CALL_TYPE
    )


def _check(
    receiver: Receiver, log: list[event_pb2.Event], writers: Writers, created_after: int
) -> dict[str, int]:
    """The guarantees, checked on what the receiver got and what the log holds."""
    assert not receiver.bad_signatures, receiver.bad_signatures[:5]
    # Writes acknowledged before (and after) the kills are all in the log, each once.
    written = [
        (event.call_cid, int(event.call_updated.call.custom["n"]))
        for event in log
        if event.type == "call.updated" and event.call_cid in writers.cids
    ]
    assert len(written) == len(set(written)), "an update is in the log twice"
    assert writers.acknowledged <= set(written), sorted(writers.acknowledged - set(written))[:5]

    expected = [event for event in log if _matches(event, created_after)]
    by_position = {event.position: event for event in expected}
    # Every event the filters match was answered 200 at least once, and nothing else was sent.
    positions_of: dict[str, int] = {}
    for receipt in receiver.receipts:
        position = int(receipt.body["position"])
        assert positions_of.setdefault(receipt.message_id, position) == position, (
            f"{receipt.message_id} sent for positions {positions_of[receipt.message_id]} and {position}"
        )
    received = set(positions_of.values())
    assert received <= set(by_position), sorted(received - set(by_position))[:5]
    assert set(by_position) <= receiver.delivered, sorted(set(by_position) - receiver.delivered)[:5]
    assert len(set(positions_of)) == len(received), "one event under two webhook-ids"
    # Each body is the event's proto3 JSON, and a repeat is byte for byte the first one.
    for message_id, first in receiver.first.items():
        assert first.body == json_format.MessageToDict(by_position[int(first.body["position"])]), message_id
    for receipt in receiver.receipts:
        assert receipt.raw == receiver.first[receipt.message_id].raw, receipt.message_id
    # Per call: first sent in seq order, each only after an earlier event of its call was answered.
    receipts_at: dict[int, list[Receipt]] = defaultdict(list)
    for receipt in receiver.receipts:
        receipts_at[int(receipt.body["position"])].append(receipt)
    per_call: dict[str, list[event_pb2.Event]] = defaultdict(list)
    for event in expected:
        per_call[event.call_cid].append(event)
    for cid, events in per_call.items():
        firsts = [min(receipts_at[event.position], key=lambda r: r.started) for event in events]
        assert [r.started for r in firsts] == sorted(r.started for r in firsts), f"{cid}: out of order"
        seqs = [int(r.body["seq"]) for r in firsts]
        assert seqs == [event.seq for event in events] and seqs == sorted(set(seqs)), cid
        for before, after in itertools.pairwise(events):
            answered = [r.answered for r in receipts_at[before.position] if r.answered is not None]
            assert answered and min(answered) < firsts[events.index(after)].started, (
                f"{cid}: seq {after.seq} sent before seq {before.seq} was answered"
            )
    return {
        "events": len(expected),
        "requests": len(receiver.receipts),
        "repeats": len(receiver.receipts) - len(receiver.first),
        "refused": sum(1 for receipt in receiver.receipts if receipt.status == 503),
        "unacknowledged": len(writers.unacknowledged),
    }


async def _delivered_position(server: Server, webhook_id: str) -> int:
    response = await server.webhooks.GetWebhook(webhook_service_pb2.GetWebhookRequest(id=webhook_id))
    assert response.webhook.state == webhook_service_pb2.WEBHOOK_STATE_ACTIVE, response.webhook
    return response.webhook.delivered_position


async def _hold_backlog(receiver: Receiver, writers: Writers, server: Server) -> None:
    """Writes BACKLOG_PER_CALL updates per call through `server` while the receiver answers nothing, and
    returns once the head of every call is in flight (held): a kill then leaves a backlog behind."""
    receiver.gate.clear()

    async def write(cid: str) -> None:
        for _ in range(BACKLOG_PER_CALL):
            assert await writers.update(cid, cid.split(":", 1)[1], server)

    await asyncio.gather(*(write(cid) for cid in writers.cids))
    await _until(lambda: receiver.in_flight >= len(writers.cids))


async def _finish(
    server: Server, receiver: Receiver, writers: Writers, webhook_id: str, created_after: int
) -> dict[str, int]:
    """With nothing written any more: every event reaches the receiver and the endpoint's cursor, and
    the guarantees hold."""
    log = await _read_log(server)
    matching = {event.position for event in log if _matches(event, created_after)}
    with contextlib.suppress(AssertionError):  # _check says what is missing
        await _until(lambda: matching <= receiver.delivered)
    figures = _check(receiver, log, writers, created_after)
    last = log[-1].position

    async def cursor_at_end() -> bool:
        return await _delivered_position(server, webhook_id) >= last

    await eventually(cursor_at_end, seconds=30)
    return figures


async def _position_now(server: Server) -> int:
    stream = server.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest())
    start = await stream.read()
    stream.cancel()
    return start.progress.seq


async def _with_writers(writers: Writers, body: Callable[[], Awaitable[None]]) -> None:
    """Runs the writers alongside `body`, then stops them (a writer that fails fails the test at once)."""
    writing = asyncio.create_task(writers.run())
    acting = asyncio.create_task(body())
    try:
        await asyncio.wait({writing, acting}, return_when=asyncio.FIRST_COMPLETED)
        if not acting.done():
            writing.result()  # raises what a writer raised (else they all wrote their share)
        await acting
    finally:
        acting.cancel()
        writers.stop.set()
        writers.ready.set()
        async with writers.receiver.changed:
            writers.receiver.changed.notify_all()
        await writing


# -- the tests -------------------------------------------------------------------------------------


async def test_sqlite_server_killed_mid_delivery_redelivers_everything_in_order(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(TEST_SECONDS),
        fresh_database("sqlite", tmp_path) as url,
        Receiver().serving() as receiver,
    ):
        servers = Servers(url, tmp_path)
        try:
            server = await servers.start("only")
            webhook_id = await _create_webhook(server, receiver)
            created_after = await _position_now(server)
            writers = Writers(await _create_calls(server), receiver, [server])

            async def kill_and_restart() -> None:
                nonlocal server
                await _deliveries_in_flight_after(receiver, DELIVERIES_PER_PHASE)
                writers.ready.clear()
                in_flight = receiver.in_flight
                await server.kill()
                assert in_flight > 0
                # The same database: SQLite takes one process, started again after the crash.
                server = await servers.start("only")
                writers.targets = [server]
                writers.ready.set()
                # New events reach the receiver again (repeats of seen ones do not count).
                await _more_deliveries(receiver, DELIVERIES_PER_PHASE)

            await _with_writers(writers, kill_and_restart)
            # Killed again with a backlog and every call's head in flight; nothing is written after.
            await _hold_backlog(receiver, writers, server)
            await server.kill()
            receiver.gate.set()
            server = await servers.start("only")
            figures = await _finish(server, receiver, writers, webhook_id, created_after)
        finally:
            await servers.stop_all()
    print(f"sqlite: {figures}")


async def _claimed_by(database_url: str, webhook_id: str) -> str | None:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval("SELECT claimed_by FROM webhooks WHERE id = $1", webhook_id)  # type: ignore[no-any-return]
    finally:
        await connection.close()


async def test_postgres_replica_killed_mid_delivery_hands_over_and_redelivers_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLPLANE_WEBHOOK_LEASE_SECONDS", LEASE_SECONDS)
    async with (
        asyncio.timeout(TEST_SECONDS),
        fresh_database("postgres", tmp_path) as url,
        Receiver().serving() as receiver,
    ):
        servers = Servers(url, tmp_path)
        try:
            replicas = {"a": await servers.start("a"), "b": await servers.start("b")}
            webhook_id = await _create_webhook(replicas["a"], receiver)
            created_after = await _position_now(replicas["a"])
            writers = Writers(await _create_calls(replicas["a"]), receiver, list(replicas.values()))
            holders: list[str | None] = []

            async def kill_each_in_turn() -> None:
                # Whichever replica holds the endpoint, it is killed once while it delivers.
                # Writers write through both; those in flight through the victim fail, and the next go
                # through the survivor.
                for victim, survivor in (("a", "b"), ("b", "a")):
                    await _deliveries_in_flight_after(receiver, receiver.distinct() + DELIVERIES_PER_PHASE)
                    in_flight = receiver.in_flight
                    await replicas[victim].kill()
                    writers.targets = [replicas[survivor]]
                    assert in_flight > 0
                    holders.append(await _claimed_by(url, webhook_id))
                    # Deliveries go on: at once if the survivor held the endpoint, else once it takes over.
                    await _more_deliveries(receiver, DELIVERIES_PER_PHASE)
                    holders.append(await _claimed_by(url, webhook_id))
                    replicas[victim] = await servers.start(victim)
                    writers.targets = list(replicas.values())

            await _with_writers(writers, kill_each_in_turn)
            # Both killed with a backlog and every call's head in flight, then both started again (the
            # dead holder's lease runs out first); nothing is written after.
            await _hold_backlog(receiver, writers, replicas["a"])
            for name in ("a", "b"):
                await replicas[name].kill()
            receiver.gate.set()
            for name in ("a", "b"):
                replicas[name] = await servers.start(name)
            figures = await _finish(replicas["a"], receiver, writers, webhook_id, created_after)
        finally:
            await servers.stop_all()
    # The lease moved from a killed holder to the survivor at least once.
    assert len(set(holders)) > 1, holders
    print(f"postgres: {figures}, holders {holders}")
