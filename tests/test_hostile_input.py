"""Hostile input: NaN / ±Infinity and too deep custom data in every Struct, out-of-range Timestamps,
undecodable request bytes, and the message of a multi-field validation error. Each is INVALID_ARGUMENT
naming the field (never UNKNOWN or INTERNAL), and a rejected write changes nothing."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    call_type_pb2,
    event_service_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
)
from callplane_server.domain.validation import MAX_CUSTOM_DEPTH
from tests.errors import decode, expect_error
from tests.support import channel, snapshot, struct, user_token

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NAN, INF = math.nan, math.inf
STREAM_TIMEOUT = 15.0
# Timestamp's valid range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z).
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def nested(levels: int, leaf: Any = 1) -> dict[str, Any]:
    """An object `levels` objects deep: {"k": {"k": … {"leaf": leaf}}}."""
    document: dict[str, Any] = {"leaf": leaf}
    for _ in range(levels - 1):
        document = {"k": document}
    return document


def deep_path(prefix: str, levels: int) -> str:
    """The path of the innermost object of nested(levels) under `prefix`."""
    return prefix + ".k" * (levels - 1)


class World:
    """A user, a call with that user as member and a running session with one participant."""

    def __init__(self, user_id: str, call_id: str, participant_session_id: str) -> None:
        self.user_id = user_id
        self.call_id = call_id
        self.participant_session_id = participant_session_id

    @property
    def key(self) -> dict[str, str]:
        return {"type": "default", "id": self.call_id}


async def make_world(users, calls, sessions, unique: Callable[[str], str]) -> World:
    user_id, call_id, psid = unique("u"), unique("c"), unique("p")
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id, custom=struct({"a": 1}))])
    )
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                custom=struct({"score": 1}),
                members=[call_pb2.MemberRequest(user_id=user_id, role="host", custom=struct({"m": 1}))],
            ),
        )
    )
    await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default", id=call_id, user_id=user_id, participant_session_id=psid, custom=struct({"p": 1})
        )
    )
    return World(user_id, call_id, psid)


async def state(
    users, events, world: World
) -> tuple[event_service_pb2.CallSnapshot, user_pb2.QueryUsersResponse]:
    """Everything a rejected write could have changed: the call with its seq, members, session,
    participants and custom data, and the user."""
    found = await snapshot(events, world.call_id)
    for participant in found.session.participants:
        participant.ClearField("duration_seconds")  # grows with the clock
    user = await users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct({"id": world.user_id})))
    return found, user


# --- NaN / ±Infinity in Structs -------------------------------------------------------------------

# (RPC name, request builder given the world and the poisoned Struct, the violation path). The poison
# sits at custom data key "x" (filters: operand of custom.x.$gt).
Case = tuple[str, Callable[[World, struct_pb2.Struct], Any], str]


def _poison(value: float) -> dict[str, struct_pb2.Struct]:
    return {
        "data": struct({"x": value}),
        "set": struct({"custom.x": value}),
        "list": struct({"x": [1, {"y": value}]}),
        "filter": struct({"custom.x": {"$gt": value}}),
        "or": struct({"$or": [{"id": "a"}, {"custom.x": value}]}),
    }


WRITES: list[tuple[str, str, Callable[[World, dict[str, struct_pb2.Struct]], Any], str]] = [
    (
        "calls",
        "GetOrCreateCall",
        lambda w, p: call_service_pb2.GetOrCreateCallRequest(
            type="default", id=w.call_id + "n", data=call_service_pb2.CallData(custom=p["data"])
        ),
        "data.custom.x",
    ),
    (
        "calls",
        "GetOrCreateCall",
        lambda w, p: call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=w.call_id + "m",
            data=call_service_pb2.CallData(
                members=[call_pb2.MemberRequest(user_id=w.user_id, custom=p["list"])]
            ),
        ),
        "data.members[0].custom.x[1].y",
    ),
    (
        "calls",
        "UpdateCall",
        lambda w, p: call_service_pb2.UpdateCallRequest(**w.key, custom=p["data"]),
        "custom.x",
    ),
    (
        "calls",
        "UpdateCall",
        lambda w, p: call_service_pb2.UpdateCallRequest(**w.key, set_custom=p["list"]),
        "set_custom.x[1].y",
    ),
    (
        "calls",
        "UpdateCallMembers",
        lambda w, p: call_service_pb2.UpdateCallMembersRequest(
            **w.key, update_members=[call_pb2.MemberRequest(user_id=w.user_id, custom=p["data"])]
        ),
        "update_members[0].custom.x",
    ),
    (
        "users",
        "UpsertUsers",
        lambda w, p: user_pb2.UpsertUsersRequest(
            users=[user_pb2.UserRequest(id=w.user_id, custom=p["data"])]
        ),
        "users[0].custom.x",
    ),
    (
        "users",
        "UpdateUsersPartial",
        lambda w, p: user_pb2.UpdateUsersPartialRequest(
            users=[user_pb2.UserPartialUpdate(id=w.user_id, set=p["set"])]
        ),
        "users[0].set.custom.x",
    ),
    (
        "sessions",
        "JoinCall",
        lambda w, p: session_service_pb2.JoinCallRequest(
            **w.key,
            user_id=w.user_id,
            participant_session_id=w.participant_session_id + "j",
            custom=p["data"],
        ),
        "custom.x",
    ),
    (
        "sessions",
        "JoinCall",
        lambda w, p: session_service_pb2.JoinCallRequest(
            type="default",
            id=w.call_id + "j",
            user_id=w.user_id,
            participant_session_id=w.participant_session_id + "k",
            create=True,
            data=call_service_pb2.CallData(custom=p["list"]),
        ),
        "data.custom.x[1].y",
    ),
    (
        "data",
        "UpdateParticipantCustom",
        lambda w, p: call_data_service_pb2.UpdateParticipantCustomRequest(
            **w.key, participant_session_id=w.participant_session_id, user_id=w.user_id, custom=p["data"]
        ),
        "custom.x",
    ),
    (
        "data",
        "UpdateSessionCustom",
        lambda w, p: call_data_service_pb2.UpdateSessionCustomRequest(
            **w.key, user_id=w.user_id, custom=p["list"]
        ),
        "custom.x[1].y",
    ),
    (
        "data",
        "SendCallEvent",
        lambda w, p: call_data_service_pb2.SendCallEventRequest(**w.key, user_id=w.user_id, custom=p["data"]),
        "custom.x",
    ),
]

QUERIES: list[tuple[str, str, Callable[[World, dict[str, struct_pb2.Struct]], Any], str]] = [
    (
        "calls",
        "QueryCalls",
        lambda w, p: call_service_pb2.QueryCallsRequest(filter_conditions=p["filter"]),
        "filter_conditions.custom.x.$gt",
    ),
    (
        "calls",
        "QueryMembers",
        lambda w, p: call_service_pb2.QueryMembersRequest(**w.key, filter_conditions=p["or"]),
        "filter_conditions.$or[1].custom.x",
    ),
    (
        "users",
        "QueryUsers",
        lambda w, p: user_pb2.QueryUsersRequest(filter_conditions=p["filter"]),
        "filter_conditions.custom.x.$gt",
    ),
    (
        "sessions",
        "QueryCallParticipants",
        lambda w, p: session_service_pb2.QueryCallParticipantsRequest(**w.key, filter_conditions=p["filter"]),
        "filter_conditions.custom.x.$gt",
    ),
    (
        "sessions",
        "QueryCallSessions",
        lambda w, p: session_service_pb2.QueryCallSessionsRequest(**w.key, filter_conditions=p["or"]),
        "filter_conditions.$or[1].custom.x",
    ),
]


def _stub(name: str, calls, users, sessions, data) -> Any:
    return {"calls": calls, "users": users, "sessions": sessions, "data": data}[name]


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
async def test_non_finite_numbers_in_writes_are_invalid_and_change_nothing(
    value, calls, users, sessions, data, events, unique
):
    world = await make_world(users, calls, sessions, unique)
    before = await state(users, events, world)
    for stub_name, rpc, build, path in WRITES:
        stub = getattr(_stub(stub_name, calls, users, sessions, data), rpc)
        details = await expect_error(stub(build(world, _poison(value))), INVALID, fields=[path])
        assert details.fields == [path], (rpc, details.fields)
        assert "finite" in details.message, (rpc, details.message)
    assert await state(users, events, world) == before
    for created in (world.call_id + "n", world.call_id + "m", world.call_id + "j"):
        await expect_error(
            calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=created)),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.parametrize("value", [NAN, -INF], ids=["nan", "-inf"])
async def test_non_finite_filter_operands_are_invalid(value, calls, users, sessions, data, unique):
    world = await make_world(users, calls, sessions, unique)
    for stub_name, rpc, build, path in QUERIES:
        stub = getattr(_stub(stub_name, calls, users, sessions, data), rpc)
        details = await expect_error(stub(build(world, _poison(value))), INVALID, fields=[path])
        assert details.fields == [path], (rpc, details.fields)


async def test_finite_numbers_still_round_trip(calls, users, sessions, unique):
    world = await make_world(users, calls, sessions, unique)
    document = {
        "int": 3,
        "neg": -2.5,
        "big": 1e308,
        "tiny": 5e-324,
        "list": [1, None, True, "s", {}],
        "o": {},
    }
    updated = await calls.UpdateCall(call_service_pb2.UpdateCallRequest(**world.key, custom=struct(document)))
    assert plain(updated.call.custom) == document


# --- nesting depth ----------------------------------------------------------------------------------


async def test_custom_data_deeper_than_the_cap_is_invalid_naming_the_field(
    calls, users, sessions, data, events, unique
):
    world = await make_world(users, calls, sessions, unique)
    before = await state(users, events, world)
    too_deep = MAX_CUSTOM_DEPTH + 1
    message = f"at most {MAX_CUSTOM_DEPTH} levels"
    cases = [
        (
            calls.UpdateCall(
                call_service_pb2.UpdateCallRequest(**world.key, custom=struct(nested(too_deep)))
            ),
            deep_path("custom", too_deep),
        ),
        (
            users.UpsertUsers(
                user_pb2.UpsertUsersRequest(
                    users=[user_pb2.UserRequest(id=world.user_id, custom=struct(nested(too_deep)))]
                )
            ),
            deep_path("users[0].custom", too_deep),
        ),
        (
            # Lists count as levels too: {"l": [[[…[1]…]]]}.
            data.SendCallEvent(
                call_data_service_pb2.SendCallEventRequest(
                    **world.key, user_id=world.user_id, custom=struct({"l": _nested_list(too_deep - 1)})
                )
            ),
            "custom.l" + "[0]" * (too_deep - 2),
        ),
        (
            calls.QueryCalls(
                call_service_pb2.QueryCallsRequest(filter_conditions=struct({"$and": [nested(too_deep - 2)]}))
            ),
            deep_path("filter_conditions.$and[0]", too_deep - 2),
        ),
    ]
    for call, path in cases:
        details = await expect_error(call, INVALID, fields=[path])
        assert message in details.message, details.message
    assert await state(users, events, world) == before


def _nested_list(levels: int) -> list[Any]:
    document: list[Any] = [1]
    for _ in range(levels - 1):
        document = [document]
    return document


async def test_custom_data_at_the_cap_is_stored_and_readable(calls, users, sessions, events, unique):
    world = await make_world(users, calls, sessions, unique)
    document = nested(MAX_CUSTOM_DEPTH)
    await calls.UpdateCall(call_service_pb2.UpdateCallRequest(**world.key, custom=struct(document)))
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=world.user_id, custom=struct(document))])
    )
    # The deepest places the data comes back: a snapshot's member's user, and the call.
    found = await snapshot(events, world.call_id)
    assert plain(found.call.custom) == document
    assert plain(found.members[0].user.custom) == document


async def test_dotted_set_paths_cannot_push_custom_data_past_the_cap(calls, users, sessions, events, unique):
    """A value at the cap set under a dotted path would nest deeper than the cap once applied."""
    world = await make_world(users, calls, sessions, unique)
    before = await state(users, events, world)
    value = nested(MAX_CUSTOM_DEPTH - 2)
    await expect_error(
        users.UpdateUsersPartial(
            user_pb2.UpdateUsersPartialRequest(
                users=[user_pb2.UserPartialUpdate(id=world.user_id, set=struct({"custom.a.b.c": value}))]
            )
        ),
        INVALID,
        fields=["users[0].custom"],
    )
    await expect_error(
        calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(**world.key, set_custom=struct({"a.b.c": value}))
        ),
        INVALID,
        fields=["set_custom"],
    )
    assert await state(users, events, world) == before


# --- timestamps -------------------------------------------------------------------------------------

BAD_TIMESTAMPS = [
    timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000),
    timestamp_pb2.Timestamp(seconds=0, nanos=-1),
    timestamp_pb2.Timestamp(seconds=MIN_SECONDS - 1),
    timestamp_pb2.Timestamp(seconds=MAX_SECONDS + 1),
    timestamp_pb2.Timestamp(seconds=-(2**63)),
    timestamp_pb2.Timestamp(seconds=2**63 - 1, nanos=2**31 - 1),
]


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS, ids=lambda t: f"{t.seconds}s{t.nanos}ns")
async def test_out_of_range_timestamps_are_invalid(stamp, calls, users, sessions, events, unique):
    world = await make_world(users, calls, sessions, unique)
    before = await state(users, events, world)
    await expect_error(
        calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type="default", id=world.call_id + "t", data=call_service_pb2.CallData(starts_at=stamp)
            )
        ),
        INVALID,
        fields=["data.starts_at"],
    )
    await expect_error(
        calls.UpdateCall(call_service_pb2.UpdateCallRequest(**world.key, starts_at=stamp)),
        INVALID,
        fields=["starts_at"],
    )
    await expect_error(
        sessions.JoinCall(
            session_service_pb2.JoinCallRequest(
                type="default",
                id=world.call_id + "t",
                user_id=world.user_id,
                participant_session_id=world.participant_session_id + "t",
                create=True,
                data=call_service_pb2.CallData(starts_at=stamp),
            )
        ),
        INVALID,
        fields=["data.starts_at"],
    )
    assert await state(users, events, world) == before
    await expect_error(
        calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=world.call_id + "t")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_the_edges_of_the_timestamp_range_are_valid_and_joinable(server, calls, users, unique):
    """Year 1 and year 9999 are valid starts_at; a backstage join ahead of a year-1 start does not
    overflow."""
    user_id = unique("u")
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id)]))
    override = call_type_pb2.CallSettings(
        backstage=call_type_pb2.BackstageSettings(enabled=True, join_ahead_time_seconds=3600)
    )
    async with channel(server.target, token=user_token(user_id)) as as_user:
        user_sessions = session_service_pb2_grpc.SessionServiceStub(as_user)
        for seconds, nanos in ((MIN_SECONDS, 0), (MAX_SECONDS, 999_999_999)):
            call_id = unique("c")
            created = await calls.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(
                    type="default",
                    id=call_id,
                    data=call_service_pb2.CallData(
                        starts_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
                        settings_override=override,
                        members=[call_pb2.MemberRequest(user_id=user_id)],
                    ),
                )
            )
            assert created.call.starts_at.seconds == seconds
            join = user_sessions.JoinCall(
                session_service_pb2.JoinCallRequest(
                    type="default", id=call_id, user_id=user_id, participant_session_id=unique("p")
                )
            )
            if seconds == MIN_SECONDS:
                await join  # long past its start: open
            else:
                await expect_error(join, grpc.StatusCode.FAILED_PRECONDITION, reason="CALL_IN_BACKSTAGE")


# --- undecodable requests -----------------------------------------------------------------------------


def _invalid_utf8_get_call() -> bytes:
    # GetCallRequest.type (field 1, length-delimited) holding the bytes ff fe.
    return bytes([0x0A, 2, 0xFF, 0xFE]) + call_service_pb2.GetCallRequest(id="x").SerializeToString()


UNDECODABLE = {
    "garbage": b"\xff\xff\xff\xff\xff",
    "truncated": call_service_pb2.GetCallRequest(type="default", id="x" * 40).SerializeToString()[:-5],
    "invalid-utf8": _invalid_utf8_get_call(),
}


async def _raw_error(target: str, method: str, payload: bytes, *, stream: bool, token: bool = True):
    async with channel(target) if token else grpc.aio.insecure_channel(target) as raw:
        if stream:
            call = raw.unary_stream(method, request_serializer=None, response_deserializer=None)(payload)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(STREAM_TIMEOUT):
                    async for _ in call:
                        pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw.unary_unary(method, request_serializer=None, response_deserializer=None)(payload)
    return decode(caught.value)


def _check_malformed(details) -> None:
    assert details.code == INVALID, f"{details.code.name}: {details.message}"
    assert details.reason == "MALFORMED_REQUEST", details.reason
    assert details.info is not None and details.info.domain == "callplane"
    for internal in ("DecodeError", "Exception", "Traceback", "upb", "<class"):
        assert internal not in details.message, details.message
    assert "could not be decoded" in details.message, details.message


@pytest.mark.parametrize("kind", sorted(UNDECODABLE))
async def test_undecodable_unary_and_stream_requests_are_invalid_argument(server, kind, caplog):
    caplog.set_level(logging.INFO, logger="callplane.rpc")
    payload = UNDECODABLE[kind]
    _check_malformed(
        await _raw_error(server.target, "/callplane.v1.CallService/GetCall", payload, stream=False)
    )
    _check_malformed(
        await _raw_error(server.target, "/callplane.v1.EventService/WatchCall", payload, stream=True)
    )
    logged = [r.getMessage() for r in caplog.records if r.name == "callplane.rpc"]
    assert any(
        line.startswith("rpc /callplane.v1.CallService/GetCall INVALID_ARGUMENT") for line in logged
    ), logged
    assert any(
        line.startswith("rpc /callplane.v1.EventService/WatchCall INVALID_ARGUMENT") for line in logged
    ), logged


async def test_undecodable_reflection_request_is_invalid_argument(server):
    """Reflection is the one client-and-server streaming RPC: garbage in its request stream too."""
    async with channel(server.target) as raw:
        call = raw.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )(iter([UNDECODABLE["garbage"]]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(STREAM_TIMEOUT):
                async for _ in call:
                    pass
    _check_malformed(decode(caught.value))


async def test_struct_nested_past_the_decoder_limit_is_malformed_and_changes_nothing(
    server, calls, users, sessions, events, unique
):
    world = await make_world(users, calls, sessions, unique)
    before = await state(users, events, world)
    request = call_service_pb2.UpdateCallRequest(**world.key)
    request.custom.update(nested(60))  # in place: copying it would hit the decode limit already
    details = await _raw_error(
        server.target, "/callplane.v1.CallService/UpdateCall", request.SerializeToString(), stream=False
    )
    _check_malformed(details)
    assert await state(users, events, world) == before


async def test_undecodable_request_without_a_token_is_unauthenticated(server):
    details = await _raw_error(
        server.target, "/callplane.v1.CallService/GetCall", UNDECODABLE["garbage"], stream=False, token=False
    )
    assert details.code == grpc.StatusCode.UNAUTHENTICATED, details.message


# --- messages of multi-field validation errors ----------------------------------------------------------


async def test_an_invalid_call_key_says_which_fields_and_why(calls):
    details = await expect_error(
        calls.GetCall(call_service_pb2.GetCallRequest(type="Bad Type!", id="")),
        INVALID,
        fields=["type", "id"],
    )
    assert details.message.startswith("invalid request: "), details.message
    assert "type: 'Bad Type!' is not a valid call type" in details.message, details.message
    assert "id: is required" in details.message, details.message
