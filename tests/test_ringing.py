"""RingService: RingCall, AcceptCall, RejectCall, GetOrCreateCall ring/notify, and the server-side ring
timers (incoming timeout, auto-cancel, missed), each outcome exactly once per callee, also across a
restart. Outcomes are checked on the callers' and callees' WatchUser streams and on the call's log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    ring_service_pb2,
    ring_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from tests.errors import expect_error
from tests.support import TEST_SECRET, RunningServer, TestClock, fresh_database, running_server
from tests.support import channel as authed_channel

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DECLINE = ring_service_pb2.REJECT_REASON_DECLINE
BUSY = ring_service_pb2.REJECT_REASON_BUSY
CANCEL = ring_service_pb2.REJECT_REASON_CANCEL
#: Distinct timeouts so each timer's effect can be observed on its own.
INCOMING_MS, MISSED_MS, AUTO_CANCEL_MS = 10_000, 20_000, 30_000
STREAM_TIMEOUT = 20.0
#: The streams read here ask for progress after 0.2 s of quiet (the servers here allow it: MIN_PROGRESS).
PROGRESS = duration_pb2.Duration(nanos=200_000_000)
MIN_PROGRESS = 0.05


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    # Short progress intervals allowed: a stream read "until the first progress message" has seen everything.
    async with running_server(
        backend, tmp_path_factory.mktemp(backend), min_progress_interval_seconds=MIN_PROGRESS
    ) as running:
        yield running


# -- helpers ---------------------------------------------------------------------------------------


async def _drain(stream: Any, pick: Callable[[Any], event_pb2.Event | None]) -> list[event_pb2.Event]:
    """Reads a watch stream that asked for progress until its first progress message (everything
    committed was delivered)."""
    events: list[event_pb2.Event] = []

    async def read() -> None:
        async for message in stream:
            item = pick(message)
            if item is None:
                return
            events.append(item)

    try:
        await asyncio.wait_for(read(), STREAM_TIMEOUT)
    finally:
        stream.cancel()
    return events


async def user_events(channel: grpc.aio.Channel, user_id: str) -> list[event_pb2.Event]:
    """Every event on the user's WatchUser stream from the start (after_seq=0)."""
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    stream = stub.WatchUser(
        event_service_pb2.WatchUserRequest(user_id=user_id, after_seq=0, progress_interval=PROGRESS)
    )
    events = await _drain(stream, lambda m: m.event if m.HasField("event") else None)
    seqs = [e.user_seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"user_seq not gap-free from 1: {seqs}"
    return events


async def call_events(channel: grpc.aio.Channel, call_id: str, after_seq: int = 0) -> list[event_pb2.Event]:
    """Every event of the call's log after `after_seq` (WatchCall)."""
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    stream = stub.WatchCall(
        event_service_pb2.WatchCallRequest(
            type="default", id=call_id, after_seq=after_seq, progress_interval=PROGRESS
        )
    )
    events = await _drain(stream, lambda m: m.event if m.HasField("event") else None)
    seqs = [e.seq for e in events]
    assert seqs == list(range(after_seq + 1, after_seq + 1 + len(seqs))), f"seq not gap-free: {seqs}"
    return events


def summary(event: event_pb2.Event) -> tuple[str, ...]:
    """(type, user, reason) for ring responses; (type, caller, callees..., video) for ring/notification."""
    if event.type in ("call.ring", "call.notification"):
        payload = getattr(event, event.type.replace(".", "_"))
        return (event.type, payload.caller_user_id, *payload.user_ids, "video" if payload.video else "audio")
    if event.type in ("call.accepted", "call.rejected", "call.missed"):
        payload = getattr(event, event.type.replace(".", "_"))
        return (event.type, payload.user_id, payload.reason)
    return (event.type,)


async def user_summaries(channel: grpc.aio.Channel, user_id: str, cid: str) -> list[tuple[str, ...]]:
    return [summary(e) for e in await user_events(channel, user_id) if e.call_cid == cid]


async def ring_log(channel: grpc.aio.Channel, call_id: str) -> list[tuple[str, ...]]:
    return [summary(e) for e in await call_events(channel, call_id)]


async def make_users(channel: grpc.aio.Channel, unique: Callable[[str], str], count: int) -> list[str]:
    ids = [unique("u") for _ in range(count)]
    await user_pb2_grpc.UserServiceStub(channel).UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i) for i in ids])
    )
    return ids


