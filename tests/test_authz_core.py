"""Authorization of CallTypeService, UserService and CallService for user tokens: admin-only RPCs, users
acting only as themselves, capability checks from call-type grants, member roles and per-user overrides,
QueryCalls / QueryUsers visibility and `own_capabilities`. Server tokens may do everything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server.domain.capabilities import CAPABILITIES
from tests.errors import expect_error
from tests.support import RunningServer, channel, running_server, struct, user_token

DENIED = grpc.StatusCode.PERMISSION_DENIED
ALL = list(CAPABILITIES)
READ_ONLY = ["read-call"]
MEMBER = ["read-call", "join-call", "send-audio"]


@dataclass
class Stubs:
    calls: call_service_pb2_grpc.CallServiceStub
    users: user_pb2_grpc.UserServiceStub
    call_types: call_type_service_pb2_grpc.CallTypeServiceStub
    sessions: session_service_pb2_grpc.SessionServiceStub


def stubs_for(target: grpc.aio.Channel) -> Stubs:
    return Stubs(
        call_service_pb2_grpc.CallServiceStub(target),
        user_pb2_grpc.UserServiceStub(target),
        call_type_service_pb2_grpc.CallTypeServiceStub(target),
        session_service_pb2_grpc.SessionServiceStub(target),
    )


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Stubs:
    """Server-token stubs."""
    return stubs_for(server.channel)


@asynccontextmanager
async def acting_as(server: RunningServer, user_id: str, **claims: Any) -> AsyncIterator[Stubs]:
    async with channel(server.target, token=user_token(user_id, **claims)) as user_channel:
        yield stubs_for(user_channel)


def grants(**roles: list[str]) -> dict[str, call_type_pb2.Capabilities]:
    return {
        role.replace("__", "-"): call_type_pb2.Capabilities(capabilities=caps) for role, caps in roles.items()
    }


async def make_type(admin: Stubs, unique: Callable[[str], str], /, **roles: list[str]) -> str:
    """A call type of this test's own, whose grants are exactly `roles` (other roles get nothing)."""
    name = unique("t")
    await admin.call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=name, grants=grants(**roles))
    )
    # Roles not named keep the `default` grants on create; take them away so only `roles` count.
    current = (
        await admin.call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))
    ).call_type.grants
    extra = {role: call_type_pb2.Capabilities() for role in current if role not in roles}
    if extra:
        await admin.call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(name=name, grants=extra)
        )
    return name


async def make_user(
    admin: Stubs, unique: Callable[[str], str], role: str = "", teams: list[str] | None = None
) -> str:
    user_id = unique("u")
    await admin.users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id, role=role, teams=teams or [])])
    )
    return user_id


async def make_call(
    stubs: Stubs,
    call_type: str,
    call_id: str,
    members: dict[str, str] | None = None,
    **data: Any,
) -> call_service_pb2.GetOrCreateCallResponse:
    member_requests = [call_pb2.MemberRequest(user_id=u, role=r) for u, r in (members or {}).items()]
    return await stubs.calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=call_type, id=call_id, data=call_service_pb2.CallData(members=member_requests, **data)
        )
    )


def key(call_type: str, call_id: str) -> dict[str, str]:
    return {"type": call_type, "id": call_id}


async def expect_missing(awaitable: Any, capability: str) -> None:
    details = await expect_error(awaitable, DENIED, "MISSING_CAPABILITY")
    assert details.metadata["capability"] == capability, details.metadata


# -- CallTypeService ---------------------------------------------------------------------------------------


async def test_call_type_writes_need_server_or_admin(server: RunningServer, admin: Stubs, unique) -> None:
    plain = await make_user(admin, unique)
    boss = await make_user(admin, unique, role="admin")
    name = unique("t")
    async with acting_as(server, plain) as user:
        await expect_error(
            user.call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name)),
            DENIED,
            "ADMIN_REQUIRED",
        )
        await expect_error(
            user.call_types.UpdateCallType(call_type_service_pb2.UpdateCallTypeRequest(name="default")),
            DENIED,
            "ADMIN_REQUIRED",
        )
        await expect_error(
            user.call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name="default")),
            DENIED,
            "ADMIN_REQUIRED",
        )
        # Reading is open to every authenticated caller.
        got = await user.call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name="default"))
        assert got.call_type.name == "default"
        listed = await user.call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
        assert "default" in [t.name for t in listed.call_types]
    async with acting_as(server, boss) as boss_stubs:
        await boss_stubs.call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
        await boss_stubs.call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(name=name, grants=grants(user=READ_ONLY))
        )
        await boss_stubs.call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name))


