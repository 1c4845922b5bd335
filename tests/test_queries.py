"""Queries: every filter operator on every field kind, combinators, sorting with ties, keyset pagination
with concurrent inserts, limits, cursors and invalid filters/sorts (QueryCalls, QueryUsers, QueryMembers)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    query_pb2,
    user_pb2,
    user_pb2_grpc,
)
from tests.errors import expect_error
from tests.support import struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ASC, DESC = query_pb2.SORT_DIRECTION_ASC, query_pb2.SORT_DIRECTION_DESC
NUMBER, STRING, BOOLEAN = query_pb2.SORT_TYPE_NUMBER, query_pb2.SORT_TYPE_STRING, query_pb2.SORT_TYPE_BOOLEAN


def rfc3339(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToJsonString()


def sort(*keys: tuple[str, int] | tuple[str, int, int]) -> list[query_pb2.SortParam]:
    return [query_pb2.SortParam(field=k[0], direction=k[1], type=k[2] if len(k) > 2 else 0) for k in keys]


def new_run() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------------------------------
# A shared data set (one per backend): four calls, three users, with every field kind populated.
# --------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    run: str
    call_type: str
    team_a: str
    team_b: str
    users: dict[str, user_pb2.User] = field(default_factory=dict)  # alice, bob, carol
    calls: dict[str, call_pb2.Call] = field(default_factory=dict)  # alpha, beta, gamma, delta

    def user(self, name: str) -> str:
        return self.users[name].id

    def call_name(self, call_id: str) -> str:
        return call_id.rsplit("-", 1)[-1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def data(
    calls: call_service_pb2_grpc.CallServiceStub,
    users: user_pb2_grpc.UserServiceStub,
    call_types: call_type_service_pb2_grpc.CallTypeServiceStub,
) -> Dataset:
    run = new_run()
    d = Dataset(run=run, call_type=f"q-{run}", team_a=f"ta-{run}", team_b=f"tb-{run}")
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=d.call_type))
    people = [
        user_pb2.UserRequest(
            id=f"alice-{run}",
            name="Alice Smith",
            role="admin",
            teams=[d.team_a, d.team_b],
            custom=struct({"run": run, "age": 31, "langs": ["en", "fr"], "vip": True}),
        ),
        user_pb2.UserRequest(
            id=f"bob-{run}",
            name="Bob Stone",
            teams=[d.team_b],
            custom=struct({"run": run, "age": 45, "langs": ["de"]}),
        ),
        user_pb2.UserRequest(
            id=f"carol-{run}", name="Carol Stonebridge", custom=struct({"run": run, "age": 27})
        ),
    ]
    for user in (await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=people))).users:
        d.users[user.id.split("-")[0]] = user

    def stamp(text: str) -> timestamp_pb2.Timestamp:
        message = timestamp_pb2.Timestamp()
        message.FromJsonString(text)
        return message

    specs = [
        (
            "alpha",
            d.call_type,
            call_service_pb2.CallData(
                created_by_id=d.user("alice"),
                team="red",
                starts_at=stamp("2030-01-01T00:00:00Z"),
                members=[
                    call_pb2.MemberRequest(user_id=d.user("alice")),
                    call_pb2.MemberRequest(user_id=d.user("bob")),
                ],
                custom=struct(
                    {
                        "run": run,
                        "score": 10,
                        "color": "red",
                        "vip": True,
                        "tags": ["a", "b"],
                        "nums": [1, 2],
                        "nested": {"level": 1, "name": "deep one"},
                        "title": "Quarterly planning meeting",
                    }
                ),
            ),
        ),
        (
            "beta",
            d.call_type,
            call_service_pb2.CallData(
                created_by_id=d.user("bob"),
                team="blue",
                starts_at=stamp("2030-06-01T00:00:00Z"),
                members=[call_pb2.MemberRequest(user_id=d.user("bob"))],
                custom=struct(
                    {
                        "run": run,
                        "score": 20,
                        "color": "blue",
                        "vip": False,
                        "tags": ["b"],
                        "nums": [3],
                        "nested": {"level": 2},
                        "title": "Daily standup",
                    }
                ),
            ),
        ),
        (
            "gamma",
            "livestream",
            call_service_pb2.CallData(
                custom=struct(
                    {"run": run, "score": 30, "color": "green", "tags": [], "title": "Launch stream"}
                ),
            ),
        ),
        (
            "delta",
            d.call_type,
            call_service_pb2.CallData(
                created_by_id=d.user("alice"),
                team="red",
                members=[call_pb2.MemberRequest(user_id=d.user("carol"))],
                custom=struct({"run": run, "score": "40", "vip": True, "title": None}),
            ),
        ),
    ]
    for name, call_type, call_data in specs:
        response = await calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(type=call_type, id=f"{run}-{name}", data=call_data)
        )
        d.calls[name] = response.call
    # delta is updated and ended afterwards: its updated_at and ended_at are later than everything else.
    await calls.UpdateCall(
        call_service_pb2.UpdateCallRequest(
            type=d.call_type, id=f"{run}-delta", set_custom=struct({"touched": True})
        )
    )
    ended = await calls.EndCall(call_service_pb2.EndCallRequest(type=d.call_type, id=f"{run}-delta"))
    d.calls["delta"] = ended.call
    return d


async def call_names(calls, d: Dataset, conditions: dict[str, Any], **request: Any) -> list[str]:
    response = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(
            filter_conditions=struct({"$and": [{"custom.run": d.run}, conditions]}), limit=100, **request
        )
    )
    return [d.call_name(state.call.id) for state in response.calls]


async def user_names(users, d: Dataset, conditions: dict[str, Any], **request: Any) -> list[str]:
    response = await users.QueryUsers(
        user_pb2.QueryUsersRequest(
            filter_conditions=struct({"$and": [{"custom.run": d.run}, conditions]}), limit=100, **request
        )
    )
    return [user.id.split("-")[0] for user in response.users]


# --------------------------------------------------------------------------------------------------
# Filter operators on calls
# --------------------------------------------------------------------------------------------------

Case = tuple[str, Callable[[Dataset], dict[str, Any]], set[str]]
ALL = {"alpha", "beta", "gamma", "delta"}


def created(name: str) -> Callable[[Dataset], str]:
    return lambda d: rfc3339(d.calls[name].created_at)


CALL_CASES: list[Case] = [
    # string: id
    ("id-eq-shorthand", lambda d: {"id": f"{d.run}-alpha"}, {"alpha"}),
    ("id-eq", lambda d: {"id": {"$eq": f"{d.run}-beta"}}, {"beta"}),
    ("id-ne", lambda d: {"id": {"$ne": f"{d.run}-beta"}}, ALL - {"beta"}),
    ("id-gt", lambda d: {"id": {"$gt": f"{d.run}-beta"}}, {"delta", "gamma"}),
    ("id-gte", lambda d: {"id": {"$gte": f"{d.run}-beta"}}, {"beta", "delta", "gamma"}),
    ("id-lt", lambda d: {"id": {"$lt": f"{d.run}-beta"}}, {"alpha"}),
    ("id-lte", lambda d: {"id": {"$lte": f"{d.run}-beta"}}, {"alpha", "beta"}),
    ("id-in", lambda d: {"id": {"$in": [f"{d.run}-alpha", f"{d.run}-gamma", "nope"]}}, {"alpha", "gamma"}),
    ("id-in-empty", lambda d: {"id": {"$in": []}}, set()),
    ("id-nin", lambda d: {"id": {"$nin": [f"{d.run}-alpha", f"{d.run}-gamma"]}}, {"beta", "delta"}),
    ("id-nin-empty", lambda d: {"id": {"$nin": []}}, ALL),
    ("id-exists", lambda d: {"id": {"$exists": True}}, ALL),
    ("id-autocomplete", lambda d: {"id": {"$autocomplete": f"{d.run}-ga"}}, {"gamma"}),
    ("id-q", lambda d: {"id": {"$q": "ELTA"}}, {"delta"}),
    # string: cid
    ("cid-eq", lambda d: {"cid": f"livestream:{d.run}-gamma"}, {"gamma"}),
    ("cid-autocomplete", lambda d: {"cid": {"$autocomplete": f"{d.call_type}:"}}, {"alpha", "beta", "delta"}),
    (
        "cid-in",
        lambda d: {"cid": {"$in": [f"{d.call_type}:{d.run}-alpha", f"livestream:{d.run}-alpha"]}},
        {"alpha"},
    ),
    # string: type
    ("type-eq", lambda d: {"type": d.call_type}, {"alpha", "beta", "delta"}),
    ("type-ne", lambda d: {"type": {"$ne": d.call_type}}, {"gamma"}),
    ("type-q", lambda d: {"type": {"$q": "stream"}}, {"gamma"}),
    # string, nullable: team
    ("team-eq", lambda d: {"team": "red"}, {"alpha", "delta"}),
    ("team-ne-matches-null", lambda d: {"team": {"$ne": "red"}}, {"beta", "gamma"}),
    ("team-nin-matches-null", lambda d: {"team": {"$nin": ["red"]}}, {"beta", "gamma"}),
    ("team-in", lambda d: {"team": {"$in": ["red", "blue"]}}, {"alpha", "beta", "delta"}),
    ("team-eq-null", lambda d: {"team": None}, {"gamma"}),
    ("team-ne-null", lambda d: {"team": {"$ne": None}}, {"alpha", "beta", "delta"}),
    ("team-exists-false", lambda d: {"team": {"$exists": False}}, {"gamma"}),
    ("team-exists-true", lambda d: {"team": {"$exists": True}}, {"alpha", "beta", "delta"}),
    ("team-gt", lambda d: {"team": {"$gt": "blue"}}, {"alpha", "delta"}),
    ("team-autocomplete", lambda d: {"team": {"$autocomplete": "bl"}}, {"beta"}),
    # string, nullable: created_by_user_id
    ("creator-eq", lambda d: {"created_by_user_id": d.user("alice")}, {"alpha", "delta"}),
    ("creator-in", lambda d: {"created_by_user_id": {"$in": [d.user("bob")]}}, {"beta"}),
    ("creator-exists-false", lambda d: {"created_by_user_id": {"$exists": False}}, {"gamma"}),
    ("creator-ne", lambda d: {"created_by_user_id": {"$ne": d.user("alice")}}, {"beta", "gamma"}),
    ("creator-autocomplete", lambda d: {"created_by_user_id": {"$autocomplete": "bob-"}}, {"beta"}),
    # bool
    ("backstage-true", lambda d: {"backstage": True}, {"gamma"}),
    ("backstage-eq-false", lambda d: {"backstage": {"$eq": False}}, {"alpha", "beta", "delta"}),
    ("backstage-ne-true", lambda d: {"backstage": {"$ne": True}}, {"alpha", "beta", "delta"}),
    ("ongoing-false", lambda d: {"ongoing": False}, ALL),
    ("ongoing-true", lambda d: {"ongoing": True}, set()),
    # time: created_at (alpha < beta < gamma < delta)
    ("created-eq", lambda d: {"created_at": created("beta")(d)}, {"beta"}),
    ("created-ne", lambda d: {"created_at": {"$ne": created("beta")(d)}}, ALL - {"beta"}),
    ("created-gt", lambda d: {"created_at": {"$gt": created("beta")(d)}}, {"gamma", "delta"}),
    ("created-gte", lambda d: {"created_at": {"$gte": created("beta")(d)}}, {"beta", "gamma", "delta"}),
    ("created-lt", lambda d: {"created_at": {"$lt": created("beta")(d)}}, {"alpha"}),
    ("created-lte", lambda d: {"created_at": {"$lte": created("beta")(d)}}, {"alpha", "beta"}),
    (
        "created-in",
        lambda d: {"created_at": {"$in": [created("alpha")(d), created("gamma")(d)]}},
        {"alpha", "gamma"},
    ),
    ("created-nin", lambda d: {"created_at": {"$nin": [created("alpha")(d)]}}, ALL - {"alpha"}),
    (
        "created-range",
        lambda d: {"created_at": {"$gt": created("alpha")(d), "$lt": created("delta")(d)}},
        {"beta", "gamma"},
    ),
    ("created-gt-other-offset", lambda d: {"created_at": {"$gt": "2025-12-31T23:00:00-05:00"}}, set()),
    ("created-lt-other-offset", lambda d: {"created_at": {"$gt": "2025-12-31T18:00:00-05:00"}}, ALL),
    # time, nullable: starts_at, ended_at
    ("starts-gt", lambda d: {"starts_at": {"$gt": "2030-03-01T00:00:00Z"}}, {"beta"}),
    ("starts-lte", lambda d: {"starts_at": {"$lte": "2030-01-01T00:00:00Z"}}, {"alpha"}),
    ("starts-eq", lambda d: {"starts_at": "2030-06-01T02:00:00+02:00"}, {"beta"}),
    ("starts-exists", lambda d: {"starts_at": {"$exists": True}}, {"alpha", "beta"}),
    ("starts-missing", lambda d: {"starts_at": {"$exists": False}}, {"gamma", "delta"}),
    ("starts-null", lambda d: {"starts_at": None}, {"gamma", "delta"}),
    (
        "starts-ne-matches-null",
        lambda d: {"starts_at": {"$ne": "2030-01-01T00:00:00Z"}},
        {"beta", "gamma", "delta"},
    ),
    ("ended-exists", lambda d: {"ended_at": {"$exists": True}}, {"delta"}),
    ("ended-gte", lambda d: {"ended_at": {"$gte": rfc3339(d.calls["delta"].ended_at)}}, {"delta"}),
    ("ended-lt", lambda d: {"ended_at": {"$lt": rfc3339(d.calls["delta"].ended_at)}}, set()),
    # time: updated_at (only delta changed after creation)
    ("updated-gt", lambda d: {"updated_at": {"$gt": created("delta")(d)}}, {"delta"}),
    ("updated-lte", lambda d: {"updated_at": {"$lte": created("gamma")(d)}}, {"alpha", "beta", "gamma"}),
    # array: members
    ("members-shorthand", lambda d: {"members": d.user("bob")}, {"alpha", "beta"}),
    ("members-eq", lambda d: {"members": {"$eq": d.user("carol")}}, {"delta"}),
    ("members-contains", lambda d: {"members": {"$contains": d.user("alice")}}, {"alpha"}),
    ("members-ne", lambda d: {"members": {"$ne": d.user("bob")}}, {"gamma", "delta"}),
    ("members-in", lambda d: {"members": {"$in": [d.user("alice"), d.user("carol")]}}, {"alpha", "delta"}),
    ("members-nin", lambda d: {"members": {"$nin": [d.user("bob")]}}, {"gamma", "delta"}),
    ("members-exists-false", lambda d: {"members": {"$exists": False}}, {"gamma"}),
    ("members-exists-true", lambda d: {"members": {"$exists": True}}, {"alpha", "beta", "delta"}),
    # custom number (delta's score is the string "40": another JSON type never matches $eq/$gt...)
    ("score-shorthand", lambda d: {"custom.score": 10}, {"alpha"}),
    ("score-eq-float", lambda d: {"custom.score": {"$eq": 20.0}}, {"beta"}),
    ("score-ne", lambda d: {"custom.score": {"$ne": 10}}, {"beta", "gamma", "delta"}),
    ("score-gt", lambda d: {"custom.score": {"$gt": 15}}, {"beta", "gamma"}),
    ("score-gte", lambda d: {"custom.score": {"$gte": 20}}, {"beta", "gamma"}),
    ("score-lt", lambda d: {"custom.score": {"$lt": 20}}, {"alpha"}),
    ("score-lte", lambda d: {"custom.score": {"$lte": 20}}, {"alpha", "beta"}),
    ("score-gt-large", lambda d: {"custom.score": {"$gt": 9.5}}, {"alpha", "beta", "gamma"}),
    ("score-in", lambda d: {"custom.score": {"$in": [10, 30, 99]}}, {"alpha", "gamma"}),
    ("score-nin", lambda d: {"custom.score": {"$nin": [10, 30]}}, {"beta", "delta"}),
    ("score-as-string", lambda d: {"custom.score": "40"}, {"delta"}),
    ("score-string-gt", lambda d: {"custom.score": {"$gt": "3"}}, {"delta"}),
    ("score-exists", lambda d: {"custom.score": {"$exists": True}}, ALL),
    # custom string
    ("color-eq", lambda d: {"custom.color": "green"}, {"gamma"}),
    ("color-ne-matches-missing", lambda d: {"custom.color": {"$ne": "red"}}, {"beta", "gamma", "delta"}),
    ("color-in", lambda d: {"custom.color": {"$in": ["red", "blue"]}}, {"alpha", "beta"}),
    ("color-gt", lambda d: {"custom.color": {"$gt": "green"}}, {"alpha"}),
    ("color-autocomplete", lambda d: {"custom.color": {"$autocomplete": "gr"}}, {"gamma"}),
    ("color-exists-false", lambda d: {"custom.color": {"$exists": False}}, {"delta"}),
    ("title-q-one-term", lambda d: {"custom.title": {"$q": "STANDUP"}}, {"beta"}),
    ("title-q-all-terms", lambda d: {"custom.title": {"$q": "meeting quarterly"}}, {"alpha"}),
    ("title-q-substring", lambda d: {"custom.title": {"$q": "plan"}}, {"alpha"}),
    ("title-q-no-match", lambda d: {"custom.title": {"$q": "daily planning"}}, set()),
    ("title-autocomplete-word", lambda d: {"custom.title": {"$autocomplete": "plan"}}, {"alpha"}),
    ("title-autocomplete-not-infix", lambda d: {"custom.title": {"$autocomplete": "lanning"}}, set()),
    ("title-null-is-missing", lambda d: {"custom.title": None}, {"delta"}),
    ("title-ne-null", lambda d: {"custom.title": {"$ne": None}}, {"alpha", "beta", "gamma"}),
    ("title-exists-json-null", lambda d: {"custom.title": {"$exists": True}}, ALL),
    # custom bool
    ("vip-true", lambda d: {"custom.vip": True}, {"alpha", "delta"}),
    ("vip-eq-false", lambda d: {"custom.vip": {"$eq": False}}, {"beta"}),
    ("vip-ne-true", lambda d: {"custom.vip": {"$ne": True}}, {"beta", "gamma"}),
    ("vip-in", lambda d: {"custom.vip": {"$in": [False]}}, {"beta"}),
    # custom nested paths
    ("nested-number", lambda d: {"custom.nested.level": {"$gte": 2}}, {"beta"}),
    ("nested-eq", lambda d: {"custom.nested.level": 1}, {"alpha"}),
    ("nested-autocomplete", lambda d: {"custom.nested.name": {"$autocomplete": "on"}}, {"alpha"}),
    ("nested-object-exists", lambda d: {"custom.nested": {"$exists": True}}, {"alpha", "beta"}),
    ("nested-missing-deep", lambda d: {"custom.nested.level.deeper": {"$exists": True}}, set()),
    ("touched", lambda d: {"custom.touched": True}, {"delta"}),
    # custom arrays
    ("tags-contains", lambda d: {"custom.tags": {"$contains": "b"}}, {"alpha", "beta"}),
    ("tags-contains-one", lambda d: {"custom.tags": {"$contains": "a"}}, {"alpha"}),
    ("tags-contains-none", lambda d: {"custom.tags": {"$contains": "z"}}, set()),
    ("nums-contains-number", lambda d: {"custom.nums": {"$contains": 3}}, {"beta"}),
    ("nums-contains-string-no-match", lambda d: {"custom.nums": {"$contains": "3"}}, set()),
    ("color-contains-not-array", lambda d: {"custom.color": {"$contains": "red"}}, set()),
    ("tags-exists", lambda d: {"custom.tags": {"$exists": True}}, {"alpha", "beta", "gamma"}),
    # combinators
    ("implicit-and", lambda d: {"team": "red", "custom.vip": True, "members": d.user("carol")}, {"delta"}),
    ("and", lambda d: {"$and": [{"team": "red"}, {"custom.score": 10}]}, {"alpha"}),
    ("or", lambda d: {"$or": [{"custom.score": 10}, {"custom.color": "green"}]}, {"alpha", "gamma"}),
    ("nor", lambda d: {"$nor": [{"custom.score": 10}, {"backstage": True}]}, {"beta", "delta"}),
    ("nor-null-field", lambda d: {"$nor": [{"team": "red"}]}, {"beta", "gamma"}),
    ("nor-missing-custom", lambda d: {"$nor": [{"custom.color": "red"}]}, {"beta", "gamma", "delta"}),
    (
        "nested-combinators",
        lambda d: {
            "$or": [
                {"$and": [{"team": "red"}, {"$nor": [{"ended_at": {"$exists": True}}]}]},
                {"$and": [{"backstage": True}, {"$or": [{"custom.score": {"$gt": 25}}, {"team": "blue"}]}]},
            ]
        },
        {"alpha", "gamma"},
    ),
    (
        "or-with-field",
        lambda d: {"type": d.call_type, "$or": [{"team": "blue"}, {"members": {"$exists": False}}]},
        {"beta"},
    ),
    ("empty-filter", lambda d: {}, ALL),
]


@pytest.mark.parametrize(("case", "make", "expected"), CALL_CASES, ids=[c[0] for c in CALL_CASES])
async def test_call_filter(calls, data, case, make, expected):
    assert set(await call_names(calls, data, make(data))) == expected


# --------------------------------------------------------------------------------------------------
# Filter operators on users and members
# --------------------------------------------------------------------------------------------------

USER_CASES: list[Case] = [
    ("id-eq", lambda d: {"id": d.user("bob")}, {"bob"}),
    ("id-autocomplete", lambda d: {"id": {"$autocomplete": "car"}}, {"carol"}),
    ("name-eq", lambda d: {"name": "Alice Smith"}, {"alice"}),
    ("name-ne", lambda d: {"name": {"$ne": "Alice Smith"}}, {"bob", "carol"}),
    ("name-gt", lambda d: {"name": {"$gt": "B"}}, {"bob", "carol"}),
    ("name-lt", lambda d: {"name": {"$lt": "Bob"}}, {"alice"}),
    ("name-in", lambda d: {"name": {"$in": ["Bob Stone", "Carol Stonebridge"]}}, {"bob", "carol"}),
    ("name-nin", lambda d: {"name": {"$nin": ["Bob Stone"]}}, {"alice", "carol"}),
    ("name-autocomplete-first-word", lambda d: {"name": {"$autocomplete": "ali"}}, {"alice"}),
    ("name-autocomplete-second-word", lambda d: {"name": {"$autocomplete": "STONE"}}, {"bob", "carol"}),
    ("name-autocomplete-not-infix", lambda d: {"name": {"$autocomplete": "mith"}}, set()),
    ("name-q", lambda d: {"name": {"$q": "stone bob"}}, {"bob"}),
    ("name-q-substring", lambda d: {"name": {"$q": "onebri"}}, {"carol"}),
    ("role-eq", lambda d: {"role": "admin"}, {"alice"}),
    ("role-ne", lambda d: {"role": {"$ne": "admin"}}, {"bob", "carol"}),
    ("teams-shorthand", lambda d: {"teams": d.team_b}, {"alice", "bob"}),
    ("teams-contains", lambda d: {"teams": {"$contains": d.team_a}}, {"alice"}),
    ("teams-in", lambda d: {"teams": {"$in": [d.team_a, "nobody"]}}, {"alice"}),
    ("teams-nin", lambda d: {"teams": {"$nin": [d.team_a]}}, {"bob", "carol"}),
    ("teams-ne", lambda d: {"teams": {"$ne": d.team_b}}, {"carol"}),
    ("teams-exists-false", lambda d: {"teams": {"$exists": False}}, {"carol"}),
    (
        "created-gt",
        lambda d: {"created_at": {"$gte": rfc3339(d.users["alice"].created_at)}},
        {"alice", "bob", "carol"},
    ),
    ("updated-lt", lambda d: {"updated_at": {"$lt": rfc3339(d.users["alice"].created_at)}}, set()),
    ("custom-number", lambda d: {"custom.age": {"$gt": 30}}, {"alice", "bob"}),
    ("custom-array", lambda d: {"custom.langs": {"$contains": "fr"}}, {"alice"}),
    ("custom-bool-ne", lambda d: {"custom.vip": {"$ne": True}}, {"bob", "carol"}),
    ("or", lambda d: {"$or": [{"custom.age": {"$lt": 30}}, {"role": "admin"}]}, {"alice", "carol"}),
    ("nor", lambda d: {"$nor": [{"teams": d.team_b}]}, {"carol"}),
]


@pytest.mark.parametrize(("case", "make", "expected"), USER_CASES, ids=[c[0] for c in USER_CASES])
async def test_user_filter(users, data, case, make, expected):
    assert set(await user_names(users, data, make(data))) == expected


async def test_member_filters(calls, users, unique):
    run = new_run()
    ids = [f"{name}-{run}" for name in ("ann", "ben", "cat", "dan")]
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i, name=i.split("-")[0]) for i in ids])
    )
    call_id = unique("c")
    await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
    roles = ["host", "user", "moderator", "user"]
    customs = [
        {"seat": 1, "muted": True},
        {"seat": 2, "muted": False, "tags": ["x"]},
        {"seat": 3},
        {"note": "hi there"},
    ]
    for user_id, role, custom in zip(ids, roles, customs, strict=True):
        await calls.UpdateCallMembers(
            call_service_pb2.UpdateCallMembersRequest(
                type="default",
                id=call_id,
                update_members=[call_pb2.MemberRequest(user_id=user_id, role=role, custom=struct(custom))],
            )
        )
    members = (
        await calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
    ).members
    created = {m.user_id.split("-")[0]: rfc3339(m.created_at) for m in members}

    async def names(conditions: dict[str, Any]) -> set[str]:
        response = await calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(
                type="default", id=call_id, filter_conditions=struct(conditions)
            )
        )
        return {m.user_id.split("-")[0] for m in response.members}

    assert await names({"user_id": ids[0]}) == {"ann"}
    assert await names({"user_id": {"$ne": ids[0]}}) == {"ben", "cat", "dan"}
    assert await names({"user_id": {"$in": ids[:2]}}) == {"ann", "ben"}
    assert await names({"user_id": {"$nin": ids[:2]}}) == {"cat", "dan"}
    assert await names({"user_id": {"$gt": ids[1]}}) == {"cat", "dan"}
    assert await names({"user_id": {"$autocomplete": "ca"}}) == {"cat"}
    assert await names({"user_id": {"$q": "dan"}}) == {"dan"}
    assert await names({"role": "user"}) == {"ben", "dan"}
    assert await names({"role": {"$in": ["host", "moderator"]}}) == {"ann", "cat"}
    assert await names({"role": {"$autocomplete": "mod"}}) == {"cat"}
    assert await names({"created_at": {"$gt": created["ben"]}}) == {"cat", "dan"}
    assert await names({"created_at": {"$lte": created["ben"]}}) == {"ann", "ben"}
    assert await names({"updated_at": {"$gte": created["dan"]}}) == {"dan"}
    assert await names({"custom.seat": {"$gte": 2}}) == {"ben", "cat"}
    assert await names({"custom.muted": True}) == {"ann"}
    assert await names({"custom.muted": {"$ne": True}}) == {"ben", "cat", "dan"}
    assert await names({"custom.tags": {"$contains": "x"}}) == {"ben"}
    assert await names({"custom.note": {"$q": "THERE"}}) == {"dan"}
    assert await names({"custom.seat": {"$exists": False}}) == {"dan"}
    assert await names({"$or": [{"role": "host"}, {"custom.seat": 3}]}) == {"ann", "cat"}
    assert await names({"$nor": [{"role": "user"}]}) == {"ann", "cat"}
    assert await names({"$and": [{"role": "user"}, {"$nor": [{"custom.muted": False}]}]}) == {"dan"}


# --------------------------------------------------------------------------------------------------
# Invalid filters
# --------------------------------------------------------------------------------------------------

INVALID_CALL_FILTERS = [
    ({"foo": 1}, "filter_conditions.foo"),
    ({"custom": {"color": "red"}}, "filter_conditions.custom"),
    ({"custom.color": {"$gt": {"a": 1}}}, "filter_conditions.custom.color.$gt"),
    ({"custom.color": {"$gt": ["a"]}}, "filter_conditions.custom.color.$gt"),
    ({"custom.color": {"$bogus": 1}}, "filter_conditions.custom.color.$bogus"),
    ({"custom.color": {"$in": ["a", 1]}}, "filter_conditions.custom.color.$in"),
    ({"custom.color": {"$in": "a"}}, "filter_conditions.custom.color.$in"),
    ({"custom.vip": {"$gt": True}}, "filter_conditions.custom.vip.$gt"),
    ({"custom.color": {"$exists": "yes"}}, "filter_conditions.custom.color.$exists"),
    ({"custom.color": {"$q": "   "}}, "filter_conditions.custom.color.$q"),
    ({"custom.a..b": 1}, "filter_conditions.custom.a..b"),
    ({"custom.a b": 1}, "filter_conditions.custom.a b"),
    ({"custom." + ".".join(["k"] * 11): 1}, "filter_conditions.custom." + ".".join(["k"] * 11)),
    ({"backstage": {"$gt": True}}, "filter_conditions.backstage.$gt"),
    ({"backstage": "yes"}, "filter_conditions.backstage"),
    ({"ongoing": {"$exists": True}}, "filter_conditions.ongoing.$exists"),
    ({"created_at": {"$gt": "yesterday"}}, "filter_conditions.created_at.$gt"),
    ({"created_at": {"$gt": "2024-01-01T00:00:00"}}, "filter_conditions.created_at.$gt"),
    ({"created_at": {"$gt": 1700000000}}, "filter_conditions.created_at.$gt"),
    ({"created_at": {"$autocomplete": "2024"}}, "filter_conditions.created_at.$autocomplete"),
    ({"created_at": {"$in": ["2024-01-01T00:00:00Z", "bad"]}}, "filter_conditions.created_at.$in[1]"),
    ({"created_at": None}, "filter_conditions.created_at"),
    ({"id": 5}, "filter_conditions.id"),
    ({"id": None}, "filter_conditions.id"),
    ({"id": {}}, "filter_conditions.id"),
    ({"id": {"$contains": "x"}}, "filter_conditions.id.$contains"),
    ({"id": {"$autocomplete": ""}}, "filter_conditions.id.$autocomplete"),
    ({"id": {"$gt": "x" * 1025}}, "filter_conditions.id.$gt"),
    ({"team": {"$in": "red"}}, "filter_conditions.team.$in"),
    ({"team": {"$in": ["red", 1]}}, "filter_conditions.team.$in[1]"),
    ({"team": {"$in": [str(i) for i in range(101)]}}, "filter_conditions.team.$in"),
    ({"team": {"$gt": None}}, "filter_conditions.team.$gt"),
    ({"members": {"$gt": "x"}}, "filter_conditions.members.$gt"),
    ({"members": ["a", "b"]}, "filter_conditions.members"),
    ({"members": {"$in": [1]}}, "filter_conditions.members.$in[0]"),
    ({"$or": []}, "filter_conditions.$or"),
    ({"$and": {"id": "x"}}, "filter_conditions.$and"),
    ({"$or": [{"foo": 1}]}, "filter_conditions.$or[0].foo"),
    ({"$or": ["x"]}, "filter_conditions.$or[0]"),
    ({"$nor": [{"id": "a"}, {"custom.x": {"$gt": None}}]}, "filter_conditions.$nor[1].custom.x.$gt"),
    ({"$and": [{"$or": [{"team": {"$regex": "x"}}]}]}, "filter_conditions.$and[0].$or[0].team.$regex"),
    ({"$xor": [{"id": "a"}]}, "filter_conditions.$xor"),
    ({"role": "host"}, "filter_conditions.role"),  # a member field, not a call field
]


@pytest.mark.parametrize(
    ("conditions", "path"), INVALID_CALL_FILTERS, ids=[p for _, p in INVALID_CALL_FILTERS]
)
async def test_invalid_call_filter(calls, conditions, path):
    details = await expect_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(filter_conditions=struct(conditions))),
        INVALID,
        "INVALID_FILTER",
        fields=[path],
    )
    assert details.fields == [path]


async def test_invalid_filter_reports_every_problem(calls):
    details = await expect_error(
        calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(
                filter_conditions=struct(
                    {"foo": 1, "custom.color": {"$gt": {"a": 1}}, "$or": [{"id": "ok"}, {"bar": {"$eq": 1}}]}
                )
            )
        ),
        INVALID,
        "INVALID_FILTER",
        fields=[
            "filter_conditions.foo",
            "filter_conditions.custom.color.$gt",
            "filter_conditions.$or[1].bar",
        ],
    )
    assert len(details.violations) == 3


async def test_too_deep_or_too_large_filters(calls):
    deep: dict[str, Any] = {"id": "x"}
    for _ in range(11):
        deep = {"$and": [deep]}
    await expect_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(filter_conditions=struct(deep))),
        INVALID,
        "INVALID_FILTER",
    )
    many = {"$or": [{"id": f"x{i}"} for i in range(201)]}
    await expect_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(filter_conditions=struct(many))),
        INVALID,
        "INVALID_FILTER",
        fields=["filter_conditions"],
    )


@pytest.mark.parametrize(
    ("conditions", "path"),
    [
        ({"nickname": "x"}, "filter_conditions.nickname"),
        ({"members": "x"}, "filter_conditions.members"),
        ({"teams": {"$gt": "a"}}, "filter_conditions.teams.$gt"),
        ({"name": {"$contains": "a"}}, "filter_conditions.name.$contains"),
        ({"custom.age": {"$gt": "ten", "$lt": {}}}, "filter_conditions.custom.age.$lt"),
    ],
)
async def test_invalid_user_filter(users, conditions, path):
    await expect_error(
        users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct(conditions))),
        INVALID,
        "INVALID_FILTER",
        fields=[path],
    )


@pytest.mark.parametrize(
    ("conditions", "path"),
    [
        ({"team": "x"}, "filter_conditions.team"),
        ({"role": {"$exists": "x"}}, "filter_conditions.role.$exists"),
        ({"custom.seat": {"$gte": [1]}}, "filter_conditions.custom.seat.$gte"),
    ],
)
async def test_invalid_member_filter(calls, unique, conditions, path):
    call_id = unique("c")
    await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
    await expect_error(
        calls.QueryMembers(
            call_service_pb2.QueryMembersRequest(
                type="default", id=call_id, filter_conditions=struct(conditions)
            )
        ),
        INVALID,
        "INVALID_FILTER",
        fields=[path],
    )


# --------------------------------------------------------------------------------------------------
# Sorting
# --------------------------------------------------------------------------------------------------


async def make_calls(calls, run: str, specs: list[tuple[str, dict[str, Any]]], **data: Any) -> None:
    for name, custom in specs:
        await calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type="default",
                id=f"{run}-{name}",
                data=call_service_pb2.CallData(custom=struct({"run": run, **custom}), **data),
            )
        )


async def sorted_names(calls, run: str, keys: list[query_pb2.SortParam], **request: Any) -> list[str]:
    response = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(
            filter_conditions=struct({"custom.run": run}), sort=keys, limit=100, **request
        )
    )
    return [state.call.id.rsplit("-", 1)[-1] for state in response.calls]


async def test_default_sort_is_created_at_descending(calls):
    run = new_run()
    await make_calls(calls, run, [(n, {}) for n in ("p", "q", "r")])
    assert await sorted_names(calls, run, []) == ["r", "q", "p"]
    assert await sorted_names(calls, run, sort(("created_at", ASC))) == ["p", "q", "r"]
    assert await sorted_names(calls, run, sort(("created_at", 0))) == [
        "p",
        "q",
        "r",
    ]  # unspecified = ascending


async def test_ties_are_broken_by_cid(calls, server):
    run = new_run()
    server.clock.step = timedelta(0)
    try:
        await make_calls(calls, run, [(n, {}) for n in ("m", "z", "a", "k")])
    finally:
        server.clock.step = timedelta(milliseconds=1)
    assert await sorted_names(calls, run, []) == ["a", "k", "m", "z"]
    assert await sorted_names(calls, run, sort(("created_at", ASC))) == ["a", "k", "m", "z"]
    assert await sorted_names(calls, run, sort(("created_at", DESC))) == ["a", "k", "m", "z"]
    assert await sorted_names(calls, run, sort(("updated_at", DESC))) == ["a", "k", "m", "z"]
    # Paging through ties never repeats or skips.
    seen: list[str] = []
    cursor = ""
    while True:
        response = await calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(
                filter_conditions=struct({"custom.run": run}), limit=1, next=cursor
            )
        )
        seen.extend(state.call.id.rsplit("-", 1)[-1] for state in response.calls)
        cursor = response.next
        if not cursor:
            break
    assert seen == ["a", "k", "m", "z"]


async def test_sort_by_id_cid_type(calls):
    run = new_run()
    await make_calls(calls, run, [(n, {}) for n in ("b", "c", "a")])
    assert await sorted_names(calls, run, sort(("id", ASC))) == ["a", "b", "c"]
    assert await sorted_names(calls, run, sort(("id", DESC))) == ["c", "b", "a"]
    assert await sorted_names(calls, run, sort(("cid", DESC))) == ["c", "b", "a"]
    assert await sorted_names(calls, run, sort(("type", DESC))) == ["a", "b", "c"]  # one type: ties by cid


async def test_custom_sort_with_declared_type(calls):
    run = new_run()
    await make_calls(
        calls,
        run,
        [
            ("n2", {"v": 2}),
            ("n10", {"v": 10}),
            ("nmissing", {}),
            ("nstring", {"v": "5"}),
            ("nneg", {"v": -1.5}),
        ],
    )
    # Numbers compare numerically; missing values and other JSON types sort first ascending (ties by cid).
    assert await sorted_names(calls, run, sort(("custom.v", ASC, NUMBER))) == [
        "nmissing",
        "nstring",
        "nneg",
        "n2",
        "n10",
    ]
    assert await sorted_names(calls, run, sort(("custom.v", DESC, NUMBER))) == [
        "n10",
        "n2",
        "nneg",
        "nmissing",
        "nstring",
    ]
    # As strings, only "5" is a string.
    assert (await sorted_names(calls, run, sort(("custom.v", DESC, STRING))))[0] == "nstring"

    run = new_run()
    await make_calls(
        calls, run, [("s10", {"v": "10"}), ("s2", {"v": "2"}), ("sb", {"v": "b"}), ("sa", {"v": "A"})]
    )
    ordered = await sorted_names(calls, run, sort(("custom.v", ASC, STRING)))
    assert ordered.index("s10") < ordered.index("s2") < ordered.index("sb")  # lexicographic, not numeric

    run = new_run()
    await make_calls(calls, run, [("t", {"v": True}), ("f", {"v": False}), ("x", {}), ("n", {"v": 1})])
    assert await sorted_names(calls, run, sort(("custom.v", ASC, BOOLEAN))) == ["n", "x", "f", "t"]
    assert await sorted_names(calls, run, sort(("custom.v", DESC, BOOLEAN))) == ["t", "f", "n", "x"]

    run = new_run()
    await make_calls(
        calls, run, [("deep1", {"a": {"b": 3}}), ("deep2", {"a": {"b": 1}}), ("deep3", {"a": 5})]
    )
    assert await sorted_names(calls, run, sort(("custom.a.b", DESC, NUMBER))) == ["deep1", "deep2", "deep3"]


async def test_two_key_sort(calls):
    run = new_run()
    await make_calls(
        calls,
        run,
        [
            ("a1", {"g": "x", "n": 1}),
            ("b1", {"g": "y", "n": 1}),
            ("a2", {"g": "x", "n": 2}),
            ("b2", {"g": "y", "n": 2}),
        ],
    )
    # Group ascending, newest first within a group.
    names = await sorted_names(calls, run, sort(("custom.g", ASC, STRING), ("created_at", DESC)))
    assert names == ["a2", "a1", "b2", "b1"]
    names = await sorted_names(calls, run, sort(("custom.n", DESC, NUMBER), ("custom.g", DESC, STRING)))
    assert names == ["b2", "a2", "b1", "a1"]
    # Paging with two keys.
    pages: list[str] = []
    cursor = ""
    while True:
        response = await calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(
                filter_conditions=struct({"custom.run": run}),
                sort=sort(("custom.g", ASC, STRING), ("created_at", DESC)),
                limit=3,
                next=cursor,
            )
        )
        pages.extend(state.call.id.rsplit("-", 1)[-1] for state in response.calls)
        cursor = response.next
        if not cursor:
            break
    assert pages == ["a2", "a1", "b2", "b1"]


async def test_sort_nullable_time(calls):
    run = new_run()
    await make_calls(calls, run, [("none", {})])
    for name, when in (("late", "2031-01-01T00:00:00Z"), ("early", "2030-01-01T00:00:00Z")):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(when)
        await make_calls(calls, run, [(name, {})], starts_at=stamp)
    assert await sorted_names(calls, run, sort(("starts_at", ASC))) == ["none", "early", "late"]
    assert await sorted_names(calls, run, sort(("starts_at", DESC))) == ["late", "early", "none"]
    await calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=f"{run}-early"))
    assert await sorted_names(calls, run, sort(("ended_at", DESC), ("created_at", ASC))) == [
        "early",
        "none",
        "late",
    ]


async def test_user_sort(users):
    run = new_run()
    people = [("u3", "Bea"), ("u1", "Cid"), ("u2", "Bea"), ("u4", "Al")]
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(
            users=[
                user_pb2.UserRequest(id=f"{run}-{i}", name=n, custom=struct({"run": run, "k": len(i)}))
                for i, n in people
            ]
        )
    )

    async def order(keys: list[query_pb2.SortParam]) -> list[str]:
        response = await users.QueryUsers(
            user_pb2.QueryUsersRequest(filter_conditions=struct({"custom.run": run}), sort=keys)
        )
        return [u.id.rsplit("-", 1)[-1] for u in response.users]

    # One upsert: same created_at, so the default order falls back to the id.
    assert await order([]) == ["u1", "u2", "u3", "u4"]
    assert await order(sort(("name", ASC))) == ["u4", "u2", "u3", "u1"]  # ties by id
    assert await order(sort(("name", DESC))) == ["u1", "u2", "u3", "u4"]
    assert await order(sort(("name", ASC), ("id", DESC))) == ["u4", "u3", "u2", "u1"]
    assert await order(sort(("custom.k", ASC, NUMBER), ("name", DESC))) == ["u1", "u2", "u3", "u4"]


@pytest.mark.parametrize(
    ("keys", "path"),
    [
        (sort(("created_at", ASC), ("id", ASC), ("cid", ASC)), "sort"),
        (sort(("team", ASC)), "sort[0].field"),
        (sort(("members", ASC)), "sort[0].field"),
        (sort(("", ASC)), "sort[0].field"),
        (sort(("created_at", ASC), ("nope", DESC)), "sort[1].field"),
        (sort(("id", ASC), ("id", DESC)), "sort[1].field"),
        (sort(("custom.score", ASC)), "sort[0].type"),
        (sort(("custom.a..b", ASC, NUMBER)), "sort[0].field"),
        ([query_pb2.SortParam(field="created_at", direction=7)], "sort[0].direction"),
    ],
)
async def test_invalid_call_sort(calls, keys, path):
    details = await expect_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(sort=keys)),
        INVALID,
        "INVALID_SORT",
        fields=[path],
    )
    assert path in details.fields


async def test_invalid_user_sort(users):
    await expect_error(
        users.QueryUsers(user_pb2.QueryUsersRequest(sort=sort(("name", ASC), ("role", ASC), ("id", ASC)))),
        INVALID,
        "INVALID_SORT",
        fields=["sort"],
    )
    await expect_error(
        users.QueryUsers(user_pb2.QueryUsersRequest(sort=sort(("teams", ASC)))),
        INVALID,
        "INVALID_SORT",
        fields=["sort[0].field"],
    )


# --------------------------------------------------------------------------------------------------
# Pagination
# --------------------------------------------------------------------------------------------------


async def walk(
    calls, request: call_service_pb2.QueryCallsRequest, between=None
) -> tuple[list[list[str]], str]:
    """Follows `next` to the end, calling `between(page_number)` before each following request; returns
    the pages of ids and the last page's `prev` cursor."""
    pages: list[list[str]] = []
    response = await calls.QueryCalls(request)
    pages.append([state.call.id for state in response.calls])
    assert response.prev == ""  # first page
    while response.next:
        if between is not None:
            await between(len(pages))
        following = call_service_pb2.QueryCallsRequest()
        following.CopyFrom(request)
        following.next = response.next
        response = await calls.QueryCalls(following)
        pages.append([state.call.id for state in response.calls])
        assert response.prev, "every page after the first has a prev cursor"
    return pages, response.prev