def ring_settings(
    incoming: int = INCOMING_MS, missed: int = MISSED_MS, auto_cancel: int = AUTO_CANCEL_MS
) -> call_type_pb2.CallSettings:
    return call_type_pb2.CallSettings(
        ring=call_type_pb2.RingSettings(
            incoming_call_timeout_ms=incoming,
            missed_call_timeout_ms=missed,
            auto_cancel_timeout_ms=auto_cancel,
        )
    )


async def create_call(
    channel: grpc.aio.Channel,
    call_id: str,
    creator: str,
    members: list[str],
    settings: call_type_pb2.CallSettings | None = None,
    **request: Any,
) -> call_service_pb2.GetOrCreateCallResponse:
    return await call_service_pb2_grpc.CallServiceStub(channel).GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                created_by_id=creator,
                members=[call_pb2.MemberRequest(user_id=m) for m in members],
                settings_override=settings or ring_settings(),
            ),
            **request,
        )
    )


async def setup_call(
    server: RunningServer, unique: Callable[[str], str], callees: int = 1, **settings: int
) -> tuple[str, str, str, list[str]]:
    """A call with a caller and `callees` other members; returns (call id, cid, caller, callees)."""
    caller, *others = await make_users(server.channel, unique, 1 + callees)
    others.sort()  # callees in user id order, the order the server settles several rings in
    call_id = unique("ring")
    await create_call(server.channel, call_id, caller, [caller, *others], ring_settings(**settings))
    return call_id, f"default:{call_id}", caller, others


async def ring(rings, call_id: str, caller: str, members: list[str] | None = None, video: bool = False):
    return await rings.RingCall(
        ring_service_pb2.RingCallRequest(
            type="default", id=call_id, user_id=caller, members_ids=members or [], video=video
        )
    )


async def accept(rings, call_id: str, user_id: str):
    return await rings.AcceptCall(
        ring_service_pb2.AcceptCallRequest(type="default", id=call_id, user_id=user_id)
    )


async def reject(rings, call_id: str, user_id: str, reason: int = DECLINE):
    return await rings.RejectCall(
        ring_service_pb2.RejectCallRequest(type="default", id=call_id, user_id=user_id, reason=reason)
    )


async def advance_to(server: RunningServer, cid: str, start: Any, ms: int) -> list[tuple[str, str]]:
    """Moves the clock to `start + ms` (+ a little) and fires the due timers twice (the second run must
    find nothing: exactly once). Returns the call's ring timers still pending."""
    target = start + timedelta(milliseconds=ms + 1)
    if server.clock.current < target:
        server.clock.advance(target - server.clock.current)
    await server.server.timers.run_due()
    assert await server.server.timers.run_due() == 0
    return await pending_timers(server, cid)


async def pending_timers(server: RunningServer, cid: str) -> list[tuple[str, str]]:
    """The call's pending ring timers as (kind, key)."""
    assert server.server.store is not None
    timers = await server.server.store.read(lambda tx: tx.timers.pending(cid))
    return sorted((t.kind, t.key) for t in timers if t.kind.startswith("ring_"))


# -- accept ----------------------------------------------------------------------------------------