# -- UserService -------------------------------------------------------------------------------------------


async def test_users_upsert_only_themselves_without_role_or_teams(
    server: RunningServer, admin: Stubs, unique
) -> None:
    alice = await make_user(admin, unique, role="moderator", teams=["red"])
    other = await make_user(admin, unique)
    async with acting_as(server, alice) as user:
        same = user_pb2.UserRequest(id=alice, name="Alice", role="moderator", teams=["red"])
        done = await user.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[same]))
        assert done.users[0].name == "Alice"
        details = await expect_error(
            user.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=other)])),
            DENIED,
            "NOT_YOURSELF",
        )
        assert details.metadata["requested_user_id"] == other
        await expect_error(
            user.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[same, user_pb2.UserRequest(id=other)])),
            DENIED,
            "NOT_YOURSELF",
        )
        for change in (
            user_pb2.UserRequest(id=alice, role="admin", teams=["red"]),
            user_pb2.UserRequest(id=alice, role="", teams=["red"]),  # would reset the role to `user`
            user_pb2.UserRequest(id=alice, role="moderator", teams=["red", "blue"]),
            user_pb2.UserRequest(id=alice, role="moderator"),
        ):
            await expect_error(
                user.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[change])), DENIED, "ADMIN_REQUIRED"
            )
    # A token for a user that does not exist yet may create it as a plain user without teams.
    newcomer = unique("u")
    async with acting_as(server, newcomer) as user:
        await expect_error(
            user.users.UpsertUsers(
                user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=newcomer, teams=["red"])])
            ),
            DENIED,
            "ADMIN_REQUIRED",
        )
        created = await user.users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=newcomer, role="user", name="N")])
        )
        assert created.users[0].role == "user"


async def test_users_update_only_themselves_and_not_role_or_teams(
    server: RunningServer, admin: Stubs, unique
) -> None:
    alice = await make_user(admin, unique, teams=["red"])
    other = await make_user(admin, unique)
    boss = await make_user(admin, unique, role="admin")

    def patch(user_id: str, set_: dict[str, Any] | None = None, unset: list[str] | None = None):
        return user_pb2.UpdateUsersPartialRequest(
            users=[user_pb2.UserPartialUpdate(id=user_id, set=struct(set_ or {}), unset=unset or [])]
        )

    async with acting_as(server, alice) as user:
        done = await user.users.UpdateUsersPartial(patch(alice, {"name": "Alice", "custom.color": "red"}))
        assert done.users[0].name == "Alice"
        await expect_error(user.users.UpdateUsersPartial(patch(other, {"name": "x"})), DENIED, "NOT_YOURSELF")
        await expect_error(
            user.users.UpdateUsersPartial(patch(alice, {"role": "admin"})), DENIED, "ADMIN_REQUIRED"
        )
        await expect_error(
            user.users.UpdateUsersPartial(patch(alice, {"teams": ["blue"]})), DENIED, "ADMIN_REQUIRED"
        )
        await expect_error(
            user.users.UpdateUsersPartial(patch(alice, unset=["teams"])), DENIED, "ADMIN_REQUIRED"
        )
        await expect_error(
            user.users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[alice])), DENIED, "ADMIN_REQUIRED"
        )
    async with acting_as(server, boss) as boss_stubs:
        await boss_stubs.users.UpdateUsersPartial(patch(other, {"teams": ["blue"], "role": "host"}))
        deleted = await boss_stubs.users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[other]))
        assert list(deleted.deleted_user_ids) == [other]