async def test_pages_forward_and_back_with_inserts_in_between(calls):
    run = new_run()
    scores = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    await make_calls(calls, run, [(f"s{s}", {"score": s}) for s in scores])
    pre_existing = [f"{run}-s{s}" for s in scores]
    inserts = {1: [15, 45], 2: [5, 95], 3: [65, 85]}

    async def insert(page_number: int) -> None:
        await make_calls(calls, run, [(f"s{s}", {"score": s}) for s in inserts.get(page_number, [])])

    request = call_service_pb2.QueryCallsRequest(
        filter_conditions=struct({"custom.run": run}), sort=sort(("custom.score", ASC, NUMBER)), limit=3
    )
    pages, prev = await walk(calls, request, insert)
    seen = [call_id for page in pages for call_id in page]
    assert len(seen) == len(set(seen)), f"duplicates in {seen}"
    assert set(pre_existing) <= set(seen), "a pre-existing call was skipped"
    assert all(len(page) == 3 for page in pages[:-1])
    # Rows inserted ahead of the cursor show up; rows inserted behind it do not.
    assert {f"{run}-s45", f"{run}-s95", f"{run}-s85"} <= set(seen)
    assert not {f"{run}-s15", f"{run}-s5", f"{run}-s65"} & set(seen)
    assert seen == sorted(seen, key=lambda i: int(i.rsplit("-s", 1)[1]))

    # Back from the last page with prev: every row now present, in order, each once.
    everything = sorted([*scores, 15, 45, 5, 95, 65, 85])
    back: list[list[str]] = [pages[-1]]
    while prev:
        previous = call_service_pb2.QueryCallsRequest()
        previous.CopyFrom(request)
        previous.prev = prev
        response = await calls.QueryCalls(previous)
        assert len(response.calls) <= 3
        assert response.next, "a prev page always leads forward again"
        back.insert(0, [state.call.id for state in response.calls])
        prev = response.prev
    assert [call_id for page in back for call_id in page] == [f"{run}-s{s}" for s in everything]
    assert len(back[0]) <= 3 and all(len(page) == 3 for page in back[1:-1])