async def test_accept_reaches_caller_and_callee_once_and_stops_every_timer(
    server: RunningServer, rings, unique
) -> None:
    call_id, cid, caller, (alice,) = await setup_call(server, unique)
    start = server.clock.current
    response = await ring(rings, call_id, caller, [alice], video=True)
    assert list(response.members_ids) == [alice]
    assert response.call.cid == cid
    assert await pending_timers(server, cid) == [
        ("ring_auto_cancel", ""),
        ("ring_incoming", alice),
        ("ring_missed", alice),
    ]
    await accept(rings, call_id, alice)
    assert await pending_timers(server, cid) == []
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    await expect_error(reject(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    # Every timeout passes: nothing more happens.
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []

    assert await user_summaries(server.channel, caller, cid) == [("call.accepted", alice, "")]
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, "video"),
        ("call.accepted", alice, ""),
    ]
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        ("call.ring", caller, alice, "video"),
        ("call.accepted", alice, ""),
    ]


async def test_accept_tells_callees_still_ringing_and_ends_auto_cancel(
    server: RunningServer, rings, unique
) -> None:
    call_id, cid, caller, (alice, bob) = await setup_call(server, unique, callees=2)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice, bob])
    await accept(rings, call_id, alice)
    assert await pending_timers(server, cid) == [("ring_incoming", bob), ("ring_missed", bob)]
    # Bob never answers: his own timers still time him out and report him missed, once each.
    assert await advance_to(server, cid, start, INCOMING_MS) == [("ring_missed", bob)]
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []
    assert await user_summaries(server.channel, bob, cid) == [
        ("call.ring", caller, alice, bob, "audio"),
        ("call.accepted", alice, ""),
        ("call.rejected", bob, "timeout"),
        ("call.missed", bob, ""),
    ]
    assert await user_summaries(server.channel, caller, cid) == [
        ("call.accepted", alice, ""),
        ("call.rejected", bob, "timeout"),
    ]
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, bob, "audio"),
        ("call.accepted", alice, ""),
    ]
    await expect_error(accept(rings, call_id, bob), PRECONDITION, "NOT_RINGING")


# -- reject ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "name"),
    [(DECLINE, "decline"), (ring_service_pb2.REJECT_REASON_UNSPECIFIED, "decline"), (BUSY, "busy")],
)
async def test_decline_or_busy_is_an_answer_not_a_missed_call(
    server: RunningServer, rings, unique, reason: int, name: str
) -> None:
    call_id, cid, caller, (alice,) = await setup_call(server, unique)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice])
    await reject(rings, call_id, alice, reason)
    assert await pending_timers(server, cid) == []
    await expect_error(reject(rings, call_id, alice, reason), PRECONDITION, "NOT_RINGING")
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []

    assert await user_summaries(server.channel, caller, cid) == [("call.rejected", alice, name)]
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, "audio"),
        ("call.rejected", alice, name),
    ]
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        ("call.ring", caller, alice, "audio"),
        ("call.rejected", alice, name),
    ]


async def test_caller_cancel_rejects_everyone_ringing_then_they_miss_it_once(
    server: RunningServer, rings, unique
) -> None:
    call_id, cid, caller, (alice, bob, carol) = await setup_call(server, unique, callees=3)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice, bob, carol])
    await reject(rings, call_id, carol, BUSY)
    await reject(rings, call_id, caller, CANCEL)
    await expect_error(reject(rings, call_id, caller, CANCEL), PRECONDITION, "NOT_RINGING")
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    # Only the missed-call timers of the two who never answered are left.
    assert await pending_timers(server, cid) == [("ring_missed", alice), ("ring_missed", bob)]
    assert await advance_to(server, cid, start, MISSED_MS) == []
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []

    rung = ("call.ring", caller, alice, bob, carol, "audio")
    assert await user_summaries(server.channel, caller, cid) == [
        ("call.rejected", carol, "busy"),
        ("call.rejected", alice, "cancel"),
        ("call.rejected", bob, "cancel"),
    ]
    for callee in (alice, bob):
        assert await user_summaries(server.channel, callee, cid) == [
            rung,
            ("call.rejected", callee, "cancel"),
            ("call.missed", callee, ""),
        ]
    assert await user_summaries(server.channel, carol, cid) == [rung, ("call.rejected", carol, "busy")]
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        rung,
        ("call.rejected", carol, "busy"),
        ("call.rejected", alice, "cancel"),
        ("call.rejected", bob, "cancel"),
        ("call.missed", alice, ""),
        ("call.missed", bob, ""),
    ]


