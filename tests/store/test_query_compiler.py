"""The query compiler against real SQLite and PostgreSQL: every operator per field kind, combinators,
errors and their field paths, sorting with NULLs and custom types, and keyset pagination."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Select, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from callplane_server.domain.records import PageRequest, SortInput
from callplane_server.errors import InvalidArgument
from callplane_server.store.models import CallMemberRow, CallRow, CallTypeRow, UserRow, UserTeamRow
from callplane_server.store.query import (
    CALLS,
    MEMBERS,
    USERS,
    CursorSigner,
    EntitySpec,
    compile_filter,
    fetch_page,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SIGNER = CursorSigner(b"test-secret-0123456789abcdef")


def at(hours: float = 0, **delta: float) -> datetime:
    return T0 + timedelta(hours=hours, **delta)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# --- the shared, read-only dataset -----------------------------------------------------------------

DATASET_TYPES = ("default", "livestream")
DATASET_USERS = ("u1", "u2", "u3", "u4")

CALL_DATA: list[dict[str, Any]] = [
    dict(
        type="default",
        id="alpha",
        team="red",
        created_by_user_id="u1",
        created_at=at(1),
        updated_at=at(1),
        starts_at=at(10),
        ended_at=None,
        backstage=False,
        ongoing=True,
        custom={"color": "red apple", "score": 10, "vip": True, "tags": ["a", "b"], "nested": {"level": 3}},
    ),
    dict(
        type="default",
        id="beta",
        team=None,
        created_by_user_id=None,
        created_at=at(2),
        updated_at=at(7),
        starts_at=None,
        ended_at=at(5),
        backstage=True,
        ongoing=False,
        custom={"color": "green", "score": 2.5, "vip": False, "tags": ["b"], "nested": {"level": "high"}},
    ),
    dict(
        type="livestream",
        id="gamma",
        team="blue",
        created_by_user_id="u2",
        created_at=at(3),
        updated_at=at(3),
        starts_at=at(1),
        ended_at=None,
        backstage=False,
        ongoing=False,
        custom={"color": None, "score": "10", "tags": "a", "big": 5e9},
    ),
    dict(
        type="livestream",
        id="delta_1",
        team="red",
        created_by_user_id="u1",
        created_at=at(4),
        updated_at=at(4),
        starts_at=None,
        ended_at=at(6),
        backstage=True,
        ongoing=True,
        custom={"score": -1, "tags": [1, 2.5, True], "quote": "it's"},
    ),
    dict(
        type="default",
        id="100%_off",
        team=None,
        created_by_user_id=None,
        created_at=at(5),
        updated_at=at(5),
        starts_at=None,
        ended_at=None,
        backstage=False,
        ongoing=False,
        custom={"tags": [True]},
    ),
]

USER_DATA: list[dict[str, Any]] = [
    dict(id="u1", name="Alice Smith", role="admin", custom={"age": 30}, teams=["red", "blue"]),
    dict(id="u2", name="Bob Jones", role="user", custom={"age": "thirty"}, teams=["red"]),
    dict(id="u3", name="Smithers", role="user", custom={}, teams=[]),
    dict(id="u4", name="Anna-Lee Smith_x", role="moderator", custom={"age": 41.5}, teams=["green"]),
]

# (call id, user id, role, custom, created hour)
MEMBER_DATA = [
    ("alpha", "u1", "host", {"muted": False}, 1),
    ("alpha", "u2", "user", {"muted": True}, 2),
    ("beta", "u2", "user", {}, 3),
    ("delta_1", "u3", "user", {"muted": "yes"}, 4),
    ("100%_off", "u1", "user", {}, 5),
]


def _cid(call_id: str) -> str:
    return next(f"{c['type']}:{c['id']}" for c in CALL_DATA if c["id"] == call_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dataset(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as session:
        session.add_all(
            CallTypeRow(name=name, settings={}, grants={}, created_at=T0, updated_at=T0)
            for name in DATASET_TYPES
        )
        for user in USER_DATA:
            session.add(
                UserRow(
                    id=user["id"],
                    name=user["name"],
                    role=user["role"],
                    custom=user["custom"],
                    created_at=T0,
                    updated_at=T0,
                )
            )
            session.add_all(UserTeamRow(user_id=user["id"], team=team) for team in user["teams"])
        await session.flush()
        session.add_all(CallRow(cid=f"{c['type']}:{c['id']}", **c) for c in CALL_DATA)
        await session.flush()
        session.add_all(
            CallMemberRow(
                call_cid=_cid(call_id),
                user_id=user_id,
                role=role,
                custom=custom,
                created_at=at(h),
                updated_at=at(h),
            )
            for call_id, user_id, role, custom, h in MEMBER_DATA
        )


async def matching(session: AsyncSession, entity: EntitySpec, conditions: dict[str, Any]) -> set[str]:
    """Ids of dataset rows matching `conditions`, compiled and run entirely in SQL."""
    condition = compile_filter(entity, conditions)
    if entity is CALLS:
        statement: Select[Any] = select(CallRow.id).where(CallRow.type.in_(DATASET_TYPES), condition)
    elif entity is USERS:
        statement = select(UserRow.id).where(UserRow.id.in_(DATASET_USERS), condition)
    else:
        statement = (
            select(CallRow.id + "/" + CallMemberRow.user_id)
            .select_from(CallMemberRow)
            .join(CallRow, CallRow.cid == CallMemberRow.call_cid)
            .where(CallRow.type.in_(DATASET_TYPES), condition)
        )
    return set((await session.scalars(statement)).all())


ALL_CALLS = {c["id"] for c in CALL_DATA}


def calls_except(*ids: str) -> set[str]:
    return ALL_CALLS - set(ids)


CALL_FILTER_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    # strings
    ("empty", {}, ALL_CALLS),
    ("eq shorthand", {"id": "alpha"}, {"alpha"}),
    ("eq", {"cid": {"$eq": "livestream:gamma"}}, {"gamma"}),
    ("ne", {"type": {"$ne": "default"}}, {"gamma", "delta_1"}),
    ("ne matches null", {"team": {"$ne": "red"}}, {"beta", "gamma", "100%_off"}),
    ("eq null", {"team": None}, {"beta", "100%_off"}),
    ("ne null", {"created_by_user_id": {"$ne": None}}, {"alpha", "gamma", "delta_1"}),
    ("gt", {"id": {"$gt": "beta"}}, {"gamma", "delta_1"}),
    ("gte", {"id": {"$gte": "beta"}}, {"beta", "gamma", "delta_1"}),
    ("lt", {"id": {"$lt": "beta"}}, {"alpha", "100%_off"}),
    ("lte", {"id": {"$lte": "beta"}}, {"alpha", "beta", "100%_off"}),
    ("range", {"id": {"$gt": "alpha", "$lt": "delta_2"}}, {"beta", "delta_1"}),
    ("gt skips null", {"team": {"$gt": "a"}}, {"alpha", "gamma", "delta_1"}),
    ("in", {"id": {"$in": ["alpha", "gamma", "nope"]}}, {"alpha", "gamma"}),
    ("in empty", {"id": {"$in": []}}, set()),
    ("nin", {"id": {"$nin": ["alpha"]}}, calls_except("alpha")),
    ("nin matches null", {"team": {"$nin": ["red"]}}, {"beta", "gamma", "100%_off"}),
    ("nin empty", {"id": {"$nin": []}}, ALL_CALLS),
    ("exists true", {"team": {"$exists": True}}, {"alpha", "gamma", "delta_1"}),
    ("exists false", {"team": {"$exists": False}}, {"beta", "100%_off"}),
    ("exists on non-null", {"id": {"$exists": False}}, set()),
    ("autocomplete prefix", {"id": {"$autocomplete": "DEL"}}, {"delta_1"}),
    ("autocomplete escapes %", {"id": {"$autocomplete": "100%"}}, {"100%_off"}),
    ("autocomplete escapes _", {"id": {"$autocomplete": "_"}}, set()),
    ("autocomplete not infix", {"id": {"$autocomplete": "lph"}}, set()),
    ("q substring", {"id": {"$q": "ET"}}, {"beta"}),
    ("q escapes", {"id": {"$q": "%_"}}, {"100%_off"}),
    ("q all terms", {"cid": {"$q": "DEFAULT lph"}}, {"alpha"}),
    ("quote in value", {"id": "x' OR '1'='1"}, set()),
    # times
    ("time eq", {"created_at": iso(at(1))}, {"alpha"}),
    ("time eq other offset", {"created_at": {"$eq": "2026-01-01T03:00:00+02:00"}}, {"alpha"}),
    ("time ne", {"created_at": {"$ne": iso(at(1))}}, calls_except("alpha")),
    ("time gt", {"created_at": {"$gt": iso(at(3))}}, {"delta_1", "100%_off"}),
    ("time gte", {"created_at": {"$gte": iso(at(3))}}, {"gamma", "delta_1", "100%_off"}),
    ("time lt", {"updated_at": {"$lt": iso(at(3))}}, {"alpha"}),
    ("time lte", {"updated_at": {"$lte": iso(at(3))}}, {"alpha", "gamma"}),
    ("time in", {"created_at": {"$in": [iso(at(1)), iso(at(3))]}}, {"alpha", "gamma"}),
    ("time nin null", {"starts_at": {"$nin": [iso(at(10))]}}, calls_except("alpha")),
    ("time lt skips null", {"starts_at": {"$lt": iso(at(5))}}, {"gamma"}),
    ("time ne null", {"starts_at": {"$ne": iso(at(1))}}, calls_except("gamma")),
    ("time eq null", {"starts_at": None}, {"beta", "delta_1", "100%_off"}),
    ("time exists", {"ended_at": {"$exists": True}}, {"beta", "delta_1"}),
    ("time exists false", {"ended_at": {"$exists": False}}, {"alpha", "gamma", "100%_off"}),
    # booleans
    ("bool eq", {"backstage": True}, {"beta", "delta_1"}),
    ("bool ne", {"ongoing": {"$ne": True}}, {"beta", "gamma", "100%_off"}),
    ("bool eq false", {"ongoing": {"$eq": False}}, {"beta", "gamma", "100%_off"}),
    # arrays (members)
    ("array eq", {"members": "u1"}, {"alpha", "100%_off"}),
    ("array contains", {"members": {"$contains": "u2"}}, {"alpha", "beta"}),
    ("array ne", {"members": {"$ne": "u1"}}, {"beta", "gamma", "delta_1"}),
    ("array in", {"members": {"$in": ["u2", "u3"]}}, {"alpha", "beta", "delta_1"}),
    ("array nin", {"members": {"$nin": ["u1", "u2"]}}, {"gamma", "delta_1"}),
    ("array in empty", {"members": {"$in": []}}, set()),
    ("array exists", {"members": {"$exists": True}}, calls_except("gamma")),
    ("array not exists", {"members": {"$exists": False}}, {"gamma"}),
    ("array both", {"members": {"$contains": "u1", "$ne": "u2"}}, {"100%_off"}),
    # custom strings
    ("custom str eq", {"custom.color": "red apple"}, {"alpha"}),
    ("custom str ne", {"custom.color": {"$ne": "green"}}, calls_except("beta")),
    ("custom str gt", {"custom.color": {"$gt": "h"}}, {"alpha"}),
    ("custom str range", {"custom.color": {"$gte": "green", "$lt": "greeo"}}, {"beta"}),
    ("custom str autocomplete", {"custom.color": {"$autocomplete": "app"}}, {"alpha"}),
    ("custom str q", {"custom.color": {"$q": "RED ple"}}, {"alpha"}),
    ("custom str in", {"custom.color": {"$in": ["green", "blue"]}}, {"beta"}),
    ("custom str nin", {"custom.color": {"$nin": ["green"]}}, calls_except("beta")),
    ("custom str vs number", {"custom.score": "10"}, {"gamma"}),
    ("custom str range vs number", {"custom.score": {"$gt": "1"}}, {"gamma"}),
    ("custom quote", {"custom.quote": "it's"}, {"delta_1"}),
    ("custom array is not eq", {"custom.tags": "a"}, {"gamma"}),
    # custom numbers
    ("custom num eq", {"custom.score": 10.0}, {"alpha"}),
    ("custom num gt", {"custom.score": {"$gt": 5.0}}, {"alpha"}),
    ("custom num gte", {"custom.score": {"$gte": 2.5}}, {"alpha", "beta"}),
    ("custom num lt", {"custom.score": {"$lt": 0}}, {"delta_1"}),
    ("custom num lte", {"custom.score": {"$lte": 2.5}}, {"beta", "delta_1"}),
    ("custom num ne", {"custom.score": {"$ne": 10}}, calls_except("alpha")),
    ("custom num in", {"custom.score": {"$in": [10, -1.0]}}, {"alpha", "delta_1"}),
    ("custom num nin", {"custom.score": {"$nin": [10]}}, calls_except("alpha")),
    ("custom num big", {"custom.big": {"$gt": 3e9}}, {"gamma"}),
    ("custom nested", {"custom.nested.level": {"$gt": 2}}, {"alpha"}),
    ("custom nested str", {"custom.nested.level": "high"}, {"beta"}),
    # custom booleans
    ("custom bool eq", {"custom.vip": True}, {"alpha"}),
    ("custom bool eq false", {"custom.vip": False}, {"beta"}),
    ("custom bool ne", {"custom.vip": {"$ne": True}}, calls_except("alpha")),
    ("custom bool in", {"custom.vip": {"$in": [True]}}, {"alpha"}),
    ("custom bool is not number", {"custom.vip": 1}, set()),
    # custom null / missing / exists
    ("custom eq null", {"custom.color": None}, {"gamma", "delta_1", "100%_off"}),
    ("custom ne null", {"custom.color": {"$ne": None}}, {"alpha", "beta"}),
    ("custom exists", {"custom.color": {"$exists": True}}, {"alpha", "beta", "gamma"}),
    ("custom not exists", {"custom.color": {"$exists": False}}, {"delta_1", "100%_off"}),
    ("custom object exists", {"custom.nested": {"$exists": True}}, {"alpha", "beta"}),
    ("custom through scalar", {"custom.color.deeper": {"$exists": True}}, set()),
    # custom arrays
    ("contains str", {"custom.tags": {"$contains": "a"}}, {"alpha"}),
    ("contains str 2", {"custom.tags": {"$contains": "b"}}, {"alpha", "beta"}),
    ("contains num", {"custom.tags": {"$contains": 2.5}}, {"delta_1"}),
    ("contains num not bool", {"custom.tags": {"$contains": 1}}, {"delta_1"}),
    ("contains bool", {"custom.tags": {"$contains": True}}, {"delta_1", "100%_off"}),
    ("contains on object", {"custom.nested": {"$contains": "level"}}, set()),
    # combinators
    ("or", {"$or": [{"id": "alpha"}, {"id": "beta"}]}, {"alpha", "beta"}),
    ("and", {"$and": [{"type": "default"}, {"backstage": True}]}, {"beta"}),
    ("nor", {"$nor": [{"type": "default"}]}, {"gamma", "delta_1"}),
    ("nor with unknowns", {"$nor": [{"custom.score": {"$gt": 5}}]}, calls_except("alpha")),
    ("nor null column", {"$nor": [{"team": {"$gt": "c"}}]}, {"beta", "gamma", "100%_off"}),
    (
        "nested",
        {"type": "default", "$or": [{"$and": [{"team": None}, {"ongoing": False}]}, {"members": "u1"}]},
        {"alpha", "beta", "100%_off"},
    ),
    ("fields and ops and", {"team": "red", "ongoing": True, "custom.score": {"$lt": 0}}, {"delta_1"}),
]


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [pytest.param(c, e, id=name) for name, c, e in CALL_FILTER_CASES],
)
async def test_call_filters(
    session: AsyncSession, dataset: None, conditions: dict[str, Any], expected: set[str]
):
    assert await matching(session, CALLS, conditions) == expected


USER_FILTER_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("autocomplete word", {"name": {"$autocomplete": "smi"}}, {"u1", "u3", "u4"}),
    ("autocomplete first word", {"name": {"$autocomplete": "ali"}}, {"u1"}),
    ("autocomplete hyphen is no space", {"name": {"$autocomplete": "lee"}}, set()),
    ("autocomplete escapes _", {"name": {"$autocomplete": "smith_"}}, {"u4"}),
    ("autocomplete phrase", {"name": {"$autocomplete": "bob jo"}}, {"u2"}),
    ("q case-insensitive", {"name": {"$q": "ALICE"}}, {"u1"}),
    ("q terms", {"name": {"$q": "smith ali"}}, {"u1"}),
    ("q infix", {"name": {"$q": "ith"}}, {"u1", "u3", "u4"}),
    ("role in", {"role": {"$in": ["admin", "moderator"]}}, {"u1", "u4"}),
    ("teams eq", {"teams": "red"}, {"u1", "u2"}),
    ("teams in", {"teams": {"$in": ["blue", "green"]}}, {"u1", "u4"}),
    ("teams nin", {"teams": {"$nin": ["red"]}}, {"u3", "u4"}),
    ("teams ne", {"teams": {"$ne": "red"}}, {"u3", "u4"}),
    ("teams exists false", {"teams": {"$exists": False}}, {"u3"}),
    ("custom num", {"custom.age": {"$gte": 30}}, {"u1", "u4"}),
    ("custom str", {"custom.age": {"$autocomplete": "thi"}}, {"u2"}),
    ("custom nin", {"custom.age": {"$nin": [30]}}, {"u2", "u3", "u4"}),
]


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [pytest.param(c, e, id=name) for name, c, e in USER_FILTER_CASES],
)
async def test_user_filters(
    session: AsyncSession, dataset: None, conditions: dict[str, Any], expected: set[str]
):
    assert await matching(session, USERS, conditions) == expected


MEMBER_FILTER_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("user_id", {"user_id": "u2"}, {"alpha/u2", "beta/u2"}),
    ("role", {"role": {"$ne": "user"}}, {"alpha/u1"}),
    ("created_at", {"created_at": {"$gte": iso(at(4))}}, {"delta_1/u3", "100%_off/u1"}),
    ("updated_at", {"updated_at": {"$lt": iso(at(2))}}, {"alpha/u1"}),
    ("custom bool", {"custom.muted": True}, {"alpha/u2"}),
    ("custom bool ne", {"custom.muted": {"$ne": True}}, {"alpha/u1", "beta/u2", "delta_1/u3", "100%_off/u1"}),
    ("custom str", {"custom.muted": "yes"}, {"delta_1/u3"}),
    ("custom exists", {"custom.muted": {"$exists": False}}, {"beta/u2", "100%_off/u1"}),
]


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [pytest.param(c, e, id=name) for name, c, e in MEMBER_FILTER_CASES],
)
async def test_member_filters(
    session: AsyncSession, dataset: None, conditions: dict[str, Any], expected: set[str]
):
    assert await matching(session, MEMBERS, conditions) == expected


# --- filter errors (no database needed, but run per backend for uniformity of the module) ----------


def nested(depth: int) -> dict[str, Any]:
    conditions: dict[str, Any] = {"id": "x"}
    for _ in range(depth):
        conditions = {"$and": [conditions]}
    return conditions


FILTER_ERROR_CASES: list[tuple[str, EntitySpec, Any, list[str]]] = [
    ("unknown field", CALLS, {"foo": 1}, ["filter_conditions.foo"]),
    ("member field on calls", CALLS, {"role": "x"}, ["filter_conditions.role"]),
    ("bare custom", CALLS, {"custom": {"a": 1}}, ["filter_conditions.custom"]),
    ("unknown operator", CALLS, {"id": {"$regex": "a"}}, ["filter_conditions.id.$regex"]),
    ("non-operator key", CALLS, {"id": {"foo": "a"}}, ["filter_conditions.id.foo"]),
    ("empty operator object", CALLS, {"id": {}}, ["filter_conditions.id"]),
    ("unknown combinator", CALLS, {"$xor": []}, ["filter_conditions.$xor"]),
    (
        "op on time",
        CALLS,
        {"created_at": {"$autocomplete": "2026"}},
        ["filter_conditions.created_at.$autocomplete"],
    ),
    ("op on bool", CALLS, {"backstage": {"$in": [True]}}, ["filter_conditions.backstage.$in"]),
    ("op on bool gt", CALLS, {"ongoing": {"$gt": False}}, ["filter_conditions.ongoing.$gt"]),
    ("op on array", CALLS, {"members": {"$gt": "u1"}}, ["filter_conditions.members.$gt"]),
    ("contains on string", CALLS, {"id": {"$contains": "a"}}, ["filter_conditions.id.$contains"]),
    ("string operand", CALLS, {"id": 3.0}, ["filter_conditions.id"]),
    ("string null non-null col", CALLS, {"id": None}, ["filter_conditions.id"]),
    ("string gt null", CALLS, {"team": {"$gt": None}}, ["filter_conditions.team.$gt"]),
    ("in not list", CALLS, {"id": {"$in": "alpha"}}, ["filter_conditions.id.$in"]),
    (
        "in element",
        CALLS,
        {"$or": [{"id": "a"}, {"id": {"$in": ["a", 1.0]}}]},
        ["filter_conditions.$or[1].id.$in[1]"],
    ),
    ("in too long", CALLS, {"id": {"$in": [str(i) for i in range(101)]}}, ["filter_conditions.id.$in"]),
    ("exists not bool", CALLS, {"team": {"$exists": 1.0}}, ["filter_conditions.team.$exists"]),
    ("blank autocomplete", CALLS, {"id": {"$autocomplete": "  "}}, ["filter_conditions.id.$autocomplete"]),
    ("q not string", CALLS, {"id": {"$q": ["a"]}}, ["filter_conditions.id.$q"]),
    ("naive time", CALLS, {"created_at": "2026-01-01T00:00:00"}, ["filter_conditions.created_at"]),
    ("date only", CALLS, {"created_at": {"$gt": "2026-01-01"}}, ["filter_conditions.created_at.$gt"]),
    ("garbage time", CALLS, {"created_at": {"$lt": "yesterday"}}, ["filter_conditions.created_at.$lt"]),
    ("number time", CALLS, {"created_at": {"$lt": 1.0}}, ["filter_conditions.created_at.$lt"]),
    ("time in element", CALLS, {"ended_at": {"$in": [iso(T0), "x"]}}, ["filter_conditions.ended_at.$in[1]"]),
    ("bool operand", CALLS, {"backstage": "true"}, ["filter_conditions.backstage"]),
    ("array list shorthand", CALLS, {"members": ["u1"]}, ["filter_conditions.members"]),
    ("array element type", CALLS, {"members": {"$in": [1.0]}}, ["filter_conditions.members.$in[0]"]),
    ("array exists type", CALLS, {"members": {"$exists": "yes"}}, ["filter_conditions.members.$exists"]),
    ("custom bool range", CALLS, {"custom.vip": {"$gt": True}}, ["filter_conditions.custom.vip.$gt"]),
    ("custom null range", CALLS, {"custom.color": {"$gt": None}}, ["filter_conditions.custom.color.$gt"]),
    ("custom object operand", CALLS, {"custom.x": {"$eq": {"a": 1}}}, ["filter_conditions.custom.x.$eq"]),
    ("custom list operand", CALLS, {"custom.x": {"$eq": [1]}}, ["filter_conditions.custom.x.$eq"]),
    ("custom object shorthand", CALLS, {"custom.x": {"a": 1}}, ["filter_conditions.custom.x.a"]),
    (
        "custom mixed in",
        CALLS,
        {"custom.score": {"$in": [10.0, "10"]}},
        ["filter_conditions.custom.score.$in"],
    ),
    ("custom null in", CALLS, {"custom.score": {"$in": [None]}}, ["filter_conditions.custom.score.$in[0]"]),
    (
        "custom contains null",
        CALLS,
        {"custom.tags": {"$contains": None}},
        ["filter_conditions.custom.tags.$contains"],
    ),
    ("custom nan", CALLS, {"custom.score": float("nan")}, ["filter_conditions.custom.score"]),
    ("custom q number", CALLS, {"custom.color": {"$q": 1.0}}, ["filter_conditions.custom.color.$q"]),
    ("custom empty segment", CALLS, {"custom.a..b": 1.0}, ["filter_conditions.custom.a..b"]),
    ("custom trailing dot", CALLS, {"custom.": 1.0}, ["filter_conditions.custom."]),
    ("custom quote", CALLS, {'custom.a"b': 1.0}, ['filter_conditions.custom.a"b']),
    ("custom sql", CALLS, {"custom.a') OR 1=1 --": 1.0}, ["filter_conditions.custom.a') OR 1=1 --"]),
    (
        "custom too deep",
        CALLS,
        {"custom." + ".".join("k" * 11): 1.0},
        ["filter_conditions.custom." + ".".join("k" * 11)],
    ),
    ("empty or", CALLS, {"$or": []}, ["filter_conditions.$or"]),
    ("or not list", CALLS, {"$and": {"id": "a"}}, ["filter_conditions.$and"]),
    ("or item not object", CALLS, {"$nor": [{"id": "a"}, "id"]}, ["filter_conditions.$nor[1]"]),
    ("top not object", CALLS, ["id"], ["filter_conditions"]),
    ("too deep", CALLS, nested(11), ["filter_conditions" + ".$and[0]" * 10 + ".$and"]),
    ("too many", CALLS, {"$or": [{"id": str(i)} for i in range(201)]}, ["filter_conditions"]),
    ("teams on calls", CALLS, {"teams": "red"}, ["filter_conditions.teams"]),
    ("members on users", USERS, {"members": "u1"}, ["filter_conditions.members"]),
    (
        "several at once",
        CALLS,
        {"foo": 1, "id": {"$gt": 1.0, "$bogus": 1}, "$or": [{"custom.c": {"$lt": True}}]},
        [
            "filter_conditions.foo",
            "filter_conditions.id.$gt",
            "filter_conditions.id.$bogus",
            "filter_conditions.$or[0].custom.c.$lt",
        ],
    ),
]


@pytest.mark.parametrize(
    ("entity", "conditions", "fields"),
    [pytest.param(entity, c, f, id=name) for name, entity, c, f in FILTER_ERROR_CASES],
)
def test_filter_errors(entity: EntitySpec, conditions: Any, fields: list[str]):
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(entity, conditions)
    assert caught.value.reason == "INVALID_FILTER"
    assert [v.field for v in caught.value.field_violations] == fields


def test_filter_limits_allow_the_maximum():
    compile_filter(CALLS, nested(10))
    compile_filter(CALLS, {"$or": [{"id": str(i)} for i in range(200)]})
    compile_filter(CALLS, {"custom." + ".".join("k" * 10): 1.0, "id": {"$in": [str(i) for i in range(100)]}})


# --- sorting -----------------------------------------------------------------------------------------


async def sorted_ids(session: AsyncSession, entity: EntitySpec, sort: Sequence[SortInput]) -> list[str]:
    """One page of all dataset rows in the requested order."""
    if entity is CALLS:
        base: Select[Any] = select(CallRow).where(CallRow.type.in_(DATASET_TYPES))
    else:
        base = select(UserRow).where(UserRow.id.in_(DATASET_USERS))
    rows, next_cursor, prev_cursor = await fetch_page(
        session, base, entity, PageRequest(sort=tuple(sort), limit=100), SIGNER
    )
    assert next_cursor == prev_cursor == ""
    return [row.id for row in rows]


SORT_CASES: list[tuple[str, EntitySpec, list[SortInput], list[str]]] = [
    ("default desc", CALLS, [], ["100%_off", "delta_1", "gamma", "beta", "alpha"]),
    ("asc", CALLS, [SortInput("created_at")], ["alpha", "beta", "gamma", "delta_1", "100%_off"]),
    # NULLs first ascending, tiebreak by cid (default:100%_off < default:beta < livestream:delta_1).
    (
        "nulls first",
        CALLS,
        [SortInput("starts_at", "asc")],
        ["100%_off", "beta", "delta_1", "gamma", "alpha"],
    ),
    (
        "nulls last",
        CALLS,
        [SortInput("starts_at", "desc")],
        ["alpha", "gamma", "100%_off", "beta", "delta_1"],
    ),
    (
        "ended_at desc",
        CALLS,
        [SortInput("ended_at", "desc")],
        ["delta_1", "beta", "100%_off", "alpha", "gamma"],
    ),
    (
        "two keys",
        CALLS,
        [SortInput("type"), SortInput("created_at", "desc")],
        ["100%_off", "beta", "alpha", "delta_1", "gamma"],
    ),
    (
        "tiebreak field desc",
        CALLS,
        [SortInput("cid", "desc")],
        ["gamma", "delta_1", "beta", "alpha", "100%_off"],
    ),
    ("id", CALLS, [SortInput("id")], ["100%_off", "alpha", "beta", "delta_1", "gamma"]),
    (
        "updated_at",
        CALLS,
        [SortInput("updated_at", "desc")],
        ["beta", "100%_off", "delta_1", "gamma", "alpha"],
    ),
    # custom number: the string "10" of gamma and the missing value of 100%_off sort as NULL.
    (
        "custom number asc",
        CALLS,
        [SortInput("custom.score", "asc", "number")],
        ["100%_off", "gamma", "delta_1", "beta", "alpha"],
    ),
    (
        "custom number desc",
        CALLS,
        [SortInput("custom.score", "desc", "number")],
        ["alpha", "beta", "delta_1", "100%_off", "gamma"],
    ),
    (
        "custom string asc",
        CALLS,
        [SortInput("custom.color", "asc", "string")],
        ["100%_off", "delta_1", "gamma", "beta", "alpha"],
    ),
    (
        "custom boolean desc",
        CALLS,
        [SortInput("custom.vip", "desc", "boolean")],
        ["alpha", "beta", "100%_off", "delta_1", "gamma"],
    ),
    (
        "custom then column",
        CALLS,
        [SortInput("custom.vip", "asc", "boolean"), SortInput("created_at", "desc")],
        ["100%_off", "delta_1", "gamma", "beta", "alpha"],
    ),
    ("users name", USERS, [SortInput("name")], ["u1", "u4", "u2", "u3"]),
    ("users custom mixed", USERS, [SortInput("custom.age", "desc", "number")], ["u4", "u1", "u2", "u3"]),
]


@pytest.mark.parametrize(
    ("entity", "sort", "expected"),
    [pytest.param(entity, s, e, id=name) for name, entity, s, e in SORT_CASES],
)
async def test_sort(
    session: AsyncSession, dataset: None, entity: EntitySpec, sort: list[SortInput], expected: list[str]
):
    assert await sorted_ids(session, entity, sort) == expected


SORT_ERROR_CASES: list[tuple[str, EntitySpec, list[SortInput], list[str]]] = [
    ("unknown field", CALLS, [SortInput("backstage")], ["sort[0].field"]),
    ("custom without type", CALLS, [SortInput("custom.score")], ["sort[0].type"]),
    ("bad custom path", CALLS, [SortInput("custom.a b", type="string")], ["sort[0].field"]),
    ("bad direction", CALLS, [SortInput("id", "up")], ["sort[0].direction"]),  # type: ignore[arg-type]
    ("duplicate", CALLS, [SortInput("id"), SortInput("id", "desc")], ["sort[1].field"]),
    ("too many calls", CALLS, [SortInput("id"), SortInput("type"), SortInput("cid")], ["sort"]),
    ("too many members", MEMBERS, [SortInput("role"), SortInput("user_id")], ["sort"]),
    ("user field on members", MEMBERS, [SortInput("name")], ["sort[0].field"]),
]


@pytest.mark.parametrize(
    ("entity", "sort", "fields"),
    [pytest.param(entity, s, f, id=name) for name, entity, s, f in SORT_ERROR_CASES],
)
async def test_sort_errors(
    session: AsyncSession, entity: EntitySpec, sort: list[SortInput], fields: list[str]
):
    base = select(entity.model)
    with pytest.raises(InvalidArgument) as caught:
        await fetch_page(session, base, entity, PageRequest(sort=tuple(sort)), SIGNER)
    assert caught.value.reason == "INVALID_SORT"
    assert [v.field for v in caught.value.field_violations] == fields


# --- pagination --------------------------------------------------------------------------------------


class Paging:
    """Its own call type per test, so tests never see each other's rows."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.type = f"t{uuid.uuid4().hex[:10]}"
        self.counter = 0

    def base(self) -> Select[Any]:
        return select(CallRow).where(CallRow.type == self.type)

    async def setup(self) -> None:
        async with self.sessions.begin() as session:
            session.add(CallTypeRow(name=self.type, settings={}, grants={}, created_at=T0, updated_at=T0))

    async def add(self, call_id: str | None = None, **fields: Any) -> str:
        self.counter += 1
        call_id = call_id or f"p{self.counter:03d}"
        values: dict[str, Any] = dict(created_at=T0, updated_at=T0, custom={})
        values.update(fields)
        async with self.sessions.begin() as session:
            session.add(CallRow(cid=f"{self.type}:{call_id}", type=self.type, id=call_id, **values))
        return call_id

    async def remove(self, call_id: str) -> None:
        async with self.sessions.begin() as session:
            await session.execute(delete(CallRow).where(CallRow.cid == f"{self.type}:{call_id}"))

    async def page(self, **request: Any) -> tuple[list[str], str, str]:
        async with self.sessions() as session:
            rows, next_cursor, prev_cursor = await fetch_page(
                session, self.base(), CALLS, PageRequest(**request), SIGNER
            )
        return [row.id for row in rows], next_cursor, prev_cursor