async def test_default_order_pages_with_inserts(calls):
    run = new_run()
    await make_calls(calls, run, [(f"n{i:02d}", {}) for i in range(7)])
    pre_existing = {f"{run}-n{i:02d}" for i in range(7)}
    counter = iter(range(100))

    async def insert(_: int) -> None:
        await make_calls(calls, run, [(f"new{next(counter)}", {})])

    request = call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}), limit=2)
    pages, _ = await walk(calls, request, insert)
    seen = [call_id for page in pages for call_id in page]
    assert len(seen) == len(set(seen))
    # Newest first: inserted calls are newer than the cursor, so they never appear on later pages.
    assert set(seen) == pre_existing
    assert seen == sorted(pre_existing, reverse=True)


async def test_prev_from_second_page_returns_first_page(calls):
    run = new_run()
    await make_calls(calls, run, [(f"n{i}", {}) for i in range(5)])
    request = call_service_pb2.QueryCallsRequest(
        filter_conditions=struct({"custom.run": run}), sort=sort(("created_at", ASC)), limit=2
    )
    first = await calls.QueryCalls(request)
    second = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(
            filter_conditions=request.filter_conditions, sort=request.sort, limit=2, next=first.next
        )
    )
    back = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(
            filter_conditions=request.filter_conditions, sort=request.sort, limit=2, prev=second.prev
        )
    )
    assert [s.call.id for s in back.calls] == [s.call.id for s in first.calls]
    assert back.prev == ""
    assert back.next


