"""Presence held by WatchCall streams: one lease per replica, not one per participant.

A stream opened with a participant_session_id takes hold of the participant for its replica (server
process): the participant's own lease and lease timer go, and the replica renews one `replica_lease`
timer (one statement per tick, whatever the number of participants). When a replica stops renewing
(killed, or shut down), whichever replica fires its lease gives its participants leases of their own
that have run out, and they are removed as `lease_expired`, unless a stream on another replica or a
KeepAlive took them over first. A client that vanishes without closing its connection is found by
HTTP/2 keepalive pings, which ends its stream and so its presence."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import event

from callplane.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from callplane_server.services.session_rules import REPLICA_TIMER
from tests.support import TEST_SECRET, TestClock, eventually, fresh_database, running_server
from tests.support import channel as authed_channel

SHORT_LEASE = 0.3


def _stubs(channel) -> tuple:
    return (
        user_pb2_grpc.UserServiceStub(channel),
        session_service_pb2_grpc.SessionServiceStub(channel),
        event_service_pb2_grpc.EventServiceStub(channel),
    )


async def _join(sessions, call_id: str, user_id: str, psid: str) -> None:
    await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default", id=call_id, user_id=user_id, participant_session_id=psid, create=True
        )
    )


def _watch(events, call_id: str, psid: str):
    return events.WatchCall(
        event_service_pb2.WatchCallRequest(type="default", id=call_id, participant_session_id=psid)
    )


async def _live(sessions, call_id: str) -> dict:
    """The call's live participants by participant_session_id."""
    listing = await sessions.QueryCallParticipants(
        session_service_pb2.QueryCallParticipantsRequest(type="default", id=call_id)
    )
    return {p.participant_session_id: p for p in listing.participants}


async def _held(sessions, call_id: str, psids: set[str]) -> bool:
    """Every one of `psids` is live and held by a stream (no lease of its own)."""
    live = await _live(sessions, call_id)
    return psids <= set(live) and not any(live[p].HasField("lease_expires_at") for p in psids)


async def _run_timers(server: CallplaneServer) -> None:
    """Fires what is due, and what that made due (a replica's lease releases its participants' leases)."""
    assert server.timers is not None
    while await server.timers.run_due():
        pass


async def _pending(server: CallplaneServer, call_cid: str) -> list[tuple[str, str]]:
    assert server.store is not None
    timers = await server.store.read(lambda tx: tx.timers.pending(call_cid))
    return [(t.kind, t.key) for t in timers]


async def test_stream_held_participants_outlive_their_leases(backend: str, tmp_path: Path) -> None:
    """Held participants have no lease timers of their own; one replica lease keeps them all, also past
    many lease periods and a stall longer than the lease (the replica's own lease firing on itself)."""
    async with running_server(backend, tmp_path, lease_ttl_seconds=SHORT_LEASE) as running:
        users, sessions, events = _stubs(running.channel)
        people = [f"held-{index}" for index in range(6)]
        await users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=p) for p in people])
        )
        streams, by_call = [], {"held-a": set(), "held-b": set()}
        for index, person in enumerate(people):
            call_id = "held-a" if index % 2 else "held-b"
            psid = f"{person}-conn"
            await _join(sessions, call_id, person, psid)
            stream = _watch(events, call_id, psid)
            await asyncio.wait_for(stream.read(), 10)
            streams.append(stream)
            by_call[call_id].add(psid)
        for call_id, psids in by_call.items():
            await eventually(lambda call_id=call_id, psids=psids: _held(sessions, call_id, psids), seconds=10)
            assert [kind for kind, _ in await _pending(running.server, f"default:{call_id}")] == []
        assert await _pending(running.server, "") == [(REPLICA_TIMER, running.server.sessions.replica_id)]

        for _ in range(5):
            # The clock jumps past the replica's lease: the lease fires on the replica itself, which is
            # alive, and renews it.
            running.clock.advance(timedelta(seconds=SHORT_LEASE * 3))
            await _run_timers(running.server)
        for call_id, psids in by_call.items():
            assert set(await _live(sessions, call_id)) == psids
        for stream in streams:
            stream.cancel()