async def test_clients_cannot_send_timeout_or_unknown_reasons(server: RunningServer, rings, unique) -> None:
    call_id, _, caller, (alice,) = await setup_call(server, unique)
    await ring(rings, call_id, caller, [alice])
    await expect_error(
        reject(rings, call_id, alice, ring_service_pb2.REJECT_REASON_TIMEOUT), INVALID, fields=["reason"]
    )
    await expect_error(reject(rings, call_id, alice, 42), INVALID, fields=["reason"])
    # Still ringing: the refused requests changed nothing.
    await accept(rings, call_id, alice)


# -- timers ----------------------------------------------------------------------------------------


async def test_incoming_timeout_rejects_once_then_missed_once(server: RunningServer, rings, unique) -> None:
    call_id, cid, caller, (alice,) = await setup_call(server, unique)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice])
    assert await advance_to(server, cid, start, INCOMING_MS - 10) == [
        ("ring_auto_cancel", ""),
        ("ring_incoming", alice),
        ("ring_missed", alice),
    ]
    assert await advance_to(server, cid, start, INCOMING_MS) == [("ring_missed", alice)]
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    # Nobody left ringing: the auto-cancel timer went with the last ring.
    assert await pending_timers(server, cid) == [("ring_missed", alice)]
    assert await advance_to(server, cid, start, MISSED_MS) == []
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []

    assert await user_summaries(server.channel, caller, cid) == [("call.rejected", alice, "timeout")]
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, "audio"),
        ("call.rejected", alice, "timeout"),
        ("call.missed", alice, ""),
    ]
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        ("call.ring", caller, alice, "audio"),
        ("call.rejected", alice, "timeout"),
        ("call.missed", alice, ""),
    ]


async def test_auto_cancel_cancels_everyone_ringing_once(server: RunningServer, rings, unique) -> None:
    call_id, cid, caller, (alice, bob) = await setup_call(server, unique, callees=2, auto_cancel=5_000)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice, bob])
    assert await advance_to(server, cid, start, 5_000) == [("ring_missed", alice), ("ring_missed", bob)]
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    assert await pending_timers(server, cid) == [("ring_missed", alice), ("ring_missed", bob)]
    assert await advance_to(server, cid, start, INCOMING_MS) == [("ring_missed", alice), ("ring_missed", bob)]
    assert await advance_to(server, cid, start, MISSED_MS) == []

    assert await user_summaries(server.channel, caller, cid) == [
        ("call.rejected", alice, "cancel"),
        ("call.rejected", bob, "cancel"),
    ]
    for callee in (alice, bob):
        assert await user_summaries(server.channel, callee, cid) == [
            ("call.ring", caller, alice, bob, "audio"),
            ("call.rejected", callee, "cancel"),
            ("call.missed", callee, ""),
        ]


async def test_missed_while_still_ringing_is_reported_once(server: RunningServer, rings, unique) -> None:
    # The missed-call timeout is shorter than the incoming one: missed first, timeout later, once each.
    call_id, cid, caller, (alice,) = await setup_call(server, unique, missed=5_000)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice])
    assert await advance_to(server, cid, start, 5_000) == [("ring_auto_cancel", ""), ("ring_incoming", alice)]
    assert await advance_to(server, cid, start, INCOMING_MS) == []
    assert await advance_to(server, cid, start, AUTO_CANCEL_MS) == []
    assert await pending_timers(server, cid) == []
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, "audio"),
        ("call.missed", alice, ""),
        ("call.rejected", alice, "timeout"),
    ]
    assert await user_summaries(server.channel, caller, cid) == [("call.rejected", alice, "timeout")]