async def test_page_after_every_row_is_deleted(calls):
    run = new_run()
    await make_calls(calls, run, [(f"n{i}", {}) for i in range(4)])
    request = call_service_pb2.QueryCallsRequest(
        filter_conditions=struct({"custom.run": run}), sort=sort(("created_at", ASC)), limit=2
    )
    first = await calls.QueryCalls(request)
    for i in (2, 3):
        await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=f"{run}-n{i}"))
    following = call_service_pb2.QueryCallsRequest()
    following.CopyFrom(request)
    following.next = first.next
    empty = await calls.QueryCalls(following)
    assert list(empty.calls) == [] and empty.next == ""
    assert empty.prev
    back = call_service_pb2.QueryCallsRequest()
    back.CopyFrom(request)
    back.prev = empty.prev
    assert [s.call.id for s in (await calls.QueryCalls(back)).calls] == [f"{run}-n0", f"{run}-n1"]


async def test_user_pages(users):
    run = new_run()
    team = f"team-{run}"
    ids = [f"{run}-{i:02d}" for i in range(7)]
    for user_id in ids:  # one request each: distinct created_at
        await users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id, teams=[team])])
        )
    seen: list[str] = []
    cursor = ""
    while True:
        response = await users.QueryUsers(
            user_pb2.QueryUsersRequest(filter_conditions=struct({"teams": team}), limit=3, next=cursor)
        )
        seen.extend(user.id for user in response.users)
        cursor = response.next
        if not cursor:
            break
    assert seen == ids


