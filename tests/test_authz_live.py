"""Authorization of the live-call RPCs (sessions, ringing, call data, event streams) and ModerationService,
acting as users with user tokens: allowed and denied per rule, with the PERMISSION_DENIED reasons
(MISSING_CAPABILITY naming the capability, NOT_YOURSELF, NOT_OWN_PARTICIPANT, USER_BLOCKED,
ADMIN_REQUIRED), blocking and kicking, per-user grants and revocations, permission requests.

Every test uses its own call type with explicit grants, so the built-in seeds may change freely."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio

from callplane.v1 import (
    call_data_service_pb2,
    call_data_service_pb2_grpc,
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    call_type_service_pb2,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    moderation_service_pb2,
    moderation_service_pb2_grpc,
    ring_service_pb2,
    ring_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
)
from callplane_server.domain.capabilities import CAPABILITIES
from tests.errors import expect_error
from tests.support import RunningServer, channel, user_token

DENIED = grpc.StatusCode.PERMISSION_DENIED
MEMBER_CAPS = ["create-reaction", "join-call", "read-call", "send-audio"]
AUDIO = session_pb2.TRACK_TYPE_AUDIO
VIDEO = session_pb2.TRACK_TYPE_VIDEO


@dataclass
class Stubs:
    sessions: session_service_pb2_grpc.SessionServiceStub
    rings: ring_service_pb2_grpc.RingServiceStub
    data: call_data_service_pb2_grpc.CallDataServiceStub
    events: event_service_pb2_grpc.EventServiceStub
    moderation: moderation_service_pb2_grpc.ModerationServiceStub
    calls: call_service_pb2_grpc.CallServiceStub


def _stubs(ch: grpc.aio.Channel) -> Stubs:
    return Stubs(
        session_service_pb2_grpc.SessionServiceStub(ch),
        ring_service_pb2_grpc.RingServiceStub(ch),
        call_data_service_pb2_grpc.CallDataServiceStub(ch),
        event_service_pb2_grpc.EventServiceStub(ch),
        moderation_service_pb2_grpc.ModerationServiceStub(ch),
        call_service_pb2_grpc.CallServiceStub(ch),
    )


@pytest_asyncio.fixture(loop_scope="module")
async def as_user(server: RunningServer) -> AsyncIterator[Callable[..., Stubs]]:
    """as_user("alice") → stubs whose calls carry alice's user token (extra claims as keywords)."""
    opened: list[grpc.aio.Channel] = []

    def make(user_id: str, **claims: Any) -> Stubs:
        ch = channel(server.target, token=user_token(user_id, **claims))
        opened.append(ch)
        return _stubs(ch)

    yield make
    for ch in opened:
        await ch.close()


@pytest.fixture(scope="module")
def admin_stubs(server: RunningServer) -> Stubs:
    return _stubs(server.channel)


@dataclass
class Setup:
    call_type: str
    call_id: str
    host: str
    member: str
    outsider: str

    @property
    def cid(self) -> str:
        return f"{self.call_type}:{self.call_id}"

    def key(self) -> dict[str, str]:
        return {"type": self.call_type, "id": self.call_id}


@pytest_asyncio.fixture(loop_scope="module")
async def setup(server: RunningServer, users, calls, call_types, unique) -> Setup:
    """A call type where plain users get nothing, members read/join/send audio/react and hosts everything;
    one call of it with a host and a plain member, and an outsider."""
    name = unique("authz").lower()
    await call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(
            name=name,
            settings=call_type_pb2.CallSettings(backstage=call_type_pb2.BackstageSettings(enabled=False)),
            grants={
                "user": call_type_pb2.Capabilities(capabilities=[]),
                "call_member": call_type_pb2.Capabilities(capabilities=MEMBER_CAPS),
                "host": call_type_pb2.Capabilities(capabilities=list(CAPABILITIES)),
            },
        )
    )
    host, member, outsider = unique("host"), unique("member"), unique("out")
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=u) for u in (host, member, outsider)])
    )
    call_id = unique("c")
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=name,
            id=call_id,
            data=call_service_pb2.CallData(
                created_by_id=host,
                members=[
                    call_pb2.MemberRequest(user_id=host, role="host"),
                    call_pb2.MemberRequest(user_id=member),
                ],
            ),
        )
    )
    return Setup(name, call_id, host, member, outsider)