async def test_renewing_the_replica_lease_is_one_statement_whatever_the_number_held(
    backend: str, tmp_path: Path
) -> None:
    async with running_server(backend, tmp_path) as running:
        users, sessions, events = _stubs(running.channel)
        people = [f"many-{index}" for index in range(40)]
        await users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=p) for p in people])
        )
        streams = []
        for index, person in enumerate(people):
            await _join(sessions, f"many-{index % 8}", person, person)
            streams.append(_watch(events, f"many-{index % 8}", person))
        for stream in streams:
            await asyncio.wait_for(stream.read(), 10)
        for index in range(8):
            expected = {p for i, p in enumerate(people) if i % 8 == index}
            await eventually(
                lambda index=index, expected=expected: _held(sessions, f"many-{index}", expected), seconds=10
            )

        store, presence = running.server.store, running.server.sessions
        assert store is not None and presence is not None
        statements: list[str] = []
        control = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b", re.IGNORECASE)

        renewing: contextvars.ContextVar[bool] = contextvars.ContextVar("renewing", default=False)

        def record(_conn, _cursor, statement: str, *_args: object) -> None:
            # Only the renewal's (the server's background reads, such as the event tailer's polls, run in
            # contexts of their own and may share the engine).
            if renewing.get() and not control.match(statement):
                statements.append(statement)

        engine = store.database.write_engine.sync_engine
        event.listen(engine, "before_cursor_execute", record)
        token = renewing.set(True)
        try:
            await store.write(lambda tx: presence._keep(tx, opened=[], beat=True))
        finally:
            renewing.reset(token)
            event.remove(engine, "before_cursor_execute", record)
        assert len(statements) == 1, statements
        for stream in streams:
            stream.cancel()


@contextlib.asynccontextmanager
async def _replicas(
    url: str, count: int, clock: TestClock, **config: object
) -> AsyncIterator[list[CallplaneServer]]:
    settings = Config(
        api_secret=TEST_SECRET,
        listen="127.0.0.1:0",
        database_url=url,
        run_timers=False,
        **config,  # type: ignore[arg-type]
    )
    servers = [CallplaneServer(settings, clock=clock) for _ in range(count)]
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.stop(grace=0)


async def _hold_on(server: CallplaneServer, call_id: str, person: str, *, join: bool):
    """Opens `person`'s holding stream on `server` (joining first when asked); returns (channel, stream)."""
    channel = authed_channel(f"127.0.0.1:{server.port}")
    users, sessions, events = _stubs(channel)
    if join:
        await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=person)]))
        await _join(sessions, call_id, person, person)
    stream = _watch(events, call_id, person)
    await asyncio.wait_for(stream.read(), 10)
    return channel, stream


async def test_a_replica_that_stops_renewing_loses_what_it_held_to_another(tmp_path: Path) -> None:
    """Two replicas on PostgreSQL: A holds three participants and stops (as a killed process would, it
    renews nothing more and nobody leaves). Before A's lease runs out, one client reconnects its stream
    to B and one renews with KeepAlive through B: those stay; the third is removed by B when A's lease
    runs out, as lease_expired."""
    clock = TestClock()
    async with (
        fresh_database("postgres", tmp_path) as url,
        _replicas(url, 2, clock, lease_ttl_seconds=30.0) as (a, b),
    ):
        opened = [await _hold_on(a, "split", person, join=True) for person in ("gone", "moved", "alive")]
        b_channel = authed_channel(f"127.0.0.1:{b.port}")
        _, b_sessions, _ = _stubs(b_channel)
        await eventually(lambda: _held(b_sessions, "split", {"gone", "moved", "alive"}), seconds=10)
        await a.stop(grace=0)
        for channel, _stream in opened:
            await channel.close()
        assert set(await _live(b_sessions, "split")) == {"gone", "moved", "alive"}  # nobody left

        moved_channel, moved_stream = await _hold_on(b, "split", "moved", join=False)
        clock.advance(timedelta(seconds=10))
        await _run_timers(b)
        assert set(await _live(b_sessions, "split")) == {"gone", "moved", "alive"}  # A's lease still runs
        await b_sessions.KeepAlive(
            session_service_pb2.KeepAliveRequest(type="default", id="split", participant_session_id="alive")
        )

        clock.advance(timedelta(seconds=25))  # past A's lease, within alive's own
        await _run_timers(b)
        live = await _live(b_sessions, "split")
        assert set(live) == {"moved", "alive"}
        assert not live["moved"].HasField("lease_expires_at")  # held by B's stream
        assert live["alive"].HasField("lease_expires_at")  # its own lease, renewed by KeepAlive
        assert b.store is not None
        log = await b.store.read(lambda tx: tx.events.call_events_after("default:split", 0, 1000))
        left = [e.event for e in log if e.event.type == "call.session_participant_left"]
        assert [
            (
                e.call_session_participant_left.participant.participant_session_id,
                e.call_session_participant_left.reason,
            )
            for e in left
        ] == [("gone", "lease_expired")]
        assert await _pending(b, "") == [(REPLICA_TIMER, b.sessions.replica_id)]
        moved_stream.cancel()
        await moved_channel.close()
        await b_channel.close()