async def test_limits(calls, users):
    run = new_run()
    await make_calls(calls, run, [(f"n{i:02d}", {}) for i in range(27)])
    default = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}))
    )
    assert len(default.calls) == 25 and default.next
    rest = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}), next=default.next)
    )
    assert len(rest.calls) == 2 and rest.next == ""
    exact = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}), limit=27)
    )
    assert len(exact.calls) == 27 and exact.next == ""
    hundred = await calls.QueryCalls(call_service_pb2.QueryCallsRequest(limit=100))
    assert len(hundred.calls) <= 100
    for bad in (101, -1, 1000):
        await expect_error(
            calls.QueryCalls(call_service_pb2.QueryCallsRequest(limit=bad)),
            INVALID,
            "INVALID_ARGUMENT",
            fields=["limit"],
        )
        await expect_error(users.QueryUsers(user_pb2.QueryUsersRequest(limit=bad)), INVALID, fields=["limit"])


async def test_query_calls_members_limit(calls, users):
    run = new_run()
    ids = [f"{run}-m{i}" for i in range(4)]
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i) for i in ids]))
    for name in ("x", "y"):
        await calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type="default",
                id=f"{run}-{name}",
                data=call_service_pb2.CallData(
                    custom=struct({"run": run}), members=[call_pb2.MemberRequest(user_id=i) for i in ids]
                ),
            )
        )
    response = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}), members_limit=2)
    )
    assert [len(state.members) for state in response.calls] == [2, 2]
    assert all(state.call.member_count == 4 for state in response.calls)
    assert [m.user_id for m in response.calls[0].members] == sorted(ids)[:2]
    full = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.run": run}))
    )
    assert [len(state.members) for state in full.calls] == [4, 4]
    await expect_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(members_limit=101)),
        INVALID,
        fields=["members_limit"],
    )