async def test_query_users_shows_only_users_sharing_a_team(
    server: RunningServer, admin: Stubs, unique
) -> None:
    tag = unique("tag")
    team_a, team_b = unique("team"), unique("team")

    async def tagged(role: str = "", teams: list[str] | None = None) -> str:
        user_id = await make_user(admin, unique, role=role, teams=teams)
        await admin.users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[user_pb2.UserPartialUpdate(id=user_id, set=struct({"custom.tag": tag}))]
            )
        )
        return user_id

    in_a = await tagged(teams=[team_a])
    in_ab = await tagged(teams=[team_a, team_b])
    in_b = await tagged(teams=[team_b])
    loner, loner2 = await tagged(), await tagged()
    boss = await tagged(role="admin", teams=[team_b])
    everyone = {in_a, in_ab, in_b, loner, loner2, boss}
    request = user_pb2.QueryUsersRequest(filter_conditions=struct({"custom.tag": tag}), limit=100)

    async def visible(user_id: str) -> set[str]:
        async with acting_as(server, user_id) as user:
            return {u.id for u in (await user.users.QueryUsers(request)).users}

    assert {u.id for u in (await admin.users.QueryUsers(request)).users} == everyone
    assert await visible(in_a) == {in_a, in_ab}
    assert await visible(in_b) == {in_ab, in_b, boss}
    assert await visible(loner) == {loner, loner2}
    assert await visible(boss) == everyone
    # Paging keeps the restriction.
    async with acting_as(server, in_b) as user:
        paged: list[str] = []
        page = await user.users.QueryUsers(
            user_pb2.QueryUsersRequest(filter_conditions=struct({"custom.tag": tag}), limit=1)
        )
        paged += [u.id for u in page.users]
        while page.next:
            page = await user.users.QueryUsers(
                user_pb2.QueryUsersRequest(
                    filter_conditions=struct({"custom.tag": tag}), limit=1, next=page.next
                )
            )
            paged += [u.id for u in page.users]
        assert set(paged) == {in_ab, in_b, boss} and len(paged) == 3


# -- CallService -------------------------------------------------------------------------------------------


async def test_get_or_create_checks_create_call_and_read_call(
    server: RunningServer, admin: Stubs, unique
) -> None:
    open_type = await make_type(admin, unique, user=["create-call", "read-call"])
    members_type = await make_type(admin, unique, user=[], call_member=["create-call", "read-call"])
    alice = await make_user(admin, unique)
    bob = await make_user(admin, unique)
    async with acting_as(server, alice) as user:
        created = await make_call(user, open_type, unique("c"))
        assert created.created
        # created_by defaults to the caller.
        assert created.call.created_by_user_id == alice
        assert list(created.own_capabilities) == ["create-call", "read-call"]
        await expect_error(make_call(user, open_type, unique("c"), created_by_id=bob), DENIED, "NOT_YOURSELF")
        assert (await make_call(user, open_type, unique("c"), created_by_id=alice)).created
        # Creating: the caller's member role in the new call counts; without it, create-call is missing.
        await expect_missing(make_call(user, members_type, unique("c")), "create-call")
        as_member = await make_call(user, members_type, unique("c"), members={alice: "user"})
        assert as_member.created and list(as_member.own_capabilities) == ["create-call", "read-call"]
        # Getting an existing call needs read-call.
        theirs = unique("c")
        await make_call(admin, members_type, theirs, members={bob: "user"})
        await expect_missing(make_call(user, members_type, theirs), "read-call")
        again = await make_call(user, open_type, created.call.id)
        assert not again.created and list(again.own_capabilities) == ["create-call", "read-call"]
    # The denied creation left no call behind.
    missing = await admin.calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"type": members_type}), limit=100)
    )
    assert sorted(c.call.id for c in missing.calls) == sorted([as_member.call.id, theirs])


async def test_get_or_create_in_a_team_needs_that_team(server: RunningServer, admin: Stubs, unique) -> None:
    call_type = await make_type(admin, unique, user=["create-call", "read-call"])
    red = unique("red")
    alice = await make_user(admin, unique, teams=[red])
    async with acting_as(server, alice) as user:
        assert (await make_call(user, call_type, unique("c"), team=red)).call.team == red
        details = await expect_error(
            make_call(user, call_type, unique("c"), team=unique("blue")), DENIED, "TEAM_MISMATCH"
        )
        assert details.metadata["user_id"] == alice
        assert (await make_call(user, call_type, unique("c"))).created
    # Existing calls of another team are not readable either.
    other = unique("c")
    await make_call(admin, call_type, other, team=unique("blue"))
    async with acting_as(server, alice) as user:
        await expect_error(make_call(user, call_type, other), DENIED, "TEAM_MISMATCH")
        await expect_error(
            user.calls.GetCall(call_service_pb2.GetCallRequest(**key(call_type, other))),
            DENIED,
            "TEAM_MISMATCH",
        )