async def test_after_a_restart_the_previous_process_s_participants_expire(tmp_path: Path) -> None:
    """One process on SQLite, stopped with streams open (as a crash would leave it: nobody left) and
    started again: the new process has a new replica id, and removes what the old one held when the old
    lease runs out, except a participant whose client reconnected its stream to the new process."""
    clock = TestClock()
    async with fresh_database("sqlite", tmp_path) as url:
        async with _replicas(url, 1, clock, lease_ttl_seconds=30.0, data_dir=tmp_path) as (first,):
            for person in ("gone", "back"):
                channel, _stream = await _hold_on(first, "restart", person, join=True)
            _, sessions, _ = _stubs(channel)
            await eventually(lambda: _held(sessions, "restart", {"gone", "back"}), seconds=10)
            old_replica = first.sessions.replica_id
        async with _replicas(url, 1, clock, lease_ttl_seconds=30.0, data_dir=tmp_path) as (second,):
            assert second.sessions.replica_id != old_replica
            channel, stream = await _hold_on(second, "restart", "back", join=False)
            _, sessions, _ = _stubs(channel)
            clock.advance(timedelta(seconds=31))
            await _run_timers(second)
            live = await _live(sessions, "restart")
            assert set(live) == {"back"}
            stream.cancel()
            await channel.close()


class _Blackhole:
    """A TCP relay that can go silent: it stops passing bytes both ways but keeps both sockets open, as a
    client whose network vanished would (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self.silent = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [client_writer, server_writer]
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self._tasks.add(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.silent.is_set():
                continue  # swallowed: the peer never hears of it
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


async def test_a_client_that_vanishes_leaves_through_keepalive(tmp_path: Path) -> None:
    """The server pings connections with open calls every lease/3 and drops one whose pings go
    unanswered for another lease/3: the holding stream ends, and its participant leaves as
    "disconnected", well within the lease, although the client never closed anything."""
    async with running_server("sqlite", tmp_path, lease_ttl_seconds=3.0) as running:
        users, sessions, _events = _stubs(running.channel)
        await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id="faraway")]))
        await _join(sessions, "vanish", "faraway", "faraway")
        relay = _Blackhole(running.server.port)
        port = await relay.start()
        channel = authed_channel(f"127.0.0.1:{port}")
        try:
            stream = _watch(event_service_pb2_grpc.EventServiceStub(channel), "vanish", "faraway")
            await asyncio.wait_for(stream.read(), 10)
            await eventually(lambda: _held(sessions, "vanish", {"faraway"}), seconds=10)
            # Idle for a few ping intervals first: pings go on while the stream sends nothing.
            await asyncio.sleep(2.5)
            relay.silent.set()

            async def gone() -> bool:
                return "faraway" not in await _live(sessions, "vanish")

            await eventually(gone, seconds=20)
            assert running.server.store is not None
            log = await running.server.store.read(
                lambda tx: tx.events.call_events_after("default:vanish", 0, 100)
            )
            left = [e.event for e in log if e.event.type == "call.session_participant_left"]
            assert [e.call_session_participant_left.reason for e in left] == ["disconnected"]
            stream.cancel()
        finally:
            await channel.close(grace=0)
            await relay.close()


async def test_the_replica_lease_is_renewed_while_every_pooled_connection_is_busy(tmp_path: Path) -> None:
    """PostgreSQL: an overloaded replica's RPC writes can hold every pooled connection for seconds; its
    lease renewal has a connection of its own, so it never waits behind them (another replica would
    otherwise take it for dead and expire everything it holds)."""
    async with running_server("postgres", tmp_path) as running:
        store, presence = running.server.store, running.server.sessions
        assert store is not None and presence is not None
        release = asyncio.Event()
        busy = 0

        async def hold_a_connection(tx) -> None:
            nonlocal busy
            await tx.events.last_position()  # a connection is taken at the first statement
            busy += 1
            await release.wait()

        pool = store.database.write_engine.pool
        size = pool.size() + pool._max_overflow  # type: ignore[attr-defined]
        holders = [asyncio.create_task(store.write(hold_a_connection)) for _ in range(size)]
        try:
            await eventually(lambda: asyncio.sleep(0, busy == size), seconds=10)
            await asyncio.wait_for(
                store.write(lambda tx: presence._keep(tx, opened=[], beat=True), upkeep=True), 10
            )
        finally:
            release.set()
            await asyncio.gather(*holders)
        renewed = await store.read(lambda tx: tx.timers.pending(""))
        assert [(t.kind, t.key) for t in renewed] == [(REPLICA_TIMER, presence.replica_id)]
