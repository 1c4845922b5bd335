"""The ergonomic Python client (`callplane.CallplaneClient`).

Part 1 needs no server: conversion helpers, typed custom getters, error unpacking, and the client's
plumbing (token, metadata, deadline, error mapping) against a tiny fake UserService.
Part 2 runs end to end against the real server through the `grpc_target` fixture from conftest.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from callplane import CallplaneClient, CallplaneError, CallState, CustomData, QueryPage
from callplane.client.convert import (
    dict_to_struct,
    from_timestamp,
    settings_to_dict,
    struct_to_dict,
    to_grants,
    to_member_requests,
    to_partial_updates,
    to_settings,
    to_sort_params,
    to_timestamp,
    to_user_requests,
)
from callplane.client.custom import from_plain
from callplane.v1 import call_type_pb2, query_pb2, user_pb2, user_pb2_grpc
from tests.support import SERVER_TOKEN

# --------------------------------------------------------------------------------------------------
# Part 1: no server
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inner:
    label: str
    weight: float = 1.0


@dataclasses.dataclass
class SampleStruct:
    count: int
    name: str
    inner: Inner
    tags: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def test_dict_to_struct_round_trip_with_dataclass_and_datetime() -> None:
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    struct = dict_to_struct(
        {"sample": SampleStruct(3, "x", Inner("in")), "when": when, "color": Color.RED, "list": (1, "a")}
    )
    assert isinstance(struct, struct_pb2.Struct)
    assert struct_to_dict(struct) == {
        "sample": {
            "count": 3,
            "name": "x",
            "inner": {"label": "in", "weight": 1.0},
            "tags": [],
            "note": None,
        },
        "when": "2030-01-02T03:04:05+00:00",
        "color": "red",
        "list": [1, "a"],
    }
    # A dataclass instance as the whole custom value.
    assert struct_to_dict(dict_to_struct(Inner("a", 2))) == {"label": "a", "weight": 2.0}
    assert dict_to_struct(None) is None


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"big": 2**53 + 1}, ValueError),
        ({"nan": float("nan")}, ValueError),
        ({1: "int key"}, TypeError),
        ({"naive": dt.datetime(2030, 1, 1)}, ValueError),
        ({"obj": object()}, TypeError),
        ([1, 2], TypeError),
    ],
)
def test_dict_to_struct_rejects(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        dict_to_struct(value)


def test_timestamps() -> None:
    when = dt.datetime(2030, 5, 6, 7, 8, 9, 123000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ts = to_timestamp(when)
    assert ts.ToDatetime(tzinfo=dt.UTC) == when
    msg = user_pb2.User(created_at=ts)
    assert from_timestamp(msg, "created_at") == when
    assert from_timestamp(msg, "created_at").tzinfo is not None  # type: ignore[union-attr]
    assert from_timestamp(msg, "updated_at") is None
    assert to_timestamp(None) is None
    with pytest.raises(ValueError, match="naive"):
        to_timestamp(dt.datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        to_timestamp("2030-01-01")  # type: ignore[arg-type]


def test_settings_conversion() -> None:
    settings = to_settings({"audio": {"mic_default_on": True}, "ring": {"incoming_call_timeout_ms": 15000}})
    assert isinstance(settings, call_type_pb2.CallSettings)
    assert settings.audio.HasField("mic_default_on") and settings.audio.mic_default_on
    assert not settings.audio.HasField("enabled")  # unset stays unset: overrides stay partial
    assert settings_to_dict(settings) == {
        "audio": {"mic_default_on": True},
        "ring": {"incoming_call_timeout_ms": 15000},
    }
    assert settings_to_dict(call_type_pb2.CallSettings()) == {}
    assert to_settings(settings) is settings
    assert to_settings(None) is None
    with pytest.raises(ValueError, match="micro_default_on"):
        to_settings({"audio": {"micro_default_on": True}})


def test_sort_params() -> None:
    params = to_sort_params(
        [
            {"field": "created_at", "direction": -1},
            {"field": "custom.score", "direction": "asc", "type": "number"},
            "-starts_at",
            query_pb2.SortParam(field="cid", direction=query_pb2.SORT_DIRECTION_DESC),
            {"field": "id", "direction": query_pb2.SORT_DIRECTION_DESC},
            {"field": "name"},
        ]
    )
    assert [(p.field, p.direction, p.type) for p in params] == [
        ("created_at", query_pb2.SORT_DIRECTION_DESC, query_pb2.SORT_TYPE_UNSPECIFIED),
        ("custom.score", query_pb2.SORT_DIRECTION_ASC, query_pb2.SORT_TYPE_NUMBER),
        ("starts_at", query_pb2.SORT_DIRECTION_DESC, query_pb2.SORT_TYPE_UNSPECIFIED),
        ("cid", query_pb2.SORT_DIRECTION_DESC, query_pb2.SORT_TYPE_UNSPECIFIED),
        ("id", query_pb2.SORT_DIRECTION_DESC, query_pb2.SORT_TYPE_UNSPECIFIED),
        ("name", query_pb2.SORT_DIRECTION_UNSPECIFIED, query_pb2.SORT_TYPE_UNSPECIFIED),
    ]
    assert [p.field for p in to_sort_params({"field": "x", "direction": 1})] == ["x"]
    assert to_sort_params(None) == []
    with pytest.raises(ValueError, match="direction"):
        to_sort_params([{"field": "x", "direction": 0}])
    with pytest.raises(ValueError, match="type"):
        to_sort_params([{"field": "x", "type": "date"}])
    with pytest.raises(TypeError, match="unknown keys"):
        to_sort_params([{"field": "x", "order": 1}])


def test_request_builders() -> None:
    members = to_member_requests(["bob", {"user_id": "alice", "role": "host", "custom": Inner("a")}])
    assert [(m.user_id, m.role, m.HasField("custom")) for m in members] == [
        ("bob", "", False),
        ("alice", "host", True),
    ]
    assert struct_to_dict(members[1].custom) == {"label": "a", "weight": 1.0}
    with pytest.raises(TypeError, match=r"members\[0\].*unknown keys"):
        to_member_requests([{"id": "bob"}])

    users = to_user_requests([{"id": "u", "name": "U", "teams": ["t"], "custom": {"a": 1}}])
    assert users[0].id == "u" and list(users[0].teams) == ["t"] and users[0].custom["a"] == 1
    with pytest.raises(TypeError, match="teams"):
        to_user_requests([{"id": "u", "teams": "t"}])

    updates = to_partial_updates([{"id": "u", "set": {"custom.color": "red"}, "unset": ["image"]}])
    assert updates[0].set["custom.color"] == "red" and list(updates[0].unset) == ["image"]

    grants = to_grants({"user": ["join-call"], "admin": []})
    assert grants is not None and list(grants["user"].capabilities) == ["join-call"]
    with pytest.raises(TypeError):
        to_grants({"user": "join-call"})


def test_custom_typed_get() -> None:
    custom = CustomData(
        {
            "my_custom_type": {
                "count": 3.0,
                "name": "x",
                "inner": {"label": "in"},
                "tags": ["a", "b"],
                "extra": "ignored",
            },
            "count": 7.0,
            "ratio": 0.5,
            "flag": True,
            "color": "blue",
            "when": "2030-01-02T03:04:05+00:00",
            "scores": {"a": 1.0, "b": 2.0},
            "nothing": None,
            "a": {"b": {"c": 4.0}},
        }
    )
    sample = custom.get("my_custom_type", SampleStruct)
    assert sample == SampleStruct(count=3, name="x", inner=Inner("in", 1.0), tags=["a", "b"], note=None)
    assert isinstance(sample.count, int)
    assert custom.get("count", int) == 7 and isinstance(custom.get("count", int), int)
    assert custom.get("ratio", float) == 0.5
    assert custom.get("count", float) == 7.0
    assert custom.get("flag", bool) is True
    assert custom.get("color", Color) is Color.BLUE
    assert custom.get("when", dt.datetime) == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert custom.get("scores", dict[str, int]) == {"a": 1, "b": 2}
    assert custom.get("my_custom_type.tags", list[str]) == ["a", "b"]  # dotted path
    assert custom.get("a.b.c", int) == 4
    assert custom.get("count", int | None) == 7
    assert custom.get("count") == 7.0  # untyped: the raw JSON value
    # Missing or null → default.
    assert custom.get("missing", int) is None
    assert custom.get("missing", int, 5) == 5
    assert custom.get("nothing", str, default="d") == "d"
    assert custom.get("missing") is None
    # Mapping behaviour.
    assert custom["count"] == 7.0 and "flag" in custom and len(custom) == 9
    assert CustomData({"a": 1}) == {"a": 1}
    assert custom.to_dict()["a"] == {"b": {"c": 4.0}}


@pytest.mark.parametrize(
    ("key", "type_", "error", "match"),
    [
        ("ratio", int, ValueError, r"custom\.ratio: expected an integral number"),
        ("name", int, TypeError, r"custom\.name: expected int, got str"),
        ("flag", int, TypeError, "expected int, got bool"),
        ("count", str, TypeError, "expected str"),
        ("count", bool, TypeError, "expected bool"),
        ("color", Color, ValueError, "not a valid Color"),
        ("bad", SampleStruct, TypeError, r"custom\.bad\.inner: expected an object for Inner"),
        ("partial", SampleStruct, TypeError, "missing field 'name'"),
        ("name", list[str], TypeError, "expected a list"),
        ("when", dt.datetime, ValueError, "not an ISO 8601 datetime"),
    ],
)
def test_custom_typed_get_mismatch(key: str, type_: Any, error: type[Exception], match: str) -> None:
    custom = CustomData(
        {
            "ratio": 1.5,
            "name": "x",
            "flag": True,
            "count": 2.0,
            "color": "green",
            "bad": {"count": 1.0, "name": "n", "inner": "nope"},
            "partial": {"count": 1.0, "inner": {"label": "l"}},
            "when": "yesterday",
        }
    )
    with pytest.raises(error, match=match):
        custom.get(key, type_)


def test_custom_get_rejects_default_in_type_position() -> None:
    with pytest.raises(TypeError, match="default="):
        CustomData({"a": 1.0}).get("a", 5)


def test_from_plain_misc() -> None:
    assert from_plain([1.0, "a"], tuple[int, str]) == (1, "a")
    assert from_plain({"x": {"label": "l"}}, dict[str, Inner]) == {"x": Inner("l")}
    assert from_plain(None, int | None) is None
    assert isinstance(from_plain({"k": 1.0}, CustomData), CustomData)
    # A null for a field with a default keeps the default.
    assert from_plain({"label": "l", "weight": None}, Inner) == Inner("l", 1.0)


def _status_error(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


def test_error_unpacks_status_details() -> None:
    err = _status_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request",
        [
            error_details_pb2.ErrorInfo(reason="INVALID_FILTER", domain="callplane", metadata={"field": "f"}),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="filter_conditions.custom.color.$gt", description="unknown operator"
                    )
                ]
            ),
        ],
    )
    error = CallplaneError.from_rpc_error(err)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid request"
    assert (error.reason, error.domain, error.metadata) == ("INVALID_FILTER", "callplane", {"field": "f"})
    assert error.field_violations == [("filter_conditions.custom.color.$gt", "unknown operator")]
    assert error.fields == ["filter_conditions.custom.color.$gt"]
    assert not error.retryable
    assert error.status is not None and error.status.code == code_pb2.INVALID_ARGUMENT
    assert "INVALID_ARGUMENT" in str(error) and "INVALID_FILTER" in str(error)


def test_error_without_details() -> None:
    err = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
    error = CallplaneError.from_rpc_error(err)
    assert (error.code, error.message, error.reason, error.field_violations) == (
        grpc.StatusCode.UNAVAILABLE,
        "down",
        "",
        [],
    )
    assert error.retryable and error.status is None


class _FakeUsers(user_pb2_grpc.UserServiceServicer):
    """Echoes upserts and records metadata; QueryUsers fails like the real server; DeleteUsers stalls."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def UpsertUsers(self, request: Any, context: Any) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        return user_pb2.UpsertUsersResponse(
            users=[user_pb2.User(id=u.id, name=u.name, custom=u.custom) for u in request.users]
        )

    async def QueryUsers(self, request: Any, context: Any) -> Any:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason="UNKNOWN_FIELD", domain="callplane"))
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="filter_conditions.nope", description="no"
                    )
                ]
            )
        )
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad filter", details=[info, bad])
        await context.abort_with_status(rpc_status.to_status(status))

    async def DeleteUsers(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(5)
        return user_pb2.DeleteUsersResponse()


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, _FakeUsers]]:
    server = grpc.aio.server()
    servicer = _FakeUsers()
    user_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def test_client_plumbing_against_fake_server(fake_server: tuple[str, _FakeUsers]) -> None:
    target, servicer = fake_server

    async def token() -> str:
        return "jwt-123"

    async with CallplaneClient(target, token=token, metadata={"X-Tenant": "t1"}) as client:
        users = await client.upsert_users([{"id": "alice", "name": "Alice", "custom": Inner("a")}])
        assert users[0].id == "alice" and users[0].custom.get("label", str) == "a"
        assert users[0].custom == {"label": "a", "weight": 1.0}
        assert users[0].proto.name == "Alice"
        assert servicer.metadata[-1]["authorization"] == "Bearer jwt-123"
        assert servicer.metadata[-1]["x-tenant"] == "t1"

        with pytest.raises(CallplaneError) as caught:
            await client.query_users(filter_conditions={"nope": 1})
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == "UNKNOWN_FIELD"
        assert caught.value.field_violations == [("filter_conditions.nope", "no")]

        fast = client.with_options(timeout=0.2, token="other")
        with pytest.raises(CallplaneError) as caught:
            await fast.delete_users(["alice"])
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await fast.close()  # shares the channel: must not close it
        await fast.upsert_user({"id": "bob"})
        assert servicer.metadata[-1]["authorization"] == "Bearer other"

    # A sync token provider works too; no token → no authorization header.
    async with CallplaneClient(target, token=lambda: "sync-tok") as client:
        await client.upsert_user({"id": "carol"})
    assert servicer.metadata[-1]["authorization"] == "Bearer sync-tok"
    async with CallplaneClient(target) as client:
        await client.upsert_user({"id": "dave"})
    assert "authorization" not in servicer.metadata[-1]