async def join(stubs: Stubs, s: Setup, user_id: str, **fields: Any) -> session_service_pb2.JoinCallResponse:
    return await stubs.sessions.JoinCall(
        session_service_pb2.JoinCallRequest(**s.key(), user_id=user_id, **fields)
    )


async def missing(awaitable: Any, capability: str) -> None:
    details = await expect_error(awaitable, DENIED, "MISSING_CAPABILITY")
    assert details.metadata["capability"] == capability, details.metadata


async def first_item(stream: Any) -> Any:
    async for item in stream:
        return item
    return None


async def next_event(stream: Any, event_type: str, seconds: float = 5.0) -> event_pb2.Event:
    async def wait() -> event_pb2.Event:
        async for item in stream:
            if item.HasField("event") and item.event.type == event_type:
                return item.event
        raise AssertionError("stream ended")

    return await asyncio.wait_for(wait(), seconds)


async def call_log(server: RunningServer, cid: str) -> list[event_pb2.Event]:
    assert server.server.store is not None
    stored = await server.server.store.read(lambda tx: tx.events.call_events_after(cid, 0, 10_000))
    return [item.event for item in stored]


# --- SessionService -----------------------------------------------------------------------------------


async def test_join_as_oneself_with_join_call_and_own_capabilities(setup, as_user, admin_stubs):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)
    await missing(join(outsider, s, s.outsider), "join-call")
    details = await expect_error(join(member, s, s.host), DENIED, "NOT_YOURSELF")
    assert details.metadata["requested_user_id"] == s.host
    joined = await join(member, s, s.member)
    assert list(joined.own_capabilities) == MEMBER_CAPS
    hosted = await join(host, s, s.host)
    assert list(hosted.own_capabilities) == sorted(CAPABILITIES)
    # A server token may join anyone (here the outsider, who lacks join-call); own_capabilities are theirs.
    served = await join(admin_stubs, s, s.outsider)
    assert list(served.own_capabilities) == []
    # A token scoped to other calls gets nothing here.
    scoped = as_user(s.member, call_cids=["default:elsewhere"])
    await expect_error(join(scoped, s, s.member), DENIED, "CALL_NOT_IN_TOKEN_SCOPE")


async def test_own_participant_rules_and_tracks(setup, as_user):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)
    mine = (await join(member, s, s.member)).participant.participant_session_id
    theirs = (await join(host, s, s.host)).participant.participant_session_id

    def psid(value: str) -> dict[str, str]:
        return {**s.key(), "participant_session_id": value}

    await expect_error(
        member.sessions.KeepAlive(session_service_pb2.KeepAliveRequest(**psid(theirs))),
        DENIED,
        "NOT_OWN_PARTICIPANT",
    )
    await member.sessions.KeepAlive(session_service_pb2.KeepAliveRequest(**psid(mine)))
    await expect_error(
        member.sessions.UpdateParticipant(
            session_service_pb2.UpdateParticipantRequest(**psid(theirs), published_tracks=[AUDIO])
        ),
        DENIED,
        "NOT_OWN_PARTICIPANT",
    )
    updated = await member.sessions.UpdateParticipant(
        session_service_pb2.UpdateParticipantRequest(**psid(mine), published_tracks=[AUDIO])
    )
    assert list(updated.participant.published_tracks) == [AUDIO]
    await missing(
        member.sessions.UpdateParticipant(
            session_service_pb2.UpdateParticipantRequest(**psid(mine), published_tracks=[AUDIO, VIDEO])
        ),
        "send-video",
    )
    await host.sessions.UpdateParticipant(
        session_service_pb2.UpdateParticipantRequest(**psid(theirs), published_tracks=[AUDIO, VIDEO])
    )
    await expect_error(
        member.sessions.LeaveCall(session_service_pb2.LeaveCallRequest(**psid(theirs))),
        DENIED,
        "NOT_OWN_PARTICIPANT",
    )
    # Reading participants and sessions needs read-call.
    await missing(
        outsider.sessions.QueryCallParticipants(session_service_pb2.QueryCallParticipantsRequest(**s.key())),
        "read-call",
    )
    await missing(
        outsider.sessions.QueryCallSessions(session_service_pb2.QueryCallSessionsRequest(**s.key())),
        "read-call",
    )
    found = await member.sessions.QueryCallParticipants(
        session_service_pb2.QueryCallParticipantsRequest(**s.key())
    )
    assert {p.participant_session_id for p in found.participants} >= {mine, theirs}
    await member.sessions.QueryCallSessions(session_service_pb2.QueryCallSessionsRequest(**s.key()))
    await member.sessions.LeaveCall(session_service_pb2.LeaveCallRequest(**psid(mine)))
    await host.sessions.LeaveCall(session_service_pb2.LeaveCallRequest(**psid(theirs)))


