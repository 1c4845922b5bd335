"""CallService members: UpdateCallMembers (upsert, remove, all-or-nothing) and QueryMembers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from callplane.v1 import call_pb2, call_service_pb2, query_pb2, user_pb2
from tests.errors import expect_error
from tests.support import struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


async def make_users(users, unique, count: int) -> list[str]:
    ids = [unique("u") for _ in range(count)]
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i, name=i) for i in ids])
    )
    return ids


async def make_call(calls, unique, members: list[str] | None = None) -> str:
    call_id = unique("c")
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                members=[call_pb2.MemberRequest(user_id=m) for m in members or []]
            ),
        )
    )
    return call_id


def change(call_id: str, update=(), remove=()) -> call_service_pb2.UpdateCallMembersRequest:
    return call_service_pb2.UpdateCallMembersRequest(
        type="default", id=call_id, update_members=list(update), remove_members=list(remove)
    )


async def member_ids(calls, call_id: str, **request: Any) -> list[str]:
    response = await calls.QueryMembers(
        call_service_pb2.QueryMembersRequest(type="default", id=call_id, **request)
    )
    return [member.user_id for member in response.members]


async def get_call(calls, call_id: str) -> call_service_pb2.GetCallResponse:
    return await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id, members_limit=100))


# --- UpdateCallMembers --------------------------------------------------------------------------------


async def test_add_update_and_remove_members(calls, users, unique):
    a, b, c = await make_users(users, unique, 3)
    call_id = await make_call(calls, unique, [a])
    added = await calls.UpdateCallMembers(
        change(
            call_id,
            update=[
                call_pb2.MemberRequest(user_id=c, role="moderator", custom=struct({"seat": 3})),
                call_pb2.MemberRequest(user_id=b),
            ],
        )
    )
    assert [(m.user_id, m.role) for m in added.members] == [(c, "moderator"), (b, "user")]  # request order
    assert plain(added.members[0].custom) == {"seat": 3}
    assert added.members[0].user.id == c and added.members[0].user.name == c
    assert list(added.removed_user_ids) == []
    state = await get_call(calls, call_id)
    assert state.call.member_count == 3
    before = {m.user_id: m for m in state.members}

    # Upsert: role changes, custom kept when not given; custom replaced when given.
    updated = await calls.UpdateCallMembers(
        change(
            call_id,
            update=[
                call_pb2.MemberRequest(user_id=c, role="host"),
                call_pb2.MemberRequest(user_id=b, custom=struct({"hand": "raised"})),
            ],
        )
    )
    by_id = {m.user_id: m for m in updated.members}
    assert by_id[c].role == "host" and plain(by_id[c].custom) == {"seat": 3}
    assert by_id[b].role == "user" and plain(by_id[b].custom) == {"hand": "raised"}
    assert by_id[c].created_at == before[c].created_at
    assert by_id[c].updated_at.ToDatetime() > before[c].updated_at.ToDatetime()

    replaced = await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=c, custom=struct({"new": 1}))])
    )
    assert plain(replaced.members[0].custom) == {"new": 1}
    assert replaced.members[0].role == "host"

    removed = await calls.UpdateCallMembers(change(call_id, remove=[a, unique("never-a-member")]))
    assert list(removed.removed_user_ids) == [a]  # ids that were not members are ignored
    assert list(removed.members) == []
    state = await get_call(calls, call_id)
    assert state.call.member_count == 2
    assert sorted(m.user_id for m in state.members) == sorted([b, c])


async def test_update_and_remove_in_one_request(calls, users, unique):
    a, b = await make_users(users, unique, 2)
    call_id = await make_call(calls, unique, [a])
    response = await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=b)], remove=[a])
    )
    assert [m.user_id for m in response.members] == [b]
    assert list(response.removed_user_ids) == [a]
    assert await member_ids(calls, call_id) == [b]
    assert (await get_call(calls, call_id)).call.member_count == 1


async def test_unknown_users_are_all_named_and_nothing_is_written(calls, users, unique):
    a, b, c = await make_users(users, unique, 3)
    call_id = await make_call(calls, unique, [a])
    ghost_a, ghost_b = unique("ghost"), unique("ghost")
    details = await expect_error(
        calls.UpdateCallMembers(
            change(
                call_id,
                update=[
                    call_pb2.MemberRequest(user_id=ghost_a),
                    call_pb2.MemberRequest(user_id=b, role="host"),
                    call_pb2.MemberRequest(user_id=a, role="moderator"),
                    call_pb2.MemberRequest(user_id=ghost_b),
                ],
                remove=[c],
            )
        ),
        INVALID,
        "UNKNOWN_USERS",
        fields=["update_members[0].user_id", "update_members[3].user_id"],
    )
    assert len(details.violations) == 2
    assert set(details.metadata["user_ids"].split(",")) == {ghost_a, ghost_b}
    state = await get_call(calls, call_id)
    assert [(m.user_id, m.role) for m in state.members] == [(a, "user")]
    assert state.call.member_count == 1


async def test_batch_limit(calls, users, unique):
    ids = [*await make_users(users, unique, 100), *await make_users(users, unique, 1)]
    call_id = await make_call(calls, unique)
    await expect_error(
        calls.UpdateCallMembers(change(call_id, update=[call_pb2.MemberRequest(user_id=u) for u in ids])),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["update_members"],
    )
    await expect_error(
        calls.UpdateCallMembers(change(call_id, remove=ids)),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["remove_members"],
    )
    assert (await get_call(calls, call_id)).call.member_count == 0
    response = await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=u) for u in ids[:100]])
    )
    assert len(response.members) == 100
    assert (await get_call(calls, call_id)).call.member_count == 100
    response = await calls.UpdateCallMembers(change(call_id, remove=ids[:100]))
    assert len(response.removed_user_ids) == 100
    assert (await get_call(calls, call_id)).call.member_count == 0


@pytest.mark.parametrize(
    ("update", "remove", "field"),
    [
        ([], [], "update_members"),
        ([call_pb2.MemberRequest(user_id="bad id")], [], "update_members[0].user_id"),
        ([call_pb2.MemberRequest(user_id="")], [], "update_members[0].user_id"),
        (
            [call_pb2.MemberRequest(user_id="same"), call_pb2.MemberRequest(user_id="same")],
            [],
            "update_members[1].user_id",
        ),
        ([call_pb2.MemberRequest(user_id="x", role="No Role")], [], "update_members[0].role"),
        (
            [call_pb2.MemberRequest(user_id="x", custom=struct({"k": "x" * 5113}))],
            [],
            "update_members[0].custom",
        ),
        ([], ["ok", "bad id"], "remove_members[1]"),
        ([call_pb2.MemberRequest(user_id="both")], ["both"], "remove_members[0]"),
    ],
)
async def test_invalid_arguments(calls, users, unique, update, remove, field):
    (existing,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique, [existing])
    await expect_error(
        calls.UpdateCallMembers(change(call_id, update=update, remove=remove)),
        INVALID,
        "INVALID_ARGUMENT",
        fields=[field],
    )
    assert await member_ids(calls, call_id) == [existing]


async def test_member_custom_size_limit(calls, users, unique):
    (user,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    response = await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=user, custom=struct({"k": "x" * 5112}))])
    )
    assert len(plain(response.members[0].custom)["k"]) == 5112


async def test_unknown_or_deleted_call(calls, users, unique):
    (user,) = await make_users(users, unique, 1)
    await expect_error(
        calls.UpdateCallMembers(change(unique("c"), update=[call_pb2.MemberRequest(user_id=user)])),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )
    call_id = await make_call(calls, unique)
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id))
    await expect_error(
        calls.UpdateCallMembers(change(call_id, update=[call_pb2.MemberRequest(user_id=user)])),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )
    await expect_error(
        calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=unique("c"))),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )


# --- QueryMembers -------------------------------------------------------------------------------------


async def test_query_members_default_order_filter_and_sort(calls, users, server, unique):
    ids = await make_users(users, unique, 4)
    call_id = await make_call(calls, unique)
    # Added one by one: distinct created_at, oldest first by default.
    for index, user_id in enumerate(ids):
        await calls.UpdateCallMembers(
            change(
                call_id,
                update=[
                    call_pb2.MemberRequest(
                        user_id=user_id,
                        role="host" if index % 2 else "user",
                        custom=struct({"rank": 10 - index}),
                    )
                ],
            )
        )
    assert await member_ids(calls, call_id) == ids
    assert await member_ids(calls, call_id, filter_conditions=struct({"role": "host"})) == [ids[1], ids[3]]
    assert await member_ids(
        calls, call_id, filter_conditions=struct({"user_id": {"$in": [ids[0], ids[2]]}})
    ) == [
        ids[0],
        ids[2],
    ]
    assert await member_ids(calls, call_id, filter_conditions=struct({"custom.rank": {"$lte": 8}})) == ids[2:]
    newest_first = await member_ids(
        calls,
        call_id,
        sort=[query_pb2.SortParam(field="created_at", direction=query_pb2.SORT_DIRECTION_DESC)],
    )
    assert newest_first == ids[::-1]
    by_rank = await member_ids(
        calls, call_id, sort=[query_pb2.SortParam(field="custom.rank", type=query_pb2.SORT_TYPE_NUMBER)]
    )
    assert by_rank == ids[::-1]
    by_id = await member_ids(calls, call_id, sort=[query_pb2.SortParam(field="user_id")])
    assert by_id == sorted(ids)
    # Members of other calls never show up.
    other = await make_call(calls, unique, ids[:1])
    assert await member_ids(calls, other) == ids[:1]


async def test_query_members_sort_ties_break_by_user_id(calls, users, server, unique):
    ids = await make_users(users, unique, 5)
    call_id = await make_call(calls, unique)
    server.clock.step = timedelta(0)
    try:
        for user_id in ids:  # separate requests, same instant
            await calls.UpdateCallMembers(change(call_id, update=[call_pb2.MemberRequest(user_id=user_id)]))
    finally:
        server.clock.step = timedelta(milliseconds=1)
    assert await member_ids(calls, call_id) == sorted(ids)
    desc = await member_ids(
        calls,
        call_id,
        sort=[query_pb2.SortParam(field="created_at", direction=query_pb2.SORT_DIRECTION_DESC)],
    )
    assert desc == sorted(ids)  # the tiebreak is always ascending
    pages: list[str] = []
    cursor = ""
    while True:
        response = await calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(type="default", id=call_id, limit=2, next=cursor)
        )
        pages.extend(member.user_id for member in response.members)
        cursor = response.next
        if not cursor:
            break
    assert pages == sorted(ids)


async def test_query_members_paging_and_limits(calls, users, unique):
    ids = await make_users(users, unique, 5)
    call_id = await make_call(calls, unique)
    for user_id in ids:
        await calls.UpdateCallMembers(change(call_id, update=[call_pb2.MemberRequest(user_id=user_id)]))
    first = await calls.QueryMembers(
        call_service_pb2.QueryMembersRequest(type="default", id=call_id, limit=2)
    )
    assert [m.user_id for m in first.members] == ids[:2]
    assert first.next and not first.prev
    second = await calls.QueryMembers(
        call_service_pb2.QueryMembersRequest(type="default", id=call_id, limit=2, next=first.next)
    )
    assert [m.user_id for m in second.members] == ids[2:4]
    back = await calls.QueryMembers(
        call_service_pb2.QueryMembersRequest(type="default", id=call_id, limit=2, prev=second.prev)
    )
    assert [m.user_id for m in back.members] == ids[:2]
    assert not back.prev
    # A cursor is bound to its call.
    other = await make_call(calls, unique, ids)
    await expect_error(
        calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(type="default", id=other, limit=2, next=first.next)
        ),
        INVALID,
        "INVALID_CURSOR",
        fields=["next"],
    )
    await expect_error(
        calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id, limit=101)),
        INVALID,
        fields=["limit"],
    )
    await expect_error(
        calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(
                type="default",
                id=call_id,
                sort=[query_pb2.SortParam(field="user_id"), query_pb2.SortParam(field="role")],
            )
        ),
        INVALID,
        "INVALID_SORT",
        fields=["sort"],
    )
    await expect_error(
        calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(
                type="default", id=call_id, filter_conditions=struct({"members": ids[0]})
            )
        ),
        INVALID,
        "INVALID_FILTER",
        fields=["filter_conditions.members"],
    )


async def test_query_members_never_shows_a_page_older_than_an_acknowledged_change(calls, users, unique):
    # Repeated QueryMembers may be answered from the call cache; every acknowledged change to the
    # members, their users or the call must show in the next answer.
    ids = await make_users(users, unique, 3)
    call_id = await make_call(calls, unique, ids[:2])

    async def members() -> list[tuple[str, str, str]]:
        response = await calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
        return sorted((m.user_id, m.role, m.user.name) for m in response.members)

    assert await members() == sorted([(ids[0], "user", ids[0]), (ids[1], "user", ids[1])])
    assert await members() == sorted([(ids[0], "user", ids[0]), (ids[1], "user", ids[1])])
    await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=ids[1], role="admin")])
    )
    assert await members() == sorted([(ids[0], "user", ids[0]), (ids[1], "admin", ids[1])])
    await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=ids[2])], remove=[ids[0]])
    )
    assert await members() == sorted([(ids[1], "admin", ids[1]), (ids[2], "user", ids[2])])
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=ids[2], name="renamed")])
    )
    assert await members() == sorted([(ids[1], "admin", ids[1]), (ids[2], "user", "renamed")])
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id))
    await expect_error(
        calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id)),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_query_calls_never_shows_a_call_older_than_an_acknowledged_change(calls, users, unique):
    # QueryCalls reuses cached calls whose stored row it just read unchanged; a change to the call, its
    # members or their users must show in the next page.
    ids = await make_users(users, unique, 2)
    tag = unique("tag")
    call_id = unique("c")
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                members=[call_pb2.MemberRequest(user_id=ids[0])], custom=struct({"tag": tag, "n": 1})
            ),
        )
    )

    async def state() -> tuple[float, list[tuple[str, str, str]]]:
        response = await calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.tag": tag}))
        )
        (found,) = response.calls
        return (
            plain(found.call.custom)["n"],
            sorted((m.user_id, m.role, m.user.name) for m in found.members),
        )

    assert await state() == (1, [(ids[0], "user", ids[0])])
    assert await state() == (1, [(ids[0], "user", ids[0])])
    await calls.UpdateCall(
        call_service_pb2.UpdateCallRequest(type="default", id=call_id, set_custom=struct({"n": 2}))
    )
    assert await state() == (2, [(ids[0], "user", ids[0])])
    await calls.UpdateCallMembers(
        change(call_id, update=[call_pb2.MemberRequest(user_id=ids[1], role="admin")])
    )
    assert await state() == (2, sorted([(ids[0], "user", ids[0]), (ids[1], "admin", ids[1])]))
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=ids[0], name="renamed")])
    )
    assert await state() == (2, sorted([(ids[0], "user", "renamed"), (ids[1], "admin", ids[1])]))
