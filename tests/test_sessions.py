"""SessionService: joins, leaves, leases and presence, the inactivity / max-duration / lease timers (driven by
the injected clock and run_due, never by sleeps), backstage, and the participant and session queries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_type_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    query_pb2,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from tests.errors import expect_error
from tests.support import (
    LONG_LEASE_TTL,
    TEST_SECRET,
    RunningServer,
    TestClock,
    eventually,
    fresh_database,
    struct,
)
from tests.support import channel as authed_channel

LEASE_TTL = LONG_LEASE_TTL
INACTIVITY = 30  # the default call type's session.inactivity_timeout_seconds

AUDIO = session_pb2.TRACK_TYPE_AUDIO
VIDEO = session_pb2.TRACK_TYPE_VIDEO
SCREEN = session_pb2.TRACK_TYPE_SCREEN_SHARE


@pytest.fixture(scope="module")
def server(long_lease_server: RunningServer) -> RunningServer:
    return long_lease_server


@pytest.fixture(scope="module")
def watch(server: RunningServer) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(server.channel)


# --- helpers ------------------------------------------------------------------------------------------


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def at(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def limits(**values: int) -> call_type_pb2.CallSettings:
    return call_type_pb2.CallSettings(limits=call_type_pb2.LimitsSettings(**values))


async def make_users(users, unique, count: int, **fields: Any) -> list[str]:
    ids = [unique("u") for _ in range(count)]
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i, **fields) for i in ids])
    )
    return ids


async def create(calls, call_id: str, call_type: str = "default", **data: Any):
    return await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=call_type, id=call_id, data=call_service_pb2.CallData(**data)
        )
    )


async def join(sessions, call_id: str, user_id: str, call_type: str = "default", **fields: Any):
    return await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(type=call_type, id=call_id, user_id=user_id, **fields)
    )


async def leave(sessions, call_id: str, psid: str, call_type: str = "default"):
    return await sessions.LeaveCall(
        session_service_pb2.LeaveCallRequest(type=call_type, id=call_id, participant_session_id=psid)
    )


async def participants(sessions, call_id: str, call_type: str = "default", **fields: Any):
    return await sessions.QueryCallParticipants(
        session_service_pb2.QueryCallParticipantsRequest(type=call_type, id=call_id, **fields)
    )


async def history(sessions, call_id: str, call_type: str = "default", **fields: Any):
    return await sessions.QueryCallSessions(
        session_service_pb2.QueryCallSessionsRequest(type=call_type, id=call_id, **fields)
    )


async def call_log(server: RunningServer, cid: str) -> list[event_pb2.Event]:
    """Every event of the call, read from the durable log."""
    assert server.server.store is not None
    stored = await server.server.store.read(lambda tx: tx.events.call_events_after(cid, 0, 10_000))
    return [item.event for item in stored]


async def events_since(server: RunningServer, cid: str, seq: int) -> list[event_pb2.Event]:
    return [e for e in await call_log(server, cid) if e.seq > seq]


def types(events: list[event_pb2.Event]) -> list[str]:
    return [e.type for e in events]


async def fire(server: RunningServer, seconds: float) -> int:
    server.clock.advance(timedelta(seconds=seconds))
    assert server.server.timers is not None
    return await server.server.timers.run_due()


# --- join / leave -------------------------------------------------------------------------------------


async def test_join_starts_session_rejoin_is_idempotent_and_leave(server, sessions, calls, users, unique):
    alice, bob = await make_users(users, unique, 2)
    call_id = unique("c")
    first = await join(
        sessions, call_id, alice, create=True, participant_session_id="alice-1", custom=struct({"mood": "ok"})
    )
    cid = f"default:{call_id}"
    assert first.call.cid == cid and first.call.ongoing is True
    assert first.call.created_by_user_id == alice  # JoinCall's create makes the joining user the creator
    assert first.session.id and first.session.call_cid == cid and first.session.HasField("started_at")
    assert not first.session.HasField("timer_ends_at")  # max_duration_seconds is 0 by default
    assert [p.participant_session_id for p in first.session.participants] == ["alice-1"]
    assert first.session.participant_count == 1
    participant = first.participant
    assert (participant.user_id, participant.role) == (alice, "user")
    assert plain(participant.custom) == {"mood": "ok"}
    assert first.lease_ttl.ToTimedelta() == timedelta(seconds=LEASE_TTL)
    assert at(participant.lease_expires_at) == at(participant.joined_at) + timedelta(seconds=LEASE_TTL)
    log = await call_log(server, cid)
    assert types(log) == [
        "call.created",
        "call.session_started",
        "call.session_participant_joined",
        "call.session_participant_count_updated",
    ]
    assert first.seq == log[-1].seq
    assert log[1].call_session_started.session.id == first.session.id
    assert log[2].call_session_participant_joined.participant.participant_session_id == "alice-1"
    counts = log[3].call_session_participant_count_updated
    assert (counts.participant_count, dict(counts.participant_count_by_role)) == (1, {"user": 1})

    again = await join(sessions, call_id, alice, participant_session_id="alice-1")
    assert again.participant.joined_at == participant.joined_at
    assert again.session.id == first.session.id
    assert again.seq == first.seq
    assert len(await call_log(server, cid)) == len(log)  # no new events

    # Someone else cannot take over that connection id.
    await expect_error(
        join(sessions, call_id, bob, participant_session_id="alice-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARTICIPANT_SESSION_ID_TAKEN",
    )
    second = await join(sessions, call_id, bob)
    assert second.participant.participant_session_id  # generated
    assert second.session.id == first.session.id
    assert second.session.participant_count == 2

    await leave(sessions, call_id, "alice-1")
    await leave(sessions, call_id, "alice-1")  # idempotent
    tail = await events_since(server, cid, second.seq)
    assert types(tail) == ["call.session_participant_left", "call.session_participant_count_updated"]
    assert tail[0].call_session_participant_left.reason == "left"
    assert tail[0].call_session_participant_left.participant.HasField("left_at")
    assert tail[1].call_session_participant_count_updated.participant_count == 1

    # A connection id that left cannot be reused in the same session; keep-alive says why.
    await expect_error(
        join(sessions, call_id, alice, participant_session_id="alice-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARTICIPANT_LEFT",
    )
    details = await expect_error(
        sessions.KeepAlive(
            session_service_pb2.KeepAliveRequest(type="default", id=call_id, participant_session_id="alice-1")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PARTICIPANT_LEFT",
    )
    assert details.metadata["left_reason"] == "left"
    await expect_error(leave(sessions, call_id, "nobody"), grpc.StatusCode.NOT_FOUND, "PARTICIPANT_NOT_FOUND")


async def test_join_validation_and_missing_things(sessions, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    await expect_error(join(sessions, call_id, alice), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    await create(calls, call_id)
    await expect_error(join(sessions, call_id, unique("ghost")), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    await expect_error(
        join(
            sessions,
            call_id,
            alice,
            participant_session_id="not ok!",
            custom=struct({"blob": "x" * 5000}),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["participant_session_id", "custom"],
    )
    await expect_error(
        sessions.JoinCall(session_service_pb2.JoinCallRequest(type="default", id=call_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["user_id"],
    )
    # create=True validates `data` like GetOrCreateCall does.
    await expect_error(
        join(
            sessions,
            unique("c"),
            alice,
            create=True,
            data=call_service_pb2.CallData(members=[call_pb2.MemberRequest(user_id="bad id")]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["data.members[0].user_id"],
    )


async def test_join_with_create_and_no_id_makes_a_new_call(sessions, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    first = await join(sessions, "", alice, create=True)
    second = await join(sessions, "", alice, create=True)
    assert first.call.id and first.call.id != second.call.id
    assert first.call.created_by_user_id == alice
    assert [p.user_id for p in first.session.participants] == [alice]
    found = await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=first.call.id))
    assert found.call.ongoing
    # Without `create` an id is required.
    await expect_error(join(sessions, "", alice), grpc.StatusCode.INVALID_ARGUMENT, fields=["id"])


async def test_member_role_and_user_role(sessions, calls, users, unique):
    host, member, admin = await make_users(users, unique, 3)
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=admin, role="admin")]))
    call_id = unique("c")
    await create(
        calls,
        call_id,
        members=[call_pb2.MemberRequest(user_id=host, role="host"), call_pb2.MemberRequest(user_id=member)],
    )
    roles = {}
    for user_id in (host, member, admin):
        roles[user_id] = (await join(sessions, call_id, user_id)).participant.role
    assert roles == {host: "host", member: "user", admin: "admin"}


async def test_session_lifecycle_on_a_watch_stream(server, sessions, watch, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    created = await create(calls, call_id)
    stream = watch.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id, snapshot=True))
    snapshot = (await asyncio.wait_for(stream.read(), 10)).snapshot
    assert snapshot.call.cid == created.call.cid and not snapshot.HasField("session")

    joined = await join(sessions, call_id, alice)
    await leave(sessions, call_id, joined.participant.participant_session_id)
    await fire(server, INACTIVITY + 1)

    received: list[event_pb2.Event] = []
    while not received or received[-1].type != "call.session_ended":
        message = await asyncio.wait_for(stream.read(), 10)
        if message.HasField("event"):
            received.append(message.event)
    stream.cancel()
    assert types(received) == [
        "call.session_started",
        "call.session_participant_joined",
        "call.session_participant_count_updated",
        "call.session_participant_left",
        "call.session_participant_count_updated",
        "call.session_ended",
    ]
    assert [e.seq for e in received] == list(range(snapshot.seq + 1, snapshot.seq + 7))
    ended = received[-1].call_session_ended.session
    assert ended.id == joined.session.id and ended.end_reason == "inactivity"
    assert [p.participant_session_id for p in ended.participants] == [
        joined.participant.participant_session_id
    ]
    assert ended.participants[0].HasField("left_at") and ended.participant_count == 0


# --- timers -------------------------------------------------------------------------------------------


async def test_inactivity_ends_session_exactly_once(server, sessions, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    cid = f"default:{call_id}"
    joined = await join(sessions, call_id, alice, create=True)
    await leave(sessions, call_id, joined.participant.participant_session_id)
    await fire(server, INACTIVITY - 1)
    assert (await participants(sessions, call_id)).session_id == joined.session.id  # not yet

    await fire(server, 2)
    await fire(server, 0)  # nothing left to fire for this call
    log = await call_log(server, cid)
    assert types(log).count("call.session_ended") == 1
    assert log[-1].type == "call.session_ended"
    listing = await participants(sessions, call_id)
    assert (listing.session_id, listing.total_participants) == ("", 0)
    call = (await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id))).call
    assert call.ongoing is False and not call.HasField("ended_at")  # the call itself goes on

    # The next join starts a new session.
    rejoined = await join(sessions, call_id, alice)
    assert rejoined.session.id != joined.session.id
    assert rejoined.call.ongoing is True


async def test_rejoin_cancels_inactivity(server, sessions, users, unique):
    alice, bob = await make_users(users, unique, 2)
    call_id = unique("c")
    first = await join(sessions, call_id, alice, create=True)
    await leave(sessions, call_id, first.participant.participant_session_id)
    await fire(server, INACTIVITY / 2)
    await join(sessions, call_id, bob)
    await fire(server, INACTIVITY * 2)
    listing = await participants(sessions, call_id)
    assert listing.session_id == first.session.id and listing.total_participants == 1
    assert "call.session_ended" not in types(await call_log(server, f"default:{call_id}"))


async def test_max_duration_ends_session_and_call(server, sessions, calls, users, unique):
    alice, bob = await make_users(users, unique, 2)
    call_id = unique("c")
    cid = f"default:{call_id}"
    await create(calls, call_id, settings_override=limits(max_duration_seconds=60))
    first = await join(sessions, call_id, alice)
    assert at(first.session.timer_ends_at) == at(first.session.started_at) + timedelta(seconds=60)
    second = await join(sessions, call_id, bob)
    assert second.session.timer_ends_at == first.session.timer_ends_at

    await fire(server, 59)
    assert (await participants(sessions, call_id)).total_participants == 2
    await fire(server, 2)
    tail = await events_since(server, cid, second.seq)
    assert types(tail) == [
        "call.session_participant_left",
        "call.session_participant_left",
        "call.session_participant_count_updated",
        "call.session_ended",
        "call.ended",
    ]
    assert {e.call_session_participant_left.reason for e in tail[:2]} == {"max_duration"}
    assert tail[2].call_session_participant_count_updated.participant_count == 0
    assert tail[3].call_session_ended.session.end_reason == "max_duration"
    assert tail[4].call_ended.reason == "max_duration"
    call = (await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id))).call
    assert call.HasField("ended_at") and call.ongoing is False
    await fire(server, 120)
    assert len(await call_log(server, cid)) == second.seq + len(tail)  # nothing fired twice
    await expect_error(join(sessions, call_id, alice), grpc.StatusCode.FAILED_PRECONDITION, "CALL_ENDED")


async def test_update_call_moves_timer_ends_at(server, sessions, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    await create(calls, call_id, settings_override=limits(max_duration_seconds=60))
    joined = await join(sessions, call_id, alice)
    started = at(joined.session.started_at)

    await calls.UpdateCall(
        call_service_pb2.UpdateCallRequest(
            type="default", id=call_id, settings_override=limits(max_duration_seconds=120)
        )
    )
    running = (await history(sessions, call_id)).sessions[0]
    assert at(running.timer_ends_at) == started + timedelta(seconds=120)
    await fire(server, 90)
    assert (await participants(sessions, call_id)).total_participants == 1  # extended: still running
    await fire(server, 31)
    assert (await participants(sessions, call_id)).total_participants == 0
    call = (await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id))).call
    assert call.HasField("ended_at")

    # Setting it to 0 removes the limit from a running session.
    other = unique("c")
    await create(calls, other, settings_override=limits(max_duration_seconds=60))
    await join(sessions, other, alice)
    await calls.UpdateCall(
        call_service_pb2.UpdateCallRequest(
            type="default", id=other, settings_override=limits(max_duration_seconds=0)
        )
    )
    assert not (await history(sessions, other)).sessions[0].HasField("timer_ends_at")
    await fire(server, 120)
    assert (await participants(sessions, other)).total_participants == 1


async def test_lease_expiry_and_keep_alive(server, sessions, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    joined = await join(sessions, call_id, alice, create=True)
    psid = joined.participant.participant_session_id
    await fire(server, LEASE_TTL / 2)
    renewed = await sessions.KeepAlive(
        session_service_pb2.KeepAliveRequest(type="default", id=call_id, participant_session_id=psid)
    )
    assert at(renewed.participant.lease_expires_at) > at(joined.participant.lease_expires_at)
    await fire(server, LEASE_TTL / 2 + 10)  # past the first lease, within the renewed one
    assert (await participants(sessions, call_id)).total_participants == 1
    await fire(server, LEASE_TTL / 2)
    assert (await participants(sessions, call_id)).total_participants == 0
    tail = await events_since(server, f"default:{call_id}", joined.seq)
    assert types(tail) == ["call.session_participant_left", "call.session_participant_count_updated"]
    assert tail[0].call_session_participant_left.reason == "lease_expired"
    # The emptied session then ends by inactivity like any other.
    await fire(server, INACTIVITY + 1)
    assert (await history(sessions, call_id)).sessions[0].end_reason == "inactivity"


async def test_stream_holds_presence_and_its_end_removes_the_participant(
    server, sessions, watch, users, unique
):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    joined = await join(sessions, call_id, alice, create=True)
    psid = joined.participant.participant_session_id
    stream = watch.WatchCall(
        event_service_pb2.WatchCallRequest(
            type="default", id=call_id, snapshot=True, participant_session_id=psid
        )
    )
    await asyncio.wait_for(stream.read(), 10)

    async def held() -> bool:
        listing = await participants(sessions, call_id)
        return not listing.participants[0].HasField("lease_expires_at")

    await eventually(held)  # the stream took hold of the presence (the participant's own lease went)
    # While the stream is open, lease expiry does not remove the participant.
    await fire(server, LEASE_TTL + 1)
    assert (await participants(sessions, call_id)).total_participants == 1

    stream.cancel()

    async def gone() -> bool:
        return (await participants(sessions, call_id)).total_participants == 0

    await eventually(gone)
    tail = await events_since(server, f"default:{call_id}", joined.seq)
    assert types(tail) == ["call.session_participant_left", "call.session_participant_count_updated"]
    assert tail[0].call_session_participant_left.reason == "disconnected"


async def test_watch_with_unknown_participant_fails(sessions, watch, calls, users, unique):
    call_id = unique("c")
    await create(calls, call_id)
    stream = watch.WatchCall(
        event_service_pb2.WatchCallRequest(type="default", id=call_id, participant_session_id="nobody")
    )

    async def drain() -> None:
        async for _ in stream:
            pass

    await expect_error(asyncio.wait_for(drain(), 10), grpc.StatusCode.NOT_FOUND, "PARTICIPANT_NOT_FOUND")


async def test_inactivity_timer_pending_across_restart(backend: str, tmp_path: Path) -> None:
    async with fresh_database(backend, tmp_path) as url:
        clock = TestClock()
        config = Config(
            api_secret=TEST_SECRET,
            listen="127.0.0.1:0",
            database_url=url,
            data_dir=tmp_path,
            run_timers=False,
        )
        first = CallplaneServer(config, clock=clock)
        port = await first.start()
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            await user_stub_upsert(channel, "alice")
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            joined = await join(stub, "kept", "alice", create=True)
            await leave(stub, "kept", joined.participant.participant_session_id)
        await first.stop(grace=0)

        # A new process on the same database, later: the pending timer fires there.
        later = TestClock(start=clock.current + timedelta(seconds=INACTIVITY + 1))
        second = CallplaneServer(config, clock=later)
        port = await second.start()
        try:
            assert second.timers is not None
            assert await second.timers.run_due() == 1
            assert await second.timers.run_due() == 0
            async with authed_channel(f"127.0.0.1:{port}") as channel:
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                found = (await history(stub, "kept")).sessions
                assert [(s.id, s.end_reason) for s in found] == [(joined.session.id, "inactivity")]
                assert at(found[0].ended_at) >= clock.current + timedelta(seconds=INACTIVITY)
        finally:
            await second.stop(grace=0)


async def user_stub_upsert(channel: grpc.aio.Channel, user_id: str) -> None:

    await user_pb2_grpc.UserServiceStub(channel).UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id)])
    )


# --- limits, ended calls, backstage -------------------------------------------------------------------


async def test_max_participants(sessions, calls, users, unique):
    alice, bob, carol = await make_users(users, unique, 3)
    call_id = unique("c")
    await create(calls, call_id, settings_override=limits(max_participants=2))
    first = await join(sessions, call_id, alice)
    await join(sessions, call_id, bob, participant_session_id="bob-1")
    details = await expect_error(
        join(sessions, call_id, carol), grpc.StatusCode.RESOURCE_EXHAUSTED, "CALL_FULL"
    )
    assert details.metadata["max_participants"] == "2"
    await join(sessions, call_id, bob, participant_session_id="bob-1")  # re-join is not a new participant
    await leave(sessions, call_id, first.participant.participant_session_id)
    assert (await join(sessions, call_id, carol)).session.participant_count == 2


async def test_end_call_removes_participants_and_refuses_joins(server, sessions, calls, users, unique):
    alice, bob = await make_users(users, unique, 2)
    call_id = unique("c")
    cid = f"default:{call_id}"
    await join(sessions, call_id, alice, create=True)
    second = await join(sessions, call_id, bob)
    await calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=call_id))
    tail = await events_since(server, cid, second.seq)
    assert types(tail) == [
        "call.session_participant_left",
        "call.session_participant_left",
        "call.session_participant_count_updated",
        "call.session_ended",
        "call.ended",
    ]
    assert {e.call_session_participant_left.reason for e in tail[:2]} == {"call_ended"}
    assert tail[3].call_session_ended.session.end_reason == "call_ended"
    assert tail[4].call_ended.call.ongoing is False
    await expect_error(join(sessions, call_id, alice), grpc.StatusCode.FAILED_PRECONDITION, "CALL_ENDED")
    # No session timer is left behind for the ended call.
    assert server.server.store is not None
    pending = await server.server.store.read(lambda tx: tx.timers.pending(cid))
    assert [t.kind for t in pending if t.kind in ("participant_lease", "session_inactivity")] == []


async def test_delete_call_ends_its_session(server, sessions, calls, users, unique):
    (alice,) = await make_users(users, unique, 1)
    soft, hard = unique("c"), unique("c")
    for call_id in (soft, hard):
        await join(sessions, call_id, alice, create=True)
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=soft))
    log = types(await call_log(server, f"default:{soft}"))
    assert log[-4:] == [
        "call.session_participant_left",
        "call.session_participant_count_updated",
        "call.session_ended",
        "call.deleted",
    ]
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=hard, hard=True))
    await expect_error(history(sessions, hard), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    await create(calls, hard)  # the id is free again, without the old sessions
    assert list((await history(sessions, hard)).sessions) == []


async def test_backstage_join_ahead_and_go_live(server, sessions, calls, users, unique):
    (viewer,) = await make_users(users, unique, 1)
    call_id = unique("c")
    cid = f"livestream:{call_id}"
    starts_at = server.clock.current + timedelta(hours=1)
    created = await create(
        calls,
        call_id,
        "livestream",
        starts_at=timestamp(starts_at),
        settings_override=call_type_pb2.CallSettings(
            backstage=call_type_pb2.BackstageSettings(join_ahead_time_seconds=600)
        ),
    )
    assert created.call.backstage is True
    details = await expect_error(
        join(sessions, call_id, viewer, "livestream"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_IN_BACKSTAGE",
    )
    assert datetime.fromisoformat(details.metadata["joinable_from"]) == starts_at - timedelta(seconds=600)
    server.clock.advance(timedelta(minutes=51))
    assert (await join(sessions, call_id, viewer, "livestream")).call.backstage is True

    other = unique("c")
    await create(calls, other, "livestream")  # no starts_at: only going live opens it
    await expect_error(
        join(sessions, other, viewer, "livestream"), grpc.StatusCode.FAILED_PRECONDITION, "CALL_IN_BACKSTAGE"
    )
    live = await sessions.GoLive(session_service_pb2.GoLiveRequest(type="livestream", id=other))
    assert live.call.backstage is False
    assert (await call_log(server, f"livestream:{other}"))[-1].type == "call.live_started"
    await join(sessions, other, viewer, "livestream")
    await expect_error(
        sessions.GoLive(session_service_pb2.GoLiveRequest(type="livestream", id=other)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_ALREADY_LIVE",
    )
    stopped = await sessions.StopLive(session_service_pb2.StopLiveRequest(type="livestream", id=other))
    assert stopped.call.backstage is True
    last = (await call_log(server, f"livestream:{other}"))[-1]
    assert last.type == "call.updated" and last.call_updated.call.backstage is True
    await expect_error(
        sessions.StopLive(session_service_pb2.StopLiveRequest(type="livestream", id=other)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_NOT_LIVE",
    )
    await expect_error(
        sessions.GoLive(session_service_pb2.GoLiveRequest(type="default", id=unique("missing"))),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )
    assert cid  # the first call stays in backstage with its early joiner


# --- tracks and queries -------------------------------------------------------------------------------


async def test_update_participant_tracks(server, sessions, users, unique):
    (alice,) = await make_users(users, unique, 1)
    call_id = unique("c")
    joined = await join(sessions, call_id, alice, create=True)
    psid = joined.participant.participant_session_id

    async def publish(*tracks: int):
        return await sessions.UpdateParticipant(
            session_service_pb2.UpdateParticipantRequest(
                type="default", id=call_id, participant_session_id=psid, published_tracks=list(tracks)
            )
        )

    updated = await publish(VIDEO, AUDIO, VIDEO)
    assert list(updated.participant.published_tracks) == [AUDIO, VIDEO]  # de-duplicated, enum order
    await publish(AUDIO, VIDEO)  # the same set: no event
    await publish()
    tail = await events_since(server, f"default:{call_id}", joined.seq)
    assert types(tail) == ["call.session_participant_updated", "call.session_participant_updated"]
    assert list(tail[0].call_session_participant_updated.participant.published_tracks) == [AUDIO, VIDEO]
    assert list(tail[1].call_session_participant_updated.participant.published_tracks) == []
    await expect_error(
        publish(AUDIO, 0, 99),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["published_tracks[1]", "published_tracks[2]"],
    )


async def test_query_call_participants(sessions, calls, users, unique):
    ids = await make_users(users, unique, 5)
    host = ids[0]
    call_id = unique("c")
    await create(calls, call_id, members=[call_pb2.MemberRequest(user_id=host, role="host")])
    tracks = {0: [AUDIO, VIDEO], 1: [VIDEO], 2: [SCREEN]}
    psids = []
    for index, user_id in enumerate(ids):
        joined = await join(sessions, call_id, user_id, custom=struct({"n": index, "team": "ab"[index % 2]}))
        psid = joined.participant.participant_session_id
        psids.append(psid)
        if index in tracks:
            await sessions.UpdateParticipant(
                session_service_pb2.UpdateParticipantRequest(
                    type="default", id=call_id, participant_session_id=psid, published_tracks=tracks[index]
                )
            )
    await leave(sessions, call_id, psids[4])
    live = psids[:4]

    async def users_of(conditions: dict[str, Any] | None = None, **fields: Any) -> list[str]:
        if conditions is not None:
            fields["filter_conditions"] = struct(conditions)
        response = await participants(sessions, call_id, **fields)
        return [p.user_id for p in response.participants]

    everyone = await participants(sessions, call_id)
    assert [p.participant_session_id for p in everyone.participants] == live  # joined_at order
    assert everyone.total_participants == 4
    assert dict(everyone.participants_by_role) == {"host": 1, "user": 3}
    assert everyone.session_id
    assert all(p.duration_seconds > 0 and p.HasField("lease_expires_at") for p in everyone.participants)

    assert await users_of({"published_tracks": "video"}) == [ids[0], ids[1]]
    assert await users_of({"published_tracks": {"$in": ["screen_share", "audio"]}}) == [ids[0], ids[2]]
    assert await users_of({"published_tracks": {"$nin": ["video"]}}) == [ids[2], ids[3]]
    assert await users_of({"published_tracks": {"$ne": "video"}}) == [ids[2], ids[3]]
    assert await users_of({"published_tracks": {"$exists": False}}) == [ids[3]]
    assert await users_of({"published_tracks": {"$contains": "screen_share"}}) == [ids[2]]
    assert await users_of({"role": "host"}) == [host]
    assert await users_of({"user_id": {"$in": [ids[1], ids[4]]}}) == [ids[1]]  # ids[4] left
    assert await users_of({"custom.team": "a", "custom.n": {"$gte": 1}}) == [ids[2]]
    by_n = await users_of(
        sort=[
            query_pb2.SortParam(
                field="custom.n", direction=query_pb2.SORT_DIRECTION_DESC, type=query_pb2.SORT_TYPE_NUMBER
            )
        ]
    )
    assert by_n == [ids[3], ids[2], ids[1], ids[0]]
    assert await users_of(
        sort=[query_pb2.SortParam(field="user_id", direction=query_pb2.SORT_DIRECTION_DESC)]
    ) == sorted(ids[:4], reverse=True)

    # A filter narrows the page, never the counts.
    filtered = await participants(sessions, call_id, filter_conditions=struct({"role": "host"}))
    assert filtered.total_participants == 4

    page1 = await participants(sessions, call_id, limit=3)
    assert len(page1.participants) == 3 and page1.next and not page1.prev
    page2 = await participants(sessions, call_id, limit=3, next=page1.next)
    assert [p.participant_session_id for p in page2.participants] == [live[3]] and not page2.next
    back = await participants(sessions, call_id, limit=3, prev=page2.prev)
    assert [p.participant_session_id for p in back.participants] == live[:3]

    await expect_error(
        participants(sessions, call_id, filter_conditions=struct({"published_tracks": "camera"})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
        fields=["filter_conditions.published_tracks"],
    )
    await expect_error(
        participants(sessions, call_id, filter_conditions=struct({"joined_at": {"$gt": "x"}})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
        fields=["filter_conditions.joined_at"],
    )
    await expect_error(
        participants(sessions, call_id, sort=[query_pb2.SortParam(field="custom")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SORT",
    )

    # No running session: empty, with zero counts.
    idle = unique("c")
    await create(calls, idle)
    empty = await participants(sessions, idle)
    assert (list(empty.participants), empty.total_participants, empty.session_id) == ([], 0, "")


async def test_query_call_sessions_history(server, sessions, calls, users, unique):
    alice, bob = await make_users(users, unique, 2)
    call_id = unique("c")
    server.clock.step = timedelta(0)  # exact durations
    try:
        a = await join(sessions, call_id, alice, create=True)
        server.clock.advance(timedelta(seconds=10))
        b = await join(sessions, call_id, bob)
        server.clock.advance(timedelta(seconds=10))
        await leave(sessions, call_id, a.participant.participant_session_id)
        server.clock.advance(timedelta(seconds=20))
        await leave(sessions, call_id, b.participant.participant_session_id)
        await fire(server, INACTIVITY)
        server.clock.advance(timedelta(seconds=100))
        second = await join(sessions, call_id, alice)
        server.clock.advance(timedelta(seconds=5))

        found = await history(sessions, call_id)
        assert [s.id for s in found.sessions] == [second.session.id, a.session.id]  # newest first
        running, ended = found.sessions
        assert not running.HasField("ended_at") and running.participant_count == 1
        assert running.participants[0].duration_seconds == pytest.approx(5)
        assert ended.end_reason == "inactivity" and ended.participant_count == 0
        assert at(ended.ended_at) - at(ended.started_at) == timedelta(seconds=40 + INACTIVITY)
        assert [(p.user_id, p.duration_seconds) for p in ended.participants] == [(alice, 20), (bob, 30)]
        assert all(p.HasField("left_at") and not p.HasField("lease_expires_at") for p in ended.participants)
        assert (list(ended.accepted_by), dict(ended.rejected_by), list(ended.missed_by)) == ([], {}, [])
        assert plain(ended.custom) == {}

        async def ids_of(conditions: dict[str, Any] | None = None, **fields: Any) -> list[str]:
            if conditions is not None:
                fields["filter_conditions"] = struct(conditions)
            return [s.id for s in (await history(sessions, call_id, **fields)).sessions]

        assert await ids_of({"ended_at": {"$exists": False}}) == [second.session.id]
        assert await ids_of({"ended_at": None}) == [second.session.id]
        assert await ids_of({"id": a.session.id}) == [a.session.id]
        assert await ids_of({"started_at": {"$lt": at(second.session.started_at).isoformat()}}) == [
            a.session.id
        ]
        assert await ids_of({"custom.topic": "x"}) == []
        assert await ids_of(
            sort=[query_pb2.SortParam(field="started_at", direction=query_pb2.SORT_DIRECTION_ASC)]
        ) == [a.session.id, second.session.id]
        page = await history(sessions, call_id, limit=1)
        assert [s.id for s in page.sessions] == [second.session.id] and page.next
        rest = await history(sessions, call_id, limit=1, next=page.next)
        assert [s.id for s in rest.sessions] == [a.session.id] and not rest.next
        await expect_error(
            history(sessions, call_id, filter_conditions=struct({"user_id": alice})),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FILTER",
            fields=["filter_conditions.user_id"],
        )
    finally:
        server.clock.step = timedelta(milliseconds=1)