@pytest_asyncio.fixture(loop_scope="module")
async def paging(sessions: async_sessionmaker[AsyncSession]) -> Paging:
    helper = Paging(sessions)
    await helper.setup()
    return helper


def python_order(rows: list[dict[str, Any]], sort: Sequence[tuple[str, str, Any]]) -> list[str]:
    """Reference order: NULL smallest (ASC nulls first, DESC nulls last), then cid ascending."""
    ordered = sorted(rows, key=lambda row: row["id"])  # cid = type + ":" + id, same type
    for name, direction, extract in reversed(sort):

        def key(row: dict[str, Any], name: str = name, extract: Any = extract) -> tuple[Any, ...]:
            value = extract(row[name]) if extract else row[name]
            return (0,) if value is None else (1, value)

        ordered = sorted(ordered, key=key, reverse=direction == "desc")
    return [row["id"] for row in ordered]


def custom_value(path: str, kind: type) -> Any:
    def extract(custom: dict[str, Any]) -> Any:
        value = custom.get(path)
        if kind is float:
            return value if isinstance(value, int | float) and not isinstance(value, bool) else None
        return value if isinstance(value, kind) else None

    return lambda custom: extract(custom)


PAGED_SORTS: list[tuple[str, list[SortInput], list[tuple[str, str, Any]]]] = [
    ("default", [], [("created_at", "desc", None)]),
    ("starts asc", [SortInput("starts_at", "asc")], [("starts_at", "asc", None)]),
    ("starts desc", [SortInput("starts_at", "desc")], [("starts_at", "desc", None)]),
    (
        "starts desc, created asc",
        [SortInput("starts_at", "desc"), SortInput("created_at", "asc")],
        [("starts_at", "desc", None), ("created_at", "asc", None)],
    ),
    (
        "score desc, created asc",
        [SortInput("custom.score", "desc", "number"), SortInput("created_at")],
        [("custom", "desc", custom_value("score", float)), ("created_at", "asc", None)],
    ),
    (
        "score as string",
        [SortInput("custom.score", "asc", "string")],
        [("custom", "asc", custom_value("score", str))],
    ),
    (
        "flag asc, ended desc",
        [SortInput("custom.flag", "asc", "boolean"), SortInput("ended_at", "desc")],
        [("custom", "asc", custom_value("flag", bool)), ("ended_at", "desc", None)],
    ),
    ("id desc", [SortInput("id", "desc")], [("id", "desc", None)]),
]