# --------------------------------------------------------------------------------------------------
# Cursors
# --------------------------------------------------------------------------------------------------


def tamper(cursor: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[len(raw) // 3] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


async def test_cursor_validation(calls, users):
    run = new_run()
    await make_calls(calls, run, [(f"n{i}", {"n": i}) for i in range(5)])
    conditions = {"custom.run": run}
    first = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct(conditions), limit=2)
    )
    second = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct(conditions), limit=2, next=first.next)
    )

    def request(**fields: Any) -> call_service_pb2.QueryCallsRequest:
        fields.setdefault("filter_conditions", struct(conditions))
        return call_service_pb2.QueryCallsRequest(limit=2, **fields)

    for bad in (tamper(first.next), first.next[:-2], "not-a-cursor", "!!!", first.next + "A"):
        await expect_error(calls.QueryCalls(request(next=bad)), INVALID, "INVALID_CURSOR", fields=["next"])
    await expect_error(
        calls.QueryCalls(request(prev=tamper(second.prev))), INVALID, "INVALID_CURSOR", fields=["prev"]
    )
    # A next cursor is not a prev cursor.
    await expect_error(calls.QueryCalls(request(prev=first.next)), INVALID, "INVALID_CURSOR", fields=["prev"])
    # Both at once.
    await expect_error(
        calls.QueryCalls(request(next=first.next, prev=second.prev)),
        INVALID,
        "INVALID_CURSOR",
        fields=["prev"],
    )
    # Reused with a different filter or sort.
    await expect_error(
        calls.QueryCalls(
            request(next=first.next, filter_conditions=struct({"custom.run": run, "custom.n": {"$gt": 0}}))
        ),
        INVALID,
        "INVALID_CURSOR",
        fields=["next"],
    )
    await expect_error(
        calls.QueryCalls(request(next=first.next, filter_conditions=struct({}))),
        INVALID,
        "INVALID_CURSOR",
        fields=["next"],
    )
    await expect_error(
        calls.QueryCalls(request(next=first.next, sort=sort(("created_at", ASC)))),
        INVALID,
        "INVALID_CURSOR",
        fields=["next"],
    )
    # A calls cursor is not a users cursor.
    await expect_error(
        users.QueryUsers(user_pb2.QueryUsersRequest(next=first.next)),
        INVALID,
        "INVALID_CURSOR",
        fields=["next"],
    )
    # The same filter written differently (key order, 1 vs 1.0) is the same query; a different limit is fine.
    same = {"custom.n": {"$gte": 0.0}, "custom.run": run}
    other_order = {"custom.run": run, "custom.n": {"$gte": 0}}
    page_a = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct(same), limit=2)
    )
    page_b = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct(other_order), limit=3, next=page_a.next)
    )
    assert len(page_b.calls) == 3
