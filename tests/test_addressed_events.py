"""Addressed custom events (SendCallEvent with to_user_ids / to_roles) reach only their recipients, on every
stream a user token can open: WatchCall (live, replayed after after_seq, after a snapshot), WatchUser and
SubscribeEvents. Server tokens and global admins see every event; the sender gets its own addressed event
only by addressing itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    user_pb2,
)
from tests.support import RunningServer, channel, struct, user_token

STREAM_TIMEOUT = 15.0


@asynccontextmanager
async def events_as(server: RunningServer, user_id: str | None) -> AsyncIterator[Any]:
    """An EventService stub acting as `user_id` (None: the server token)."""
    if user_id is None:
        yield event_service_pb2_grpc.EventServiceStub(server.channel)
        return
    async with channel(server.target, token=user_token(user_id)) as ch:
        yield event_service_pb2_grpc.EventServiceStub(ch)


class Collector:
    """Reads a stream's events in the background until one carries `marker` in its custom data."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.events: list[event_pb2.Event] = []
        self.progress_seqs: list[int] = []
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.stream:
            kind = message.WhichOneof("message")
            if kind in ("progress", "snapshot"):
                self.started.set()
                if kind == "progress":
                    self.progress_seqs.append(message.progress.seq)
                continue
            self.events.append(message.event)
            if message.event.type == "custom" and message.event.custom.custom.fields.get("marker"):
                return

    async def until_marker(self) -> list[str]:
        """The `kind` of every custom event received before the marker (in order)."""
        try:
            async with asyncio.timeout(STREAM_TIMEOUT):
                await self.task
        finally:
            self.stream.cancel()
        return [
            e.custom.custom.fields["kind"].string_value
            for e in self.events
            if e.type == "custom" and "kind" in e.custom.custom.fields
        ]


def watch(call_id: str, **fields: Any) -> event_service_pb2.WatchCallRequest:
    return event_service_pb2.WatchCallRequest(type="default", id=call_id, **fields)


async def setup_call(calls: Any, users: Any, unique: Callable[[str], str]) -> tuple[str, dict[str, str]]:
    """A call with a sender, a recipient, a host, a bystander member and a global admin (not a member)."""
    people = {name: unique(name) for name in ("sender", "recipient", "host", "bystander", "admin")}
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(
            users=[
                user_pb2.UserRequest(id=uid, role="admin" if name == "admin" else "user")
                for name, uid in people.items()
            ]
        )
    )
    call_id = unique("c")
    roles = {"sender": "user", "recipient": "user", "host": "host", "bystander": "user"}
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                members=[call_pb2.MemberRequest(user_id=people[n], role=r) for n, r in roles.items()]
            ),
        )
    )
    return call_id, people


async def send(data: Any, call_id: str, sender: str, custom: dict[str, Any], **fields: Any) -> int:
    sent = await data.SendCallEvent(
        call_data_service_pb2.SendCallEventRequest(
            type="default", id=call_id, user_id=sender, custom=struct(custom), **fields
        )
    )
    return int(sent.seq)


async def send_scenario(data: Any, call_id: str, people: dict[str, str]) -> int:
    """Sends one event to everyone, one to the recipient by id, one to hosts by role, then the marker.
    Returns the seq of the first."""
    first = await send(data, call_id, people["sender"], {"kind": "everyone"})
    await send(data, call_id, people["sender"], {"kind": "to-recipient"}, to_user_ids=[people["recipient"]])
    await send(data, call_id, people["sender"], {"kind": "to-hosts"}, to_roles=["host"])
    await send(data, call_id, people["sender"], {"marker": True})
    return first


# What each viewer may see of the scenario (the sender addressed neither event to itself).
EXPECTED = {
    "sender": ["everyone"],
    "recipient": ["everyone", "to-recipient"],
    "host": ["everyone", "to-hosts"],
    "bystander": ["everyone"],
    "admin": ["everyone", "to-recipient", "to-hosts"],
    None: ["everyone", "to-recipient", "to-hosts"],  # a server token
}


def viewer(people: dict[str, str], name: str | None) -> str | None:
    return None if name is None else people[name]


async def test_live_watch_call_delivers_addressed_events_only_to_recipients(
    server: RunningServer, calls: Any, users: Any, data: Any, unique: Callable[[str], str]
) -> None:
    call_id, people = await setup_call(calls, users, unique)
    async with (
        events_as(server, None) as as_server,
        events_as(server, people["sender"]) as as_sender,
        events_as(server, people["recipient"]) as as_recipient,
        events_as(server, people["host"]) as as_host,
        events_as(server, people["bystander"]) as as_bystander,
        events_as(server, people["admin"]) as as_admin,
    ):
        stubs = {
            None: as_server,
            "sender": as_sender,
            "recipient": as_recipient,
            "host": as_host,
            "bystander": as_bystander,
            "admin": as_admin,
        }
        collectors = {name: Collector(stub.WatchCall(watch(call_id))) for name, stub in stubs.items()}
        for collector in collectors.values():
            await asyncio.wait_for(collector.started.wait(), STREAM_TIMEOUT)
        await send_scenario(data, call_id, people)
        for name, collector in collectors.items():
            assert await collector.until_marker() == EXPECTED[name], name