async def test_ringing_again_resets_the_callee(server: RunningServer, rings, unique) -> None:
    call_id, cid, caller, (alice,) = await setup_call(server, unique)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice])
    assert await advance_to(server, cid, start, MISSED_MS) == []
    second = server.clock.current
    await ring(rings, call_id, caller, [alice], video=True)
    await accept(rings, call_id, alice)
    assert await advance_to(server, cid, second, AUTO_CANCEL_MS) == []
    assert await user_summaries(server.channel, alice, cid) == [
        ("call.ring", caller, alice, "audio"),
        ("call.rejected", alice, "timeout"),
        ("call.missed", alice, ""),
        ("call.ring", caller, alice, "video"),
        ("call.accepted", alice, ""),
    ]


async def test_watch_call_resumes_after_a_ring_outcome(server: RunningServer, rings, unique) -> None:
    call_id, _, caller, (alice,) = await setup_call(server, unique)
    await ring(rings, call_id, caller, [alice])
    before = await call_events(server.channel, call_id)
    await reject(rings, call_id, alice, BUSY)
    after = await call_events(server.channel, call_id, after_seq=before[-1].seq)
    assert [summary(e) for e in after] == [("call.rejected", alice, "busy")]


async def test_a_ring_timer_pending_across_a_restart_fires_once(backend: str, tmp_path: Path) -> None:
    clock = TestClock()
    async with fresh_database(backend, tmp_path) as url:
        first = CallplaneServer(
            Config(
                api_secret=TEST_SECRET,
                listen="127.0.0.1:0",
                database_url=url,
                data_dir=tmp_path,
                run_timers=False,
            ),
            clock=clock,
        )
        await first.start()
        async with authed_channel(f"127.0.0.1:{first.port}") as channel:
            caller, alice = "caller", "alice"
            await user_pb2_grpc.UserServiceStub(channel).UpsertUsers(
                user_pb2.UpsertUsersRequest(
                    users=[user_pb2.UserRequest(id=caller), user_pb2.UserRequest(id=alice)]
                )
            )
            await create_call(channel, "restart", caller, [caller, alice])
            start = clock.current
            await ring(ring_service_pb2_grpc.RingServiceStub(channel), "restart", caller, [alice])
        await first.stop(grace=0)

        # A new process on the same database, later: the durable timers are still there and fire once.
        clock.advance(timedelta(milliseconds=INCOMING_MS + 1) - (clock.current - start))
        second = CallplaneServer(
            Config(
                api_secret=TEST_SECRET,
                listen="127.0.0.1:0",
                database_url=url,
                data_dir=tmp_path,
                run_timers=False,
                min_progress_interval_seconds=MIN_PROGRESS,
            ),
            clock=clock,
        )
        await second.start()
        try:
            assert second.timers is not None
            assert await second.timers.run_due() == 1
            assert await second.timers.run_due() == 0
            clock.advance(timedelta(milliseconds=MISSED_MS - INCOMING_MS))
            assert await second.timers.run_due() == 1
            assert await second.timers.run_due() == 0
            async with authed_channel(f"127.0.0.1:{second.port}") as channel:
                await expect_error(
                    accept(ring_service_pb2_grpc.RingServiceStub(channel), "restart", alice),
                    PRECONDITION,
                    "NOT_RINGING",
                )
                assert await user_summaries(channel, alice, "default:restart") == [
                    ("call.ring", caller, alice, "audio"),
                    ("call.rejected", alice, "timeout"),
                    ("call.missed", alice, ""),
                ]
                assert await user_summaries(channel, caller, "default:restart") == [
                    ("call.rejected", alice, "timeout")
                ]
        finally:
            await second.stop(grace=0)