async def test_backstage_and_ended_calls(setup, as_user, admin_stubs):
    s = setup
    member, host = as_user(s.member), as_user(s.host)
    await missing(member.sessions.StopLive(session_service_pb2.StopLiveRequest(**s.key())), "update-call")
    await host.sessions.StopLive(session_service_pb2.StopLiveRequest(**s.key()))
    # Without join-backstage the backstage rule applies (no starts_at: only going live opens it).
    await expect_error(join(member, s, s.member), grpc.StatusCode.FAILED_PRECONDITION, "CALL_IN_BACKSTAGE")
    await join(host, s, s.host)  # join-backstage
    await missing(member.sessions.GoLive(session_service_pb2.GoLiveRequest(**s.key())), "update-call")
    await host.sessions.GoLive(session_service_pb2.GoLiveRequest(**s.key()))
    await join(member, s, s.member)
    await admin_stubs.calls.EndCall(call_service_pb2.EndCallRequest(**s.key()))
    await expect_error(join(member, s, s.member), grpc.StatusCode.FAILED_PRECONDITION, "CALL_ENDED")
    rejoined = await join(host, s, s.host)  # join-ended-call
    assert rejoined.session.participant_count == 1


# --- RingService --------------------------------------------------------------------------------------


async def test_ringing_as_oneself(setup, as_user):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)

    def ring(stubs: Stubs, user_id: str, callees: list[str]) -> Any:
        return stubs.rings.RingCall(
            ring_service_pb2.RingCallRequest(**s.key(), user_id=user_id, members_ids=callees)
        )

    await missing(ring(member, s.member, [s.host]), "create-call")
    await expect_error(ring(member, s.host, [s.member]), DENIED, "NOT_YOURSELF")
    rung = await ring(host, s.host, [s.member])
    assert list(rung.members_ids) == [s.member]
    await expect_error(
        member.rings.AcceptCall(ring_service_pb2.AcceptCallRequest(**s.key(), user_id=s.host)),
        DENIED,
        "NOT_YOURSELF",
    )
    await missing(
        outsider.rings.RejectCall(ring_service_pb2.RejectCallRequest(**s.key(), user_id=s.outsider)),
        "read-call",
    )
    await member.rings.AcceptCall(ring_service_pb2.AcceptCallRequest(**s.key(), user_id=s.member))


# --- CallDataService and per-user permissions ---------------------------------------------------------