async def test_token_scope_limits_calls(server: RunningServer, admin: Stubs, unique) -> None:
    call_type = await make_type(admin, unique, user=["create-call", "read-call"])
    alice = await make_user(admin, unique)
    inside, outside = unique("c"), unique("c")
    for call_id in (inside, outside):
        await make_call(admin, call_type, call_id)
    async with acting_as(server, alice, call_cids=[f"{call_type}:{inside}"]) as user:
        got = await user.calls.GetCall(call_service_pb2.GetCallRequest(**key(call_type, inside)))
        assert list(got.own_capabilities) == ["create-call", "read-call"]
        await expect_error(
            user.calls.GetCall(call_service_pb2.GetCallRequest(**key(call_type, outside))),
            DENIED,
            "CALL_NOT_IN_TOKEN_SCOPE",
        )
        await expect_error(make_call(user, call_type, unique("c")), DENIED, "CALL_NOT_IN_TOKEN_SCOPE")
        listed = await user.calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(filter_conditions=struct({"type": call_type}))
        )
        assert [c.call.id for c in listed.calls] == [inside]


async def test_get_call_update_call_and_end_call_capabilities(
    server: RunningServer, admin: Stubs, unique
) -> None:
    call_type = await make_type(
        admin,
        unique,
        user=READ_ONLY,
        host=["update-call", "end-call"],
        moderator=["update-call", "update-call-settings"],
        admin=ALL,
    )
    host, moderator, reader = [await make_user(admin, unique) for _ in range(3)]
    call_id = unique("c")
    await make_call(admin, call_type, call_id, members={host: "host", moderator: "moderator"})
    ident = key(call_type, call_id)
    settings = call_type_pb2.CallSettings(audio=call_type_pb2.AudioSettings(mic_default_on=False))
    duration = call_type_pb2.CallSettings(limits=call_type_pb2.LimitsSettings(max_duration_seconds=600))

    async with acting_as(server, reader) as user:
        got = await user.calls.GetCall(call_service_pb2.GetCallRequest(**ident))
        assert list(got.own_capabilities) == ["read-call"]
        await expect_missing(
            user.calls.UpdateCall(call_service_pb2.UpdateCallRequest(**ident, custom=struct({"a": 1}))),
            "update-call",
        )
        await expect_missing(user.calls.EndCall(call_service_pb2.EndCallRequest(**ident)), "end-call")
    async with acting_as(server, host) as user:
        got = await user.calls.GetCall(call_service_pb2.GetCallRequest(**ident))
        assert list(got.own_capabilities) == ["read-call", "update-call", "end-call"]
        updated = await user.calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(**ident, custom=struct({"a": 1}))
        )
        assert updated.call.custom["a"] == 1
        await expect_missing(
            user.calls.UpdateCall(call_service_pb2.UpdateCallRequest(**ident, settings_override=settings)),
            "update-call-settings",
        )
    async with acting_as(server, moderator) as user:
        await user.calls.UpdateCall(call_service_pb2.UpdateCallRequest(**ident, settings_override=settings))
        await expect_missing(
            user.calls.UpdateCall(call_service_pb2.UpdateCallRequest(**ident, settings_override=duration)),
            "change-max-duration",
        )
        await expect_missing(user.calls.EndCall(call_service_pb2.EndCallRequest(**ident)), "end-call")
    async with acting_as(server, host) as user:
        ended = await user.calls.EndCall(call_service_pb2.EndCallRequest(**ident))
        assert ended.call.HasField("ended_at")


async def test_delete_call_needs_server_or_admin(server: RunningServer, admin: Stubs, unique) -> None:
    call_type = await make_type(admin, unique, user=ALL)
    plain = await make_user(admin, unique)
    boss = await make_user(admin, unique, role="admin")
    call_id = unique("c")
    await make_call(admin, call_type, call_id)
    async with acting_as(server, plain) as user:
        await expect_error(
            user.calls.DeleteCall(call_service_pb2.DeleteCallRequest(**key(call_type, call_id))),
            DENIED,
            "ADMIN_REQUIRED",
        )
    async with acting_as(server, boss) as user:
        deleted = await user.calls.DeleteCall(
            call_service_pb2.DeleteCallRequest(**key(call_type, call_id), hard=True)
        )
        assert deleted.call.id == call_id