# -- GetOrCreateCall ring / notify -----------------------------------------------------------------


async def test_get_or_create_with_ring_rings_members_but_the_creator(server: RunningServer, unique) -> None:
    caller, alice, bob = await make_users(server.channel, unique, 3)
    call_id = unique("goc")
    cid = f"default:{call_id}"
    start = server.clock.current
    created = await create_call(server.channel, call_id, caller, [caller, alice, bob], ring=True, video=True)
    assert created.created
    # Not created this time: no second ring.
    again = await create_call(server.channel, call_id, caller, [caller, alice, bob], ring=True)
    assert not again.created
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        ("call.ring", caller, alice, bob, "video"),
    ]
    for callee in (alice, bob):
        assert await user_summaries(server.channel, callee, cid) == [
            ("call.ring", caller, alice, bob, "video")
        ]
    assert await user_summaries(server.channel, caller, cid) == []
    # The ring is as real as RingCall's: its timers run on the server.
    await accept(ring_service_pb2_grpc.RingServiceStub(server.channel), call_id, alice)
    assert await advance_to(server, cid, start, INCOMING_MS) == [("ring_missed", bob)]
    assert await user_summaries(server.channel, caller, cid) == [
        ("call.accepted", alice, ""),
        ("call.rejected", bob, "timeout"),
    ]


async def test_get_or_create_with_notify_notifies_without_timers(server: RunningServer, unique) -> None:
    caller, alice = await make_users(server.channel, unique, 2)
    call_id = unique("notify")
    cid = f"default:{call_id}"
    await create_call(server.channel, call_id, caller, [caller, alice], notify=True)
    assert await pending_timers(server, cid) == []
    assert await user_summaries(server.channel, alice, cid) == [("call.notification", caller, alice, "audio")]
    assert await user_summaries(server.channel, caller, cid) == []
    assert await ring_log(server.channel, call_id) == [
        ("call.created",),
        ("call.notification", caller, alice, "audio"),
    ]
    await expect_error(
        accept(ring_service_pb2_grpc.RingServiceStub(server.channel), call_id, alice),
        PRECONDITION,
        "NOT_RINGING",
    )


async def test_get_or_create_ring_needs_a_creator(server: RunningServer, unique) -> None:
    (alice,) = await make_users(server.channel, unique, 1)
    await expect_error(
        create_call(server.channel, unique("anon"), "", [alice], ring=True),
        INVALID,
        fields=["data.created_by_id"],
    )


# -- RingCall validation and defaults ---------------------------------------------------------------


async def test_ring_call_validates_members(server: RunningServer, rings, unique) -> None:
    call_id, _, caller, (alice,) = await setup_call(server, unique)
    (stranger,) = await make_users(server.channel, unique, 1)
    many = [f"user-{i}" for i in range(26)]
    await expect_error(ring(rings, call_id, caller, many), INVALID, fields=["members_ids"])
    details = await expect_error(
        ring(rings, call_id, caller, [alice, stranger]),
        INVALID,
        "NOT_CALL_MEMBERS",
        fields=["members_ids[1]"],
    )
    assert details.metadata["user_ids"] == stranger
    assert stranger in details.message
    await expect_error(ring(rings, call_id, caller, [alice, alice]), INVALID, fields=["members_ids[1]"])
    await expect_error(ring(rings, call_id, caller, [caller]), INVALID, fields=["members_ids[0]"])
    await expect_error(ring(rings, call_id, "bad id!", [alice]), INVALID, fields=["user_id"])
    await expect_error(ring(rings, call_id, unique("ghost"), [alice]), NOT_FOUND, "USER_NOT_FOUND")
    await expect_error(ring(rings, unique("nocall"), caller, [alice]), NOT_FOUND, "CALL_NOT_FOUND")
    await expect_error(accept(rings, unique("nocall"), alice), NOT_FOUND, "CALL_NOT_FOUND")
    # Nothing was rung by the refused requests.
    await expect_error(accept(rings, call_id, alice), PRECONDITION, "NOT_RINGING")
    assert [e for e in await ring_log(server.channel, call_id) if e[0] != "call.created"] == []