def generated_row(i: int) -> dict[str, Any]:
    """Many ties and NULLs: created_at in groups of 3 (with microseconds), starts_at NULL every 4th."""
    custom: dict[str, Any] = {}
    if i % 6 == 1:
        custom["score"] = f"s{i % 4}"
    elif i % 6 != 0:
        custom["score"] = (i % 5) * 1.5 - 3
    if i % 3 != 2:
        custom["flag"] = i % 2 == 0
    return dict(
        created_at=T0 + timedelta(minutes=i // 3, microseconds=123457),
        updated_at=T0,
        starts_at=None if i % 4 == 0 else at(i % 5),
        ended_at=None if i % 3 == 0 else at(-(i % 2)),
        custom=custom,
    )


@pytest.mark.parametrize("limit", [1, 4, 7])
@pytest.mark.parametrize(
    ("sort", "reference"),
    [pytest.param(s, r, id=name) for name, s, r in PAGED_SORTS],
)
async def test_paging_forward_and_back(
    paging: Paging, limit: int, sort: list[SortInput], reference: list[tuple[str, str, Any]]
):
    rows = []
    for i in range(23):
        row = generated_row(i)
        row["id"] = await paging.add(**row)
        rows.append(row)
    expected = python_order(rows, reference)

    whole, next_cursor, prev_cursor = await paging.page(sort=tuple(sort), limit=100)
    assert (whole, next_cursor, prev_cursor) == (expected, "", "")

    pages: list[list[str]] = []
    items, next_cursor, prev_cursor = await paging.page(sort=tuple(sort), limit=limit)
    assert prev_cursor == ""
    pages.append(items)
    while next_cursor:
        items, next_cursor, prev_cursor = await paging.page(sort=tuple(sort), limit=limit, next=next_cursor)
        assert prev_cursor
        pages.append(items)
    assert [item for page in pages for item in page] == expected
    assert all(len(page) == limit for page in pages[:-1])

    # Back from the last page: the same pages in reverse, and no prev on the first one.
    backwards: list[list[str]] = [pages[-1]]
    cursor = prev_cursor
    while cursor:
        items, next_cursor, cursor = await paging.page(sort=tuple(sort), limit=limit, prev=cursor)
        assert next_cursor
        backwards.append(items)
    assert backwards == list(reversed(pages))


async def test_inserts_between_pages_forward(paging: Paging):
    # Default sort: created_at desc, cid asc.
    originals = [await paging.add(f"c{i:02d}", created_at=at(i)) for i in range(10)]
    seen: list[str] = []
    items, next_cursor, _ = await paging.page(limit=3)
    seen += items
    assert items == ["c09", "c08", "c07"]
    # Same created_at as the boundary row c07: cid "c07a" sorts after it (must show), "c0" before it.
    await paging.add("c07a", created_at=at(7))
    await paging.add("c0", created_at=at(7))  # cid "...:c0" < "...:c07": before the boundary, already passed
    await paging.add("new-top", created_at=at(20))  # before everything: must not appear
    await paging.add("new-bottom", created_at=at(-1))  # after everything: must appear at the end
    while next_cursor:
        items, next_cursor, _ = await paging.page(limit=3, next=next_cursor)
        seen += items
        await paging.add(f"late-{len(seen)}", created_at=at(100))  # always before the cursor
    assert len(seen) == len(set(seen))
    assert seen == ["c09", "c08", "c07", "c07a", *reversed(originals[:7]), "new-bottom"]


async def test_inserts_between_pages_backward(paging: Paging):
    for i in range(10):
        await paging.add(f"c{i:02d}", created_at=at(i))
    sort = (SortInput("created_at", "asc"),)
    whole, _, _ = await paging.page(sort=sort, limit=100)
    # Walk to the last page, then back, inserting rows on both sides of the boundary.
    cursor = ""
    while True:
        items, next_cursor, prev_cursor = await paging.page(
            sort=sort, limit=4, **({"next": cursor} if cursor else {})
        )
        if not next_cursor:
            break
        cursor = next_cursor
    assert items == whole[8:]
    seen = list(items)
    await paging.add("c07z", created_at=at(7))  # just before the boundary c08 in display order: must show
    await paging.add("c08z", created_at=at(8))  # after the boundary: already passed, must not show
    await paging.add("old", created_at=at(-5))  # the very first row now: must show on the last prev page
    cursor = prev_cursor
    while cursor:
        items, _, cursor = await paging.page(sort=sort, limit=4, prev=cursor)
        seen = items + seen
    assert len(seen) == len(set(seen))
    assert seen == ["old", "c00", "c01", "c02", "c03", "c04", "c05", "c06", "c07", "c07z", "c08", "c09"]


async def test_deleted_boundary_row(paging: Paging):
    for i in range(6):
        await paging.add(f"c{i}", created_at=at(i))
    items, next_cursor, _ = await paging.page(limit=2)
    assert items == ["c5", "c4"]
    await paging.remove("c4")
    items, next_cursor, prev_cursor = await paging.page(limit=2, next=next_cursor)
    assert items == ["c3", "c2"]
    items, next_cursor, prev_cursor = await paging.page(limit=2, prev=prev_cursor)
    assert (items, prev_cursor) == (["c5"], "")


async def test_empty_page_after_deletions_links_back(paging: Paging):
    for i in range(4):
        await paging.add(f"c{i}", created_at=at(i))
    items, next_cursor, _ = await paging.page(limit=2)
    assert items == ["c3", "c2"] and next_cursor
    await paging.remove("c1")
    await paging.remove("c0")
    items, after_next, prev_cursor = await paging.page(limit=2, next=next_cursor)
    assert (items, after_next) == ([], "")
    # The way back includes the boundary row c2 itself.
    items, next_again, prev_again = await paging.page(limit=2, prev=prev_cursor)
    assert (items, prev_again) == (["c3", "c2"], "")
    # ...and forward from there is again empty.
    items, _, _ = await paging.page(limit=2, next=next_again)
    assert items == []


async def test_empty_result(paging: Paging):
    assert await paging.page() == ([], "", "")
    await paging.add("only")
    assert await paging.page(filter_conditions={"id": "other"}) == ([], "", "")


async def test_filter_and_paging_combined(paging: Paging):
    for i in range(9):
        await paging.add(f"c{i}", created_at=at(i), custom={"even": i % 2 == 0})
    request = dict(filter_conditions={"custom.even": True}, sort=(SortInput("created_at", "asc"),), limit=2)
    items, next_cursor, _ = await paging.page(**request)
    seen = list(items)
    while next_cursor:
        items, next_cursor, _ = await paging.page(**request, next=next_cursor)
        seen += items
    assert seen == ["c0", "c2", "c4", "c6", "c8"]


async def test_members_paging_is_scoped(sessions: async_sessionmaker[AsyncSession], paging: Paging):
    ids = [f"m{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
    async with sessions.begin() as session:
        session.add_all(UserRow(id=i, name=i, created_at=T0, updated_at=T0) for i in ids)
    await paging.add("a")
    await paging.add("b")
    a, b = f"{paging.type}:a", f"{paging.type}:b"
    async with sessions.begin() as session:
        for n, user_id in enumerate(ids):
            for cid in (a, b):
                session.add(
                    CallMemberRow(
                        call_cid=cid, user_id=user_id, role="user", created_at=at(n % 2), updated_at=T0
                    )
                )

    async def members(cid: str, **request: Any) -> tuple[list[str], str, str]:
        async with sessions() as session:
            base = select(CallMemberRow).where(CallMemberRow.call_cid == cid)
            rows, n, p = await fetch_page(session, base, MEMBERS, PageRequest(**request), SIGNER, scope=cid)
        return [row.user_id for row in rows], n, p

    first, next_cursor, _ = await members(a, limit=2)
    expected = sorted(ids[0::2]) + sorted(ids[1::2])  # created_at asc (0 then 1), user_id tiebreak
    assert first == expected[:2]
    rest, _, _ = await members(a, limit=3, next=next_cursor)
    assert rest == expected[2:]
    with pytest.raises(InvalidArgument) as caught:
        await members(b, limit=2, next=next_cursor)
    assert (caught.value.reason, caught.value.field_violations[0].field) == ("INVALID_CURSOR", "next")
    # custom sort on members
    by_custom, _, _ = await members(a, sort=(SortInput("custom.x", "desc", "string"),), limit=10)
    assert by_custom == sorted(ids)


# --- cursor validation -------------------------------------------------------------------------------


def _tamper(token: str, change: Any) -> str:
    blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    raw, mac = blob[:-16], blob[-16:]
    payload = json.loads(raw)
    change(payload)
    raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw + mac).rstrip(b"=").decode()


async def test_bad_cursors(paging: Paging):
    for i in range(5):
        await paging.add(f"c{i}", created_at=at(i))
    _, good, _ = await paging.page(limit=2)
    assert good

    async def rejected(field: str, **request: Any) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await paging.page(limit=2, **request)
        assert caught.value.reason == "INVALID_CURSOR", caught.value
        assert [v.field for v in caught.value.field_violations] == [field]

    flipped = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    await rejected("next", next=flipped)
    await rejected("next", next=good[:-3])
    await rejected("next", next="garbage!")
    await rejected("next", next="ü")
    await rejected("next", next="x" * 100_000)
    await rejected("next", next=_tamper(good, lambda p: p["k"].__setitem__(0, iso(at(-100)))))
    payload = json.loads(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))[:-16])
    await rejected("next", next=CursorSigner(b"another-secret-0123456789").sign(payload))
    assert SIGNER.sign(payload) == good  # the same payload with our key is the original cursor
    # Correctly signed but not matching the query: different filter, sort, direction or shape.
    await rejected("next", next=good, filter_conditions={"id": {"$ne": "zzz"}})
    await rejected("next", next=good, sort=(SortInput("created_at", "asc"),))
    await rejected("prev", prev=good)
    fingerprint = payload["f"]
    for keys in ([], ["x", "y"], [5, "c1"], [None, "c1"], ["not a time", "c1"], [iso(at(1)), 5]):
        await rejected("next", next=SIGNER.sign({"v": 1, "d": "next", "f": fingerprint, "k": keys}))
    await rejected("next", next=SIGNER.sign({"v": 2, "d": "next", "f": fingerprint, "k": [iso(at(1)), "c"]}))
    await rejected("next", next=SIGNER.sign(["not", "an", "object"]))  # type: ignore[arg-type]
    # A different limit is fine; so is an equivalent filter spelled with ints instead of floats.
    items, _, _ = await paging.page(limit=3, next=good)
    assert items == ["c2", "c1", "c0"]
    _, good_filtered, _ = await paging.page(limit=2, filter_conditions={"custom.n": {"$ne": 1.0}})
    items, _, _ = await paging.page(limit=2, next=good_filtered, filter_conditions={"custom.n": {"$ne": 1}})
    assert items == ["c2", "c1"]


@pytest.mark.parametrize("limit", [0, -1, 101])
async def test_bad_limit(session: AsyncSession, limit: int):
    with pytest.raises(InvalidArgument) as caught:
        await fetch_page(session, select(CallRow), CALLS, PageRequest(limit=limit), SIGNER)
    assert [v.field for v in caught.value.field_violations] == ["limit"]


async def test_next_and_prev_together(session: AsyncSession):
    with pytest.raises(InvalidArgument) as caught:
        await fetch_page(session, select(CallRow), CALLS, PageRequest(next="a", prev="b"), SIGNER)
    assert caught.value.reason == "INVALID_CURSOR"


def test_signer_needs_a_real_secret():
    with pytest.raises(ValueError):
        CursorSigner(b"short")