async def test_update_call_members_and_query_members(server: RunningServer, admin: Stubs, unique) -> None:
    call_type = await make_type(
        admin,
        unique,
        user=[],
        call_member=READ_ONLY,
        host=["update-call-member", "remove-call-member"],
        moderator=["update-call-member"],
    )
    host, moderator, member, outsider = [await make_user(admin, unique) for _ in range(4)]
    call_id = unique("c")
    ident = key(call_type, call_id)
    await make_call(admin, call_type, call_id, members={host: "host", moderator: "moderator", member: "user"})
    add = [call_pb2.MemberRequest(user_id=outsider)]

    async with acting_as(server, outsider) as user:
        await expect_missing(
            user.calls.QueryMembers(call_service_pb2.QueryMembersRequest(**ident)), "read-call"
        )
    async with acting_as(server, member) as user:
        page = await user.calls.QueryMembers(call_service_pb2.QueryMembersRequest(**ident))
        assert {m.user_id for m in page.members} == {host, moderator, member}
        await expect_missing(
            user.calls.UpdateCallMembers(
                call_service_pb2.UpdateCallMembersRequest(**ident, update_members=add)
            ),
            "update-call-member",
        )
    async with acting_as(server, moderator) as user:
        await user.calls.UpdateCallMembers(
            call_service_pb2.UpdateCallMembersRequest(**ident, update_members=add)
        )
        await expect_missing(
            user.calls.UpdateCallMembers(
                call_service_pb2.UpdateCallMembersRequest(**ident, remove_members=[member])
            ),
            "remove-call-member",
        )
    async with acting_as(server, host) as user:
        removed = await user.calls.UpdateCallMembers(
            call_service_pb2.UpdateCallMembersRequest(**ident, remove_members=[member])
        )
        assert list(removed.removed_user_ids) == [member]


async def test_query_calls_returns_only_readable_calls(server: RunningServer, admin: Stubs, unique) -> None:
    red, blue = unique("red"), unique("blue")
    everyone_reads = await make_type(admin, unique, user=READ_ONLY)
    members_read = await make_type(admin, unique, user=[], call_member=READ_ONLY)
    hosts_read = await make_type(admin, unique, user=[], call_member=[], host=READ_ONLY)
    nobody_reads = await make_type(admin, unique, user=[], call_member=[])
    alice = await make_user(admin, unique, teams=[red])
    boss = await make_user(admin, unique, role="admin", teams=[red])
    tag = unique("tag")

    async def call(call_type: str, members: dict[str, str] | None = None, team: str = "") -> str:
        call_id = unique("c")
        await make_call(admin, call_type, call_id, members=members, team=team, custom=struct({"tag": tag}))
        return call_id

    expected_alice = {
        await call(everyone_reads),
        await call(everyone_reads, team=red),
        await call(members_read, {alice: "user"}),
        await call(hosts_read, {alice: "host"}),
    }
    blue_calls = {
        await call(everyone_reads, team=blue),  # another team
        await call(members_read, {alice: "user"}, team=blue),  # member, but another team
    }
    hidden = {
        *blue_calls,
        await call(members_read),  # not a member
        await call(hosts_read, {alice: "user"}),  # member without a reading role
        await call(nobody_reads, {alice: "host"}),
    }
    blocked = await call(everyone_reads)
    granted = await call(nobody_reads)
    revoked = await call(everyone_reads)
    # Blocks and per-user overrides are written by ModerationService; set them straight in the store.
    await _block_and_override(
        server,
        f"{everyone_reads}:{blocked}",
        f"{nobody_reads}:{granted}",
        f"{everyone_reads}:{revoked}",
        alice,
    )
    expected_alice.add(granted)
    hidden |= {blocked, revoked}
    request = call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.tag": tag}), limit=100)

    all_calls = {c.call.id for c in (await admin.calls.QueryCalls(request)).calls}
    assert all_calls == expected_alice | hidden
    async with acting_as(server, alice) as user:
        result = await user.calls.QueryCalls(request)
        assert {c.call.id for c in result.calls} == expected_alice
        for state in result.calls:
            assert "read-call" in state.own_capabilities
            assert list(state.own_capabilities) == [c for c in CAPABILITIES if c in state.own_capabilities]
        # Paging keeps the restriction.
        seen: list[str] = []
        page = await user.calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.tag": tag}), limit=2)
        )
        seen += [c.call.id for c in page.calls]
        while page.next:
            page = await user.calls.QueryCalls(
                call_service_pb2.QueryCallsRequest(
                    filter_conditions=struct({"custom.tag": tag}), limit=2, next=page.next
                )
            )
            seen += [c.call.id for c in page.calls]
        assert sorted(seen) == sorted(expected_alice)
    # A global admin reads every call, across teams, whatever the grants.
    async with acting_as(server, boss) as user:
        result = await user.calls.QueryCalls(request)
        assert {c.call.id for c in result.calls} == all_calls
        for state in result.calls:
            assert list(state.own_capabilities) == ALL
    # A server token sees everything, with every capability.
    for state in (await admin.calls.QueryCalls(request)).calls:
        assert list(state.own_capabilities) == ALL