async def test_unreachable_server_is_unavailable() -> None:
    async with CallplaneClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(CallplaneError) as caught:
            await client.upsert_user({"id": "x"})
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_call_handle_before_any_rpc() -> None:
    client = CallplaneClient("127.0.0.1:1", channel=grpc.aio.insecure_channel("127.0.0.1:1"))
    call = client.call("default", "abc")
    assert call.cid == "default:abc" and call.etag is None and call.data is None
    assert call.custom == {} and call.custom.get("x", int, 3) == 3


# --------------------------------------------------------------------------------------------------
# Part 2: end to end against the real server (`grpc_target` comes from conftest.py)
# --------------------------------------------------------------------------------------------------


def _uid(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


@pytest.fixture
async def client(grpc_target: str) -> AsyncIterator[CallplaneClient]:
    async with CallplaneClient(grpc_target, token=SERVER_TOKEN) as c:
        yield c


async def _users(client: CallplaneClient, count: int) -> list[str]:
    ids = [_uid(f"u{i}-") for i in range(count)]
    await client.upsert_users([{"id": uid, "name": f"User {uid}"} for uid in ids])
    return ids


async def test_e2e_users(client: CallplaneClient) -> None:
    tag = _uid()
    ids = [f"{tag}-a", f"{tag}-b", f"{tag}-c"]
    stored = await client.upsert_users(
        [
            {"id": ids[0], "name": "A", "image": "http://img/a", "custom": {"tag": tag, "n": 1}},
            {"id": ids[1], "name": "B", "teams": ["red"], "custom": {"tag": tag, "n": 2}},
            {"id": ids[2], "name": "C", "custom": {"tag": tag, "n": 3, "inner": Inner("x")}},
        ]
    )
    assert [u.id for u in stored] == ids
    assert stored[1].teams == ["red"] and stored[0].created_at is not None
    assert stored[2].custom.get("inner", Inner) == Inner("x", 1.0)
    assert stored[0].custom.get("n", int) == 1

    updated = await client.update_users_partial(
        [{"id": ids[0], "set": {"custom.color": "red", "name": "A2"}, "unset": ["image"]}]
    )
    assert updated[0].name == "A2" and updated[0].image == "" and updated[0].custom.get("color") == "red"
    assert updated[0].custom.get("tag") == tag

    page = await client.query_users(
        filter_conditions={"custom.tag": tag}, sort=[{"field": "custom.n", "direction": -1, "type": "number"}]
    )
    assert [u.id for u in page] == [ids[2], ids[1], ids[0]]
    first = await client.query_users(filter_conditions={"custom.tag": tag}, sort=[{"field": "id"}], limit=2)
    assert [u.id for u in first] == ids[:2] and first.next
    second = await client.query_users(
        filter_conditions={"custom.tag": tag}, sort=[{"field": "id"}], limit=2, next=first.next
    )
    assert [u.id for u in second] == ids[2:] and not second.next

    assert sorted(await client.delete_users(ids)) == sorted(ids)
    assert len(await client.query_users(filter_conditions={"custom.tag": tag})) == 0
    with pytest.raises(CallplaneError) as caught:
        await client.delete_users([ids[0]])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_e2e_get_or_create_update_and_etag(client: CallplaneClient) -> None:
    alice, bob = await _users(client, 2)
    starts = dt.datetime(2031, 1, 1, 12, 0, tzinfo=dt.UTC)
    call = client.call("default", _uid("c-"))
    resp = await call.get_or_create(
        created_by_id=alice,
        members=[{"user_id": alice, "role": "host"}, bob],
        custom={"color": "red", "my_custom_type": SampleStruct(2, "s", Inner("i"))},
        settings_override={"audio": {"mic_default_on": False}},
        starts_at=starts,
        team="blue",
    )
    assert isinstance(resp, CallState) and resp.created
    assert resp.call.cid == call.cid and call.data is resp.call and call.etag == resp.call.etag
    assert resp.call.created_by_user_id == alice and resp.call.team == "blue"
    assert resp.call.starts_at == starts and resp.call.member_count == 2
    assert resp.call.settings_override == {"audio": {"mic_default_on": False}}
    assert resp.call.settings["audio"]["mic_default_on"] is False
    assert {m.user_id: m.role for m in call.members} == {alice: "host", bob: "user"}
    assert call.custom.get("my_custom_type", SampleStruct) == SampleStruct(2, "s", Inner("i"))
    assert call.custom.get("color", str) == "red"

    again = await call.get_or_create(custom={"color": "green"})
    assert not again.created and again.call.custom.get("color") == "red"

    etag = call.etag
    assert etag
    upd = await call.update(
        set_custom={"my_custom_type.count": 5, "size": 3}, unset_custom=["color"], etag=etag
    )
    assert call.etag != etag and upd.call.etag == call.etag
    assert call.custom.get("my_custom_type.count", int) == 5 and "color" not in call.custom
    assert call.custom.get("size", int) == 3

    with pytest.raises(CallplaneError) as caught:
        await call.update(custom={"x": 1}, etag=etag)  # stale etag
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert call.custom.get("size", int) == 3  # state unchanged after a failed update

    replaced = await call.update(custom={"only": True}, etag=call.etag)
    assert replaced.call.custom == {"only": True}
    got = await call.get(members_limit=1)
    assert got.call.custom == {"only": True} and len(got.members) == 1 and got.call.member_count == 2

    ended = await call.end()
    assert ended.ended_at is not None and call.data is ended and ended.ended
    with pytest.raises(CallplaneError) as caught:
        await call.end()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION

    deleted = await call.delete()
    assert deleted.cid == call.cid
    with pytest.raises(CallplaneError) as caught:
        await call.get()
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_e2e_members(client: CallplaneClient) -> None:
    ids = sorted(await _users(client, 5))
    call = client.call("default", _uid("m-"))
    await call.get_or_create(created_by_id=ids[0], members=[ids[0]])

    result = await call.update_members(
        update_members=[
            {"user_id": uid, "role": "moderator", "custom": {"rank": i}} for i, uid in enumerate(ids)
        ]
    )
    assert [m.user_id for m in result.members] == ids
    assert result.members[3].custom.get("rank", int) == 3 and result.members[3].role == "moderator"

    removed = await call.update_members(remove_members=[ids[4], "not-a-member"])
    assert removed.removed_user_ids == [ids[4]]

    seen: list[str] = []
    page: QueryPage[Any] = await call.query_members(sort=[{"field": "user_id", "direction": 1}], limit=2)
    pages = [page]
    while page.next:
        page = await call.query_members(sort=[{"field": "user_id", "direction": 1}], limit=2, next=page.next)
        pages.append(page)
    for p in pages:
        seen.extend(m.user_id for m in p)
    assert seen == ids[:4] and [len(p) for p in pages] == [2, 2]
    back = await call.query_members(sort=[{"field": "user_id", "direction": 1}], limit=2, prev=pages[1].prev)
    assert [m.user_id for m in back] == ids[:2]

    filtered = await call.query_members(filter_conditions={"custom.rank": {"$gte": 2}})
    assert sorted(m.user_id for m in filtered) == ids[2:4]

    with pytest.raises(CallplaneError) as caught:
        await call.update_members(update_members=["ghost-1", "ghost-2"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    named = " ".join(f"{f} {d}" for f, d in caught.value.field_violations) + caught.value.message
    assert "ghost-1" in named or "update_members[0]" in named


async def test_e2e_query_calls_pagination(client: CallplaneClient) -> None:
    batch = _uid("b-")
    (owner,) = await _users(client, 1)
    cids = []
    for i in range(5):
        call = client.call("default", f"{batch}-{i}")
        await call.get_or_create(created_by_id=owner, members=[owner], custom={"batch": batch, "i": i})
        cids.append(call.cid)

    sort = [{"field": "cid", "direction": 1}]
    first = await client.query_calls(filter_conditions={"custom.batch": batch}, sort=sort, limit=2)
    assert [c.call.cid for c in first] == cids[:2] and first.next and not first.prev
    assert all(len(c.members) == 1 for c in first)
    second = await client.query_calls(
        filter_conditions={"custom.batch": batch}, sort=sort, limit=2, next=first.next
    )
    third = await client.query_calls(
        filter_conditions={"custom.batch": batch}, sort=sort, limit=2, next=second.next
    )
    assert [c.call.cid for c in second] == cids[2:4]
    assert [c.call.cid for c in third] == cids[4:] and not third.next
    back = await client.query_calls(
        filter_conditions={"custom.batch": batch}, sort=sort, limit=2, prev=second.prev
    )
    assert [c.call.cid for c in back] == cids[:2]

    desc = await client.query_calls(
        filter_conditions={"custom.batch": batch, "custom.i": {"$gte": 3}},
        sort=[{"field": "custom.i", "direction": -1, "type": "number"}],
    )
    assert [c.call.custom.get("i", int) for c in desc] == [4, 3]


async def test_e2e_errors(client: CallplaneClient) -> None:
    with pytest.raises(CallplaneError) as caught:
        await client.query_calls(filter_conditions={"custom.color": {"$bogus": 1}})
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.domain == "callplane" and err.reason
    assert err.field_violations and "$bogus" in err.field_violations[0][0]
    assert err.field_violations[0][0].startswith("filter_conditions")

    with pytest.raises(CallplaneError) as caught:
        await client.call("default", _uid("nope-")).get()
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.domain == "callplane"

    with pytest.raises(CallplaneError) as caught:
        await client.call("default", "bad id!").get_or_create()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.field_violations


async def test_e2e_call_types(client: CallplaneClient) -> None:
    name = _uid("t-")
    created = await client.create_call_type(
        name,
        settings={"video": {"camera_default_on": False}},
        grants={"user": ["join-call", "send-audio"], "host": ["join-call", "end-call"]},
    )
    assert created.name == name and created.settings["video"]["camera_default_on"] is False
    assert "enabled" in created.settings["audio"]  # full settings come back
    assert sorted(created.grants["user"]) == ["join-call", "send-audio"]

    with pytest.raises(CallplaneError) as caught:
        await client.create_call_type(name)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS

    updated = await client.update_call_type(
        name, settings={"audio": {"mic_default_on": True}}, grants={"user": ["join-call"]}
    )
    assert updated.settings["audio"]["mic_default_on"] is True
    assert updated.settings["video"]["camera_default_on"] is False  # merged, not replaced
    assert updated.grants["user"] == ["join-call"] and "host" in updated.grants

    assert (await client.get_call_type(name)).grants == updated.grants
    names = [t.name for t in await client.list_call_types()]
    assert name in names and "default" in names and names == sorted(names)

    await client.delete_call_type(name)
    with pytest.raises(CallplaneError) as caught:
        await client.get_call_type(name)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