async def test_ringing_an_ended_call_is_refused(server: RunningServer, rings, unique) -> None:
    call_id, _, caller, (alice,) = await setup_call(server, unique)
    await call_service_pb2_grpc.CallServiceStub(server.channel).EndCall(
        call_service_pb2.EndCallRequest(type="default", id=call_id)
    )
    await expect_error(ring(rings, call_id, caller, [alice]), PRECONDITION, "CALL_ENDED")


async def test_ring_call_defaults_to_every_member_but_the_caller(
    server: RunningServer, rings, unique
) -> None:
    call_id, cid, caller, (alice, bob) = await setup_call(server, unique, callees=2)
    response = await ring(rings, call_id, caller)
    assert sorted(response.members_ids) == sorted([alice, bob])
    for callee in (alice, bob):
        events = await user_summaries(server.channel, callee, cid)
        assert len(events) == 1 and events[0][0] == "call.ring"
        assert sorted(events[0][2:4]) == sorted([alice, bob])
    assert await user_summaries(server.channel, caller, cid) == []


async def test_ring_call_with_nobody_else_is_refused(server: RunningServer, rings, unique) -> None:
    (caller,) = await make_users(server.channel, unique, 1)
    call_id = unique("alone")
    await create_call(server.channel, call_id, caller, [caller])
    await expect_error(ring(rings, call_id, caller), PRECONDITION, "NOBODY_TO_RING")


# -- with a running session (JoinCall) ---------------------------------------------------------------


async def join(channel: grpc.aio.Channel, call_id: str, user_id: str) -> Any:
    return await session_service_pb2_grpc.SessionServiceStub(channel).JoinCall(
        session_service_pb2.JoinCallRequest(type="default", id=call_id, user_id=user_id)
    )


async def snapshot_session(channel: grpc.aio.Channel, call_id: str) -> Any:
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    stream = stub.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id, snapshot=True))
    try:
        first = await asyncio.wait_for(stream.read(), STREAM_TIMEOUT)
    finally:
        stream.cancel()
    assert first.HasField("snapshot")
    return first.snapshot.session


async def test_default_ring_skips_members_already_in_the_call(server: RunningServer, rings, unique) -> None:
    call_id, cid, caller, (alice, bob, carol) = await setup_call(server, unique, callees=3)
    await join(server.channel, call_id, caller)
    await join(server.channel, call_id, alice)
    response = await ring(rings, call_id, caller)
    assert sorted(response.members_ids) == [bob, carol]
    assert await user_summaries(server.channel, alice, cid) == []
    assert await user_summaries(server.channel, bob, cid) == [("call.ring", caller, bob, carol, "audio")]
    # Everyone else joined too: nobody left to ring.
    await join(server.channel, call_id, bob)
    await join(server.channel, call_id, carol)
    await expect_error(ring(rings, call_id, caller), PRECONDITION, "NOBODY_TO_RING")


async def test_running_session_records_accepted_rejected_and_missed(
    server: RunningServer, rings, unique
) -> None:
    call_id, cid, caller, (alice, bob, carol, dave) = await setup_call(server, unique, callees=4)
    await join(server.channel, call_id, caller)
    start = server.clock.current
    await ring(rings, call_id, caller, [alice, bob, carol, dave])
    await accept(rings, call_id, alice)
    await reject(rings, call_id, bob, BUSY)
    assert await advance_to(server, cid, start, MISSED_MS) == []
    session = await snapshot_session(server.channel, call_id)
    assert list(session.accepted_by) == [alice]
    assert dict(session.rejected_by) == {bob: "busy", carol: "timeout", dave: "timeout"}
    assert sorted(session.missed_by) == [carol, dave]