async def test_custom_data_events_and_pins_with_granted_permission(setup, as_user, server):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)
    mine = (await join(member, s, s.member)).participant.participant_session_id
    theirs = (await join(host, s, s.host)).participant.participant_session_id

    await expect_error(
        member.data.UpdateParticipantCustom(
            call_data_service_pb2.UpdateParticipantCustomRequest(
                **s.key(), participant_session_id=theirs, user_id=s.host
            )
        ),
        DENIED,
        "NOT_YOURSELF",
    )
    await member.data.UpdateParticipantCustom(
        call_data_service_pb2.UpdateParticipantCustomRequest(
            **s.key(), participant_session_id=mine, user_id=s.member
        )
    )
    await expect_error(
        member.data.UpdateSessionCustom(
            call_data_service_pb2.UpdateSessionCustomRequest(**s.key(), user_id=s.host)
        ),
        DENIED,
        "NOT_YOURSELF",
    )
    await member.data.UpdateSessionCustom(
        call_data_service_pb2.UpdateSessionCustomRequest(**s.key(), user_id=s.member)
    )
    await expect_error(
        member.data.SendCallEvent(call_data_service_pb2.SendCallEventRequest(**s.key(), user_id=s.host)),
        DENIED,
        "NOT_YOURSELF",
    )
    await member.data.SendCallEvent(call_data_service_pb2.SendCallEventRequest(**s.key(), user_id=s.member))
    await missing(
        outsider.data.SendCallEvent(
            call_data_service_pb2.SendCallEventRequest(**s.key(), user_id=s.outsider)
        ),
        "create-reaction",
    )

    def pin(stubs: Stubs) -> Any:
        return stubs.data.PinParticipant(
            call_data_service_pb2.PinParticipantRequest(
                **s.key(), participant_session_id=theirs, user_id=s.host
            )
        )

    def unpin(stubs: Stubs) -> Any:
        return stubs.data.UnpinParticipant(
            call_data_service_pb2.UnpinParticipantRequest(
                **s.key(), participant_session_id=theirs, user_id=s.host
            )
        )

    await missing(pin(member), "pin-for-everyone")

    def permissions(stubs: Stubs, grant: list[str], revoke: list[str], user_id: str = s.member) -> Any:
        return stubs.moderation.UpdateUserPermissions(
            moderation_service_pb2.UpdateUserPermissionsRequest(
                **s.key(), user_id=user_id, grant_permissions=grant, revoke_permissions=revoke
            )
        )

    await missing(permissions(member, ["pin-for-everyone"], []), "update-call-permissions")
    await expect_error(
        permissions(host, ["fly"], []), grpc.StatusCode.INVALID_ARGUMENT, fields=["grant_permissions[0]"]
    )
    granted = await permissions(host, ["pin-for-everyone"], ["send-audio"])
    assert set(granted.own_capabilities) == set(MEMBER_CAPS) - {"send-audio"} | {"pin-for-everyone"}
    assert [p.participant_session_id for p in (await pin(member)).pins] == [theirs]
    # The user hears about it on their own stream (and it is in the call's log).
    log = await call_log(server, s.cid)
    updated = [e for e in log if e.type == "call.permissions_updated"][-1].call_permissions_updated
    assert updated.user_id == s.member and "pin-for-everyone" in updated.own_capabilities
    await missing(
        member.sessions.UpdateParticipant(
            session_service_pb2.UpdateParticipantRequest(
                **s.key(), participant_session_id=mine, published_tracks=[AUDIO]
            )
        ),
        "send-audio",
    )
    # Revoking again: grant and revoke merge with what was there.
    revoked = await permissions(host, ["send-audio"], ["pin-for-everyone"])
    assert list(revoked.own_capabilities) == MEMBER_CAPS
    await missing(unpin(member), "pin-for-everyone")
    assert list((await unpin(host)).pins) == []


async def test_request_permission_reaches_hosts(setup, as_user, server):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)
    await missing(
        outsider.moderation.RequestPermission(
            moderation_service_pb2.RequestPermissionRequest(**s.key(), permissions=["send-video"])
        ),
        "read-call",
    )
    await expect_error(
        member.moderation.RequestPermission(
            moderation_service_pb2.RequestPermissionRequest(**s.key(), permissions=["nope"])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["permissions[0]"],
    )
    stream = host.events.WatchUser(event_service_pb2.WatchUserRequest(user_id=s.host))
    try:
        await asyncio.wait_for(first_item(stream), 5)  # the stream has started
        await member.moderation.RequestPermission(
            moderation_service_pb2.RequestPermissionRequest(**s.key(), permissions=["send-video"])
        )
        asked = await next_event(stream, "call.permission_request")
        assert asked.call_permission_request.user_id == s.member
        assert list(asked.call_permission_request.permissions) == ["send-video"]
    finally:
        stream.cancel()
    # Only those who may grant receive it: not the plain member (nor the asker).
    assert server.server.store is not None
    delivered = await server.server.store.read(lambda tx: tx.events.user_events_after(s.member, 0, 1000))
    assert "call.permission_request" not in [e.type for e in delivered]


# --- EventService -------------------------------------------------------------------------------------


async def test_stream_authorization(setup, as_user, users, unique):
    s = setup
    member, host, outsider = as_user(s.member), as_user(s.host), as_user(s.outsider)
    await expect_error(
        first_item(member.events.WatchUser(event_service_pb2.WatchUserRequest(user_id=s.host))),
        DENIED,
        "NOT_YOURSELF",
    )
    await missing(
        first_item(outsider.events.WatchCall(event_service_pb2.WatchCallRequest(**s.key(), snapshot=True))),
        "read-call",
    )
    snapshot = await asyncio.wait_for(
        first_item(member.events.WatchCall(event_service_pb2.WatchCallRequest(**s.key(), snapshot=True))), 5
    )
    assert snapshot.snapshot.call.cid == s.cid
    theirs = (await join(host, s, s.host)).participant.participant_session_id
    await expect_error(
        first_item(
            member.events.WatchCall(
                event_service_pb2.WatchCallRequest(**s.key(), snapshot=True, participant_session_id=theirs)
            )
        ),
        DENIED,
        "NOT_OWN_PARTICIPANT",
    )
    # SubscribeEvents: a plain user names readable calls; an admin needs nothing.
    await expect_error(
        first_item(member.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest())),
        DENIED,
        "ADMIN_REQUIRED",
    )
    await missing(
        first_item(
            outsider.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest(call_cids=[s.cid]))
        ),
        "read-call",
    )
    await expect_error(
        first_item(
            member.events.SubscribeEvents(
                event_service_pb2.SubscribeEventsRequest(call_cids=[f"{s.cid}-{i}" for i in range(101)])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["call_cids"],
    )
    started = await asyncio.wait_for(
        first_item(
            member.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest(call_cids=[s.cid]))
        ),
        5,
    )
    assert started.HasField("progress")
    admin = unique("admin")
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=admin, role="admin")]))
    started = await asyncio.wait_for(
        first_item(as_user(admin).events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest())), 5
    )
    assert started.HasField("progress")


