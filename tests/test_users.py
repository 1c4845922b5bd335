"""UserService: UpsertUsers, UpdateUsersPartial, QueryUsers and DeleteUsers (with memberships)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from callplane.v1 import call_pb2, call_service_pb2, user_pb2
from tests.errors import expect_error
from tests.support import struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


async def upsert(users, *requests: user_pb2.UserRequest) -> list[user_pb2.User]:
    return list((await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=requests))).users)


async def get_user(users, user_id: str) -> user_pb2.User | None:
    response = await users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct({"id": user_id})))
    return response.users[0] if response.users else None


async def patch(users, *updates: user_pb2.UserPartialUpdate) -> list[user_pb2.User]:
    return list((await users.UpdateUsersPartial(user_pb2.UpdateUsersPartialRequest(users=updates))).users)


# --- UpsertUsers --------------------------------------------------------------------------------------


async def test_upsert_creates_users_in_request_order(users, unique):
    first, second = unique("u"), unique("u")
    stored = await upsert(
        users,
        user_pb2.UserRequest(
            id=second,
            name="Second",
            image="https://example.com/a.png",
            teams=["red", "blue", "red"],
            custom=struct({"level": 3, "tags": ["a", "b"], "nested": {"x": True}}),
        ),
        user_pb2.UserRequest(id=first, name="First", role="admin"),
    )
    assert [user.id for user in stored] == [second, first]
    assert stored[0].role == "user"  # default role
    assert stored[0].teams == ["blue", "red"]  # deduplicated
    assert plain(stored[0].custom) == {"level": 3, "tags": ["a", "b"], "nested": {"x": True}}
    assert stored[0].image == "https://example.com/a.png"
    assert stored[1].role == "admin"
    assert stored[0].HasField("created_at") and stored[0].updated_at == stored[0].created_at
    fetched = await get_user(users, second)
    assert fetched == stored[0]


async def test_upsert_replaces_every_field_and_keeps_created_at(users, unique):
    user_id = unique("u")
    (created,) = await upsert(
        users, user_pb2.UserRequest(id=user_id, name="A", role="admin", teams=["t"], custom=struct({"a": 1}))
    )
    (replaced,) = await upsert(users, user_pb2.UserRequest(id=user_id, image="img"))
    assert replaced.name == ""
    assert replaced.image == "img"
    assert replaced.role == "user"
    assert list(replaced.teams) == []
    assert plain(replaced.custom) == {}
    assert replaced.created_at == created.created_at
    assert replaced.updated_at.ToDatetime() > created.updated_at.ToDatetime()
    assert await get_user(users, user_id) == replaced


async def test_upsert_batch_limit(users, unique):
    prefix = unique("batch")
    stored = await upsert(users, *(user_pb2.UserRequest(id=f"{prefix}-{i}") for i in range(100)))
    assert len(stored) == 100
    await expect_error(
        users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=f"{prefix}-x{i}") for i in range(101)])
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["users"],
    )
    assert await get_user(users, f"{prefix}-x0") is None  # nothing written
    await expect_error(users.UpsertUsers(user_pb2.UpsertUsersRequest()), INVALID, fields=["users"])


async def test_upsert_duplicate_ids(users, unique):
    user_id = unique("u")
    await expect_error(
        users.UpsertUsers(
            user_pb2.UpsertUsersRequest(
                users=[user_pb2.UserRequest(id=user_id), user_pb2.UserRequest(id=user_id, name="again")]
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["users[1].id"],
    )
    assert await get_user(users, user_id) is None


@pytest.mark.parametrize("bad", ["", "has space", "slash/x", "x" * 129, "émile", "a:b"])
async def test_upsert_invalid_id(users, unique, bad):
    good = unique("u")
    await expect_error(
        users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=good), user_pb2.UserRequest(id=bad)])
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["users[1].id"],
    )
    assert await get_user(users, good) is None  # the valid one is not written either


async def test_upsert_accepts_every_id_character(users, unique):
    user_id = "A-z_0.9@" + unique("u")
    longest = ("L" + unique("u") + "x" * 128)[:128]
    stored = await upsert(users, user_pb2.UserRequest(id=user_id), user_pb2.UserRequest(id=longest))
    assert [user.id for user in stored] == [user_id, longest]


async def test_upsert_reports_every_problem(users):
    details = await expect_error(
        users.UpsertUsers(
            user_pb2.UpsertUsersRequest(
                users=[
                    user_pb2.UserRequest(id="bad id"),
                    user_pb2.UserRequest(id="fine-id", role="Not A Role", teams=["ok", ""]),
                    user_pb2.UserRequest(id="long-name", name="n" * 257),
                ]
            )
        ),
        INVALID,
        fields=["users[0].id", "users[1].role", "users[1].teams[1]", "users[2].name"],
    )
    assert len(details.violations) == 4


async def test_upsert_custom_size_limit(users, unique):
    # {"k":"..."} is 8 bytes plus the value: 5120 bytes is allowed, 5121 is not.
    at_limit = unique("u")
    (stored,) = await upsert(users, user_pb2.UserRequest(id=at_limit, custom=struct({"k": "x" * 5112})))
    assert len(plain(stored.custom)["k"]) == 5112
    too_big = unique("u")
    details = await expect_error(
        users.UpsertUsers(
            user_pb2.UpsertUsersRequest(
                users=[user_pb2.UserRequest(id=too_big, custom=struct({"k": "x" * 5113}))]
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["users[0].custom"],
    )
    assert "5121" in details.violations[0].description
    assert await get_user(users, too_big) is None


# --- UpdateUsersPartial -------------------------------------------------------------------------------


async def test_partial_set_and_unset(users, unique):
    user_id = unique("u")
    (created,) = await upsert(
        users,
        user_pb2.UserRequest(
            id=user_id,
            name="Old",
            image="img",
            teams=["a"],
            custom=struct({"keep": 1, "drop": 2, "deep": {"x": 1, "y": 2}}),
        ),
    )
    (updated,) = await patch(
        users,
        user_pb2.UserPartialUpdate(
            id=user_id,
            set=struct(
                {"name": "New", "teams": ["z", "b", "z"], "custom.deep.z": "new", "custom.fresh.a.b": True}
            ),
            unset=["image", "custom.drop", "custom.deep.y", "custom.absent.path"],
        ),
    )
    assert updated.name == "New"
    assert updated.image == ""
    assert list(updated.teams) == ["b", "z"]
    assert plain(updated.custom) == {"keep": 1, "deep": {"x": 1, "z": "new"}, "fresh": {"a": {"b": True}}}
    assert updated.role == "user"
    assert updated.created_at == created.created_at
    assert updated.updated_at.ToDatetime() > created.updated_at.ToDatetime()
    assert await get_user(users, user_id) == updated


async def test_partial_replace_and_clear_whole_fields(users, unique):
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id, role="admin", teams=["a"], custom=struct({"a": 1})))
    (updated,) = await patch(
        users,
        user_pb2.UserPartialUpdate(id=user_id, set=struct({"custom": {"b": 2}}), unset=["teams", "role"]),
    )
    assert plain(updated.custom) == {"b": 2}
    assert list(updated.teams) == []
    assert updated.role == "user"
    (cleared,) = await patch(
        users, user_pb2.UserPartialUpdate(id=user_id, unset=["custom"], set=struct({"role": "host"}))
    )
    assert plain(cleared.custom) == {}
    assert cleared.role == "host"


async def test_partial_set_replaces_a_scalar_on_the_way(users, unique):
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id, custom=struct({"a": 5})))
    (updated,) = await patch(users, user_pb2.UserPartialUpdate(id=user_id, set=struct({"custom.a.b": 1})))
    assert plain(updated.custom) == {"a": {"b": 1}}


async def test_partial_unknown_user_is_not_found_and_writes_nothing(users, unique):
    known, missing_a, missing_b = unique("u"), unique("u"), unique("u")
    await upsert(users, user_pb2.UserRequest(id=known, name="Before"))
    details = await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[
                    user_pb2.UserPartialUpdate(id=known, set=struct({"name": "After"})),
                    user_pb2.UserPartialUpdate(id=missing_a, set=struct({"name": "x"})),
                    user_pb2.UserPartialUpdate(id=missing_b, set=struct({"name": "y"})),
                ]
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    assert set(details.metadata["user_ids"].split(",")) == {missing_a, missing_b}
    assert (await get_user(users, known)).name == "Before"
    assert await get_user(users, missing_a) is None


@pytest.mark.parametrize(
    ("update", "field"),
    [
        (user_pb2.UserPartialUpdate(set=struct({"foo": 1})), "users[0].set.foo"),
        (user_pb2.UserPartialUpdate(set=struct({"name.first": "x"})), "users[0].set.name.first"),
        (user_pb2.UserPartialUpdate(set=struct({"id": "other"})), "users[0].set.id"),
        (
            user_pb2.UserPartialUpdate(set=struct({"created_at": "2020-01-01T00:00:00Z"})),
            "users[0].set.created_at",
        ),
        (user_pb2.UserPartialUpdate(set=struct({"name": 5})), "users[0].set.name"),
        (user_pb2.UserPartialUpdate(set=struct({"teams": "a"})), "users[0].set.teams"),
        (user_pb2.UserPartialUpdate(set=struct({"teams": ["ok", ""]})), "users[0].set.teams[1]"),
        (user_pb2.UserPartialUpdate(set=struct({"role": "Bad Role"})), "users[0].set.role"),
        (user_pb2.UserPartialUpdate(set=struct({"custom": "flat"})), "users[0].set.custom"),
        (user_pb2.UserPartialUpdate(set=struct({"custom.a..b": 1})), "users[0].set.custom.a..b"),
        (user_pb2.UserPartialUpdate(unset=["nope"]), "users[0].unset[0]"),
        (user_pb2.UserPartialUpdate(unset=["custom.ok", "custom.bad path"]), "users[0].unset[1]"),
        (user_pb2.UserPartialUpdate(set=struct({"name": "x"}), unset=["name"]), "users[0].unset[0]"),
    ],
)
async def test_partial_invalid_paths(users, unique, update, field):
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id, name="Keep"))
    request = user_pb2.UserPartialUpdate()
    request.CopyFrom(update)
    request.id = user_id
    await expect_error(
        users.UpdateUsersPartial(user_pb2.UpdateUsersPartialRequest(users=[request])),
        INVALID,
        "INVALID_ARGUMENT",
        fields=[field],
    )
    assert (await get_user(users, user_id)).name == "Keep"


async def test_partial_batch_rules(users, unique):
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id))
    await expect_error(
        users.UpdateUsersPartial(user_pb2.UpdateUsersPartialRequest()), INVALID, fields=["users"]
    )
    await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[user_pb2.UserPartialUpdate(id=user_id), user_pb2.UserPartialUpdate(id=user_id)]
            )
        ),
        INVALID,
        fields=["users[1].id"],
    )
    await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[user_pb2.UserPartialUpdate(id=f"{user_id}-{i}") for i in range(101)]
            )
        ),
        INVALID,
        fields=["users"],
    )
    await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(users=[user_pb2.UserPartialUpdate(id="bad id")])
        ),
        INVALID,
        fields=["users[0].id"],
    )


async def test_partial_custom_size_limit(users, unique):
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id, custom=struct({"k": "x" * 5000})))
    # Each update alone is small; the resulting document is over the limit.
    await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[user_pb2.UserPartialUpdate(id=user_id, set=struct({"custom.more": "y" * 200}))]
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["users[0].custom"],
    )
    assert plain((await get_user(users, user_id)).custom) == {"k": "x" * 5000}


# --- QueryUsers ---------------------------------------------------------------------------------------


async def test_query_users_by_team_and_custom(users, unique):
    team = unique("team")
    a, b, c = unique("a"), unique("b"), unique("c")
    await upsert(
        users,
        user_pb2.UserRequest(id=a, name="Alice Smith", teams=[team], custom=struct({"age": 30})),
        user_pb2.UserRequest(id=b, name="Bob Stone", teams=[team, "other"], custom=struct({"age": 40})),
        user_pb2.UserRequest(id=c, name="Carol", teams=["other"]),
    )
    response = await users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct({"teams": team})))
    assert [user.id for user in response.users] == [a, b]  # default: created_at ascending
    response = await users.QueryUsers(
        user_pb2.QueryUsersRequest(filter_conditions=struct({"teams": team, "custom.age": {"$gt": 35}}))
    )
    assert [user.id for user in response.users] == [b]
    assert response.next == "" and response.prev == ""


async def test_query_users_invalid_filter(users):
    await expect_error(
        users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct({"nickname": "x"}))),
        INVALID,
        "INVALID_FILTER",
        fields=["filter_conditions.nickname"],
    )


# --- DeleteUsers --------------------------------------------------------------------------------------


async def test_delete_users_removes_memberships_and_refreshes_member_count(users, calls, unique):
    keep, gone_a, gone_b = unique("keep"), unique("gone"), unique("gone")
    await upsert(users, *(user_pb2.UserRequest(id=user_id) for user_id in (keep, gone_a, gone_b)))
    call_ids = [unique("call"), unique("call")]
    for call_id in call_ids:
        response = await calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type="default",
                id=call_id,
                data=call_service_pb2.CallData(
                    members=[call_pb2.MemberRequest(user_id=u) for u in (keep, gone_a, gone_b)]
                ),
            )
        )
        assert response.call.member_count == 3
    deleted = await users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[gone_a, gone_b]))
    assert list(deleted.deleted_user_ids) == [gone_a, gone_b]
    for call_id in call_ids:
        state = await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_id))
        assert state.call.member_count == 1
        assert [member.user_id for member in state.members] == [keep]
        members = await calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
        assert [member.user_id for member in members.members] == [keep]
    assert await get_user(users, gone_a) is None
    assert await get_user(users, keep) is not None
    # The id can be used again, and the new user is not a member of anything.
    await upsert(users, user_pb2.UserRequest(id=gone_a))
    state = await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=call_ids[0]))
    assert [member.user_id for member in state.members] == [keep]


async def test_delete_unknown_user_is_not_found_and_deletes_nothing(users, unique):
    known, missing = unique("u"), unique("u")
    await upsert(users, user_pb2.UserRequest(id=known))
    details = await expect_error(
        users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[known, missing])),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    assert details.metadata["user_ids"] == missing
    assert await get_user(users, known) is not None


async def test_delete_users_batch_rules(users, unique):
    await expect_error(users.DeleteUsers(user_pb2.DeleteUsersRequest()), INVALID, fields=["user_ids"])
    await expect_error(
        users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[unique("u") for _ in range(101)])),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["user_ids"],
    )
    user_id = unique("u")
    await upsert(users, user_pb2.UserRequest(id=user_id))
    await expect_error(
        users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[user_id, user_id])),
        INVALID,
        fields=["user_ids[1]"],
    )
    assert await get_user(users, user_id) is not None