@pytest.mark.parametrize("mode", ["after_seq", "snapshot"])
async def test_replayed_watch_call_withholds_addressed_events(
    server: RunningServer, calls: Any, users: Any, data: Any, unique: Callable[[str], str], mode: str
) -> None:
    call_id, people = await setup_call(calls, users, unique)
    if mode == "snapshot":
        # Snapshot first (tagged with the current seq), then every event after it.
        for name, expected in EXPECTED.items():
            async with events_as(server, viewer(people, name)) as stub:
                collector = Collector(
                    stub.WatchCall(
                        event_service_pb2.WatchCallRequest(type="default", id=call_id, snapshot=True)
                    )
                )
                await asyncio.wait_for(collector.started.wait(), STREAM_TIMEOUT)
                await send_scenario(data, call_id, people)
                assert await collector.until_marker() == expected, name
        return
    first = await send_scenario(data, call_id, people)
    for name, expected in EXPECTED.items():
        async with events_as(server, viewer(people, name)) as stub:
            collector = Collector(
                stub.WatchCall(
                    event_service_pb2.WatchCallRequest(type="default", id=call_id, after_seq=first - 1)
                )
            )
            assert await collector.until_marker() == expected, name


async def test_withheld_events_still_advance_the_resume_point(
    server: RunningServer, calls: Any, users: Any, data: Any, unique: Callable[[str], str]
) -> None:
    """A bystander's progress reports the call's seq past events it may not see, so resuming from it
    neither repeats nor waits for them."""
    call_id, people = await setup_call(calls, users, unique)
    async with events_as(server, people["bystander"]) as stub:
        stream = stub.WatchCall(event_service_pb2.WatchCallRequest(type="default", id=call_id))
        async with asyncio.timeout(STREAM_TIMEOUT):
            start = await stream.read()
            assert start.WhichOneof("message") == "progress"
            hidden = await send(
                data, call_id, people["sender"], {"kind": "to-recipient"}, to_user_ids=[people["recipient"]]
            )
            shown = await send(data, call_id, people["sender"], {"kind": "everyone"})
            message = await stream.read()
        stream.cancel()
        assert message.WhichOneof("message") == "event"
        assert (message.event.seq, hidden) == (shown, shown - 1)


async def test_subscribe_events_and_watch_user_for_user_tokens(
    server: RunningServer, calls: Any, users: Any, data: Any, unique: Callable[[str], str]
) -> None:
    call_id, people = await setup_call(calls, users, unique)
    cid = f"default:{call_id}"
    live = {}
    contexts = []
    for name in EXPECTED:
        context = events_as(server, viewer(people, name))
        contexts.append(context)
        stub = await context.__aenter__()
        live[name] = Collector(
            stub.SubscribeEvents(event_service_pb2.SubscribeEventsRequest(call_cids=[cid]))
        )
    try:
        for collector in live.values():
            await asyncio.wait_for(collector.started.wait(), STREAM_TIMEOUT)
        first = await send_scenario(data, call_id, people)
        for name, collector in live.items():
            assert await collector.until_marker() == EXPECTED[name], name
    finally:
        for context in contexts:
            await context.__aexit__(None, None, None)

    # Replayed from the log (after_position), the same.
    async with events_as(server, None) as as_server:
        position_stream = as_server.WatchCall(
            event_service_pb2.WatchCallRequest(type="default", id=call_id, after_seq=first - 1)
        )
        async with asyncio.timeout(STREAM_TIMEOUT):
            first_event = (await position_stream.read()).event
        position_stream.cancel()
    for name, expected in EXPECTED.items():
        async with events_as(server, viewer(people, name)) as stub:
            collector = Collector(
                stub.SubscribeEvents(
                    event_service_pb2.SubscribeEventsRequest(
                        call_cids=[cid], after_position=first_event.position - 1
                    )
                )
            )
            assert await collector.until_marker() == expected, name

    # WatchUser: each user's own inbox holds only what was addressed to them (by id or by role).
    await send(
        data,
        call_id,
        people["sender"],
        {"marker": True},
        to_user_ids=[people[n] for n in ("sender", "recipient", "host", "bystander")],
    )
    inbox = {"sender": [], "recipient": ["to-recipient"], "host": ["to-hosts"], "bystander": []}
    for name, expected in inbox.items():
        async with events_as(server, people[name]) as stub:
            collector = Collector(
                stub.WatchUser(event_service_pb2.WatchUserRequest(user_id=people[name], after_seq=0))
            )
            assert await collector.until_marker() == expected, name


async def test_a_user_cannot_watch_another_users_inbox(
    server: RunningServer, calls: Any, users: Any, unique: Callable[[str], str]
) -> None:
    _, people = await setup_call(calls, users, unique)
    async with events_as(server, people["bystander"]) as stub:
        stream = stub.WatchUser(event_service_pb2.WatchUserRequest(user_id=people["recipient"]))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stream.read()
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