# --- ModerationService --------------------------------------------------------------------------------


async def test_block_kick_and_unblock(setup, as_user, server):
    s = setup
    member, host = as_user(s.member), as_user(s.host)
    key = s.key()
    await missing(
        member.moderation.BlockUser(moderation_service_pb2.BlockUserRequest(**key, user_id=s.outsider)),
        "block-users",
    )
    await missing(
        member.moderation.KickUser(moderation_service_pb2.KickUserRequest(**key, user_id=s.host)), "kick-user"
    )
    joined = await join(member, s, s.member)
    await host.moderation.BlockUser(moderation_service_pb2.BlockUserRequest(**key, user_id=s.member))
    call = (await host.calls.GetCall(call_service_pb2.GetCallRequest(**key))).call
    assert list(call.blocked_user_ids) == [s.member]
    log = await call_log(server, s.cid)
    left = [e for e in log if e.type == "call.session_participant_left"][-1].call_session_participant_left
    assert left.participant.participant_session_id == joined.participant.participant_session_id
    assert left.reason == "blocked"
    blocked = [e for e in log if e.type == "call.blocked_user"][-1].call_blocked_user
    assert (blocked.user_id, blocked.by_user_id) == (s.member, s.host)
    # Blocked users cannot join, nor read.
    await expect_error(join(member, s, s.member), DENIED, "USER_BLOCKED")
    await expect_error(
        member.sessions.QueryCallParticipants(session_service_pb2.QueryCallParticipantsRequest(**key)),
        DENIED,
        "USER_BLOCKED",
    )
    await host.moderation.UnblockUser(moderation_service_pb2.UnblockUserRequest(**key, user_id=s.member))
    assert (await call_log(server, s.cid))[-1].type == "call.unblocked_user"
    again = await join(member, s, s.member)

    # Kick without block: they leave ("kicked") and may come back.
    await host.moderation.KickUser(moderation_service_pb2.KickUserRequest(**key, user_id=s.member))
    log = await call_log(server, s.cid)
    left = [e for e in log if e.type == "call.session_participant_left"][-1].call_session_participant_left
    assert left.participant.participant_session_id == again.participant.participant_session_id
    assert left.reason == "kicked"
    assert log[-1].type == "call.kicked_user"
    await join(member, s, s.member)
    # Kick with block: both events, and no way back.
    await host.moderation.KickUser(
        moderation_service_pb2.KickUserRequest(**key, user_id=s.member, block=True)
    )
    tail = [e.type for e in (await call_log(server, s.cid))[-2:]]
    assert tail == ["call.kicked_user", "call.blocked_user"]
    await expect_error(join(member, s, s.member), DENIED, "USER_BLOCKED")
