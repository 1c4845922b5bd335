"""Refused requests change nothing (found while building tests/fuzz, which checks it for every RPC).

A WatchCall refused at its start (a resume point past the end of the call's log) changes nothing: the
participant it names stays in the call. Before, the stream took the participant's presence first (renewing
its lease) and, ending with OUT_OF_RANGE, recorded that participant as having left ("disconnected"), so a
client retrying with a bad `after_seq` dropped itself from the call.

A JoinCall with `create` that is refused (a livestream call in backstage, which the user may not join)
creates no call. Before, the call was created (with its call.created event) in a transaction of its own,
and the join then failed.

A user deleted and created again can be sent addressed events again, in a new inbox. Before, the new
user's event numbering restarted at 1 while the old user's addressed events kept their numbers, so every
write addressing that user hit a unique constraint, was retried and answered UNAVAILABLE "the database is
unavailable; retry" (never true, so a client retried forever). DeleteUsers now drops the user's inbox, so
whoever gets the id later never reads what was addressed to its predecessor."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    moderation_service_pb2,
    moderation_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.store.models import CounterRow
from tests.support import RunningServer, channel, user_token


async def test_refused_watch_keeps_the_participant(
    server: RunningServer, unique: Callable[[str], str]
) -> None:
    user_id, call_id = unique("watcher"), unique("call")
    users = user_pb2_grpc.UserServiceStub(server.channel)
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id)]))
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                created_by_id=user_id, members=[call_pb2.MemberRequest(user_id=user_id)]
            ),
        )
    )
    async with channel(server.target, token=user_token(user_id)) as as_user:
        sessions = session_service_pb2_grpc.SessionServiceStub(as_user)
        joined = await sessions.JoinCall(
            session_service_pb2.JoinCallRequest(type="default", id=call_id, user_id=user_id)
        )
        psid = joined.participant.participant_session_id
        watch = event_service_pb2_grpc.EventServiceStub(as_user).WatchCall(
            event_service_pb2.WatchCallRequest(
                type="default", id=call_id, after_seq=1_000_000, participant_session_id=psid
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch.read()
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        # Before the fix, the refused stream's cleanup recorded the leave by now (in practice, on both
        # backends); after it, there is no leave to record.
        alive = await sessions.KeepAlive(
            session_service_pb2.KeepAliveRequest(type="default", id=call_id, participant_session_id=psid)
        )
        assert alive is not None
    listed = await session_service_pb2_grpc.SessionServiceStub(server.channel).QueryCallParticipants(
        session_service_pb2.QueryCallParticipantsRequest(type="default", id=call_id)
    )
    assert [p.participant_session_id for p in listed.participants] == [psid]


async def test_refused_join_with_create_creates_no_call(
    server: RunningServer, unique: Callable[[str], str]
) -> None:
    user_id, call_id = unique("joiner"), unique("live")
    users = user_pb2_grpc.UserServiceStub(server.channel)
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id)]))
    sessions = session_service_pb2_grpc.SessionServiceStub(server.channel)
    position_before = await _event_position(server)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sessions.JoinCall(
            session_service_pb2.JoinCallRequest(type="livestream", id=call_id, user_id=user_id, create=True)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await calls.GetCall(call_service_pb2.GetCallRequest(type="livestream", id=call_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert await _event_position(server) == position_before
    # A join that may go ahead still creates the call, in the same request.
    joined = await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(type="default", id=call_id, user_id=user_id, create=True)
    )
    assert joined.call.cid == f"default:{call_id}"
    assert joined.call.created_by_user_id == user_id


async def test_recreated_user_gets_a_new_inbox(server: RunningServer, unique: Callable[[str], str]) -> None:
    host, guest, call_id = unique("host"), unique("guest"), unique("perm")
    users = user_pb2_grpc.UserServiceStub(server.channel)
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=host), user_pb2.UserRequest(id=guest)])
    )
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default", id=call_id, data=call_service_pb2.CallData(created_by_id=host)
        )
    )
    moderation = moderation_service_pb2_grpc.ModerationServiceStub(server.channel)
    grant = moderation_service_pb2.UpdateUserPermissionsRequest(
        type="default", id=call_id, user_id=guest, grant_permissions=["screenshare"]
    )
    await moderation.UpdateUserPermissions(grant)  # an event addressed to the guest
    await users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[guest]))
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=guest)]))
    await moderation.UpdateUserPermissions(grant)
    watch = event_service_pb2_grpc.EventServiceStub(server.channel).WatchUser(
        event_service_pb2.WatchUserRequest(user_id=guest, after_seq=0)
    )
    seen = []
    while not seen:
        reply = await watch.read()
        if reply.HasField("event"):
            seen.append(reply.event)
    watch.cancel()
    # Only what was addressed to the new user, numbered from 1: the deleted user's inbox went with it.
    assert [(e.type, e.user_seq) for e in seen] == [("call.permissions_updated", 1)]
    # ...and it is the second grant: the call's latest event.
    snapshot = event_service_pb2_grpc.EventServiceStub(server.channel).WatchCall(
        event_service_pb2.WatchCallRequest(type="default", id=call_id, snapshot=True)
    )
    latest = (await snapshot.read()).snapshot.seq
    snapshot.cancel()
    assert seen[0].seq == latest


async def _event_position(server: RunningServer) -> int:
    """The global event position (every committed write that emits events moves it)."""
    store = server.server.store
    assert store is not None

    async def read(session: AsyncSession) -> int:
        value = await session.scalar(select(CounterRow.value).where(CounterRow.name == "event_position"))
        return int(value or 0)

    return await store.database.run(read, write=False)