async def _block_and_override(
    server: RunningServer, blocked: str, granted: str, revoked: str, user_id: str
) -> None:
    store = server.server.store
    assert store is not None

    async def work(tx: Any) -> None:
        call = await tx.calls.open(blocked, server.clock())
        call.block(user_id)
        await tx.permissions.save(granted, user_id, ["read-call"], [])
        await tx.permissions.save(revoked, user_id, [], ["read-call"])

    await store.write(work)


async def test_call_messages_carry_blocked_user_ids(server: RunningServer, admin: Stubs, unique) -> None:
    call_type = await make_type(admin, unique, user=READ_ONLY)
    victim = await make_user(admin, unique)
    call_id = unique("c")
    await make_call(admin, call_type, call_id)
    store = server.server.store
    assert store is not None

    async def work(tx: Any) -> None:
        call = await tx.calls.open(f"{call_type}:{call_id}", server.clock())
        call.block(victim)

    await store.write(work)
    got = await admin.calls.GetCall(call_service_pb2.GetCallRequest(**key(call_type, call_id)))
    assert list(got.call.blocked_user_ids) == [victim]
    assert list(got.own_capabilities) == ALL
    async with acting_as(server, victim) as user:
        await expect_error(
            user.calls.GetCall(call_service_pb2.GetCallRequest(**key(call_type, call_id))),
            DENIED,
            "USER_BLOCKED",
        )


async def test_members_only_recipe(server: RunningServer, admin: Stubs, unique) -> None:
    """Acceptance 2: grants as the seeds' members-only recipe (`user` without join-call, `call_member`
    with it): a non-member's JoinCall is PERMISSION_DENIED, a member's succeeds."""
    call_type = await make_type(
        admin,
        unique,
        user=["create-call", "read-call", "send-audio", "send-video"],
        call_member=["read-call", "join-call", "send-audio", "send-video"],
    )
    member, stranger = await make_user(admin, unique), await make_user(admin, unique)
    call_id = unique("c")
    await make_call(admin, call_type, call_id, members={member: "user"})

    def join(user_id: str) -> session_service_pb2.JoinCallRequest:
        return session_service_pb2.JoinCallRequest(**key(call_type, call_id), user_id=user_id)

    async with acting_as(server, stranger) as user:
        await expect_missing(user.sessions.JoinCall(join(stranger)), "join-call")
    async with acting_as(server, member) as user:
        joined = await user.sessions.JoinCall(join(member))
        assert joined.participant.user_id == member


async def test_members_only_recipe_on_the_default_type(backend: str, tmp_path: Path) -> None:
    """Acceptance 2, literally: update the built-in `default` type's grants as the recipe says (take
    join-call from `user`, keep it on `call_member`), on a database of this test's own."""
    async with running_server(backend, tmp_path) as running:
        admin_stubs = stubs_for(running.channel)
        current = (
            await admin_stubs.call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name="default"))
        ).call_type.grants
        user_caps = [c for c in current["user"].capabilities if c != "join-call"]
        assert "join-call" in current["call_member"].capabilities
        await admin_stubs.call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(name="default", grants=grants(user=user_caps))
        )
        await admin_stubs.users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id="m"), user_pb2.UserRequest(id="s")])
        )
        await make_call(admin_stubs, "default", "standup", members={"m": "user"})
        request = {"type": "default", "id": "standup"}
        async with acting_as(running, "s") as stranger:
            await expect_missing(
                stranger.sessions.JoinCall(session_service_pb2.JoinCallRequest(**request, user_id="s")),
                "join-call",
            )
        async with acting_as(running, "m") as member:
            joined = await member.sessions.JoinCall(
                session_service_pb2.JoinCallRequest(**request, user_id="m")
            )
            assert joined.participant.user_id == "m"
            assert "join-call" in joined.own_capabilities
