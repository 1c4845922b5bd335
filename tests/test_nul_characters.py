"""NUL characters (U+0000) in any string of a request, custom data included, are refused as
INVALID_ARGUMENT naming the field, on both backends (PostgreSQL can store NUL in neither text nor jsonb,
and answered INTERNAL; found by tests/fuzz), and the refused request changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from tests.support import RunningServer, struct

Unique = Callable[[str], str]


def _violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def _refused(call: object, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in _violations(caught.value), (caught.value.details(), _violations(caught.value))
    assert "NUL" in (caught.value.details() or "")


async def test_nul_in_a_name_is_invalid_argument(server: RunningServer) -> None:
    call_types = call_type_service_pb2_grpc.CallTypeServiceStub(server.channel)
    await _refused(call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name="a\x00b")), "name")
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    await _refused(calls.GetCall(call_service_pb2.GetCallRequest(type="default", id="\x00")), "id")


async def test_nul_in_custom_data_changes_nothing(server: RunningServer, unique: Unique) -> None:
    users = user_pb2_grpc.UserServiceStub(server.channel)
    user_id = unique("nul")
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id)]))
    for custom, field in (
        ({"note": "a\x00b"}, "users[1].custom.note"),
        ({"a\x00b": 1}, "users[1].custom.a\\u0000b"),
        ({"list": [1, {"deep": "\x00"}]}, "users[1].custom.list[1].deep"),
    ):
        request = user_pb2.UpsertUsersRequest(
            users=[
                user_pb2.UserRequest(id=user_id, name="changed"),
                user_pb2.UserRequest(id=unique("nul"), custom=struct(custom)),
            ]
        )
        await _refused(users.UpsertUsers(request), field)
    page = await users.QueryUsers(user_pb2.QueryUsersRequest(filter_conditions=struct({"id": user_id})))
    assert [u.name for u in page.users] == [""]


async def test_nul_in_filters_and_members(server: RunningServer, unique: Unique) -> None:
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    await _refused(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(filter_conditions=struct({"custom.x": "\x00"}))),
        "filter_conditions.custom.x",
    )
    request = call_service_pb2.GetOrCreateCallRequest(
        type="default",
        id=unique("nul"),
        data=call_service_pb2.CallData(members=[call_pb2.MemberRequest(user_id="x\x00")]),
    )
    await _refused(calls.GetOrCreateCall(request), "data.members[0].user_id")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=request.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_nul_in_a_stream_request_is_invalid_argument(server: RunningServer) -> None:
    events = event_service_pb2_grpc.EventServiceStub(server.channel)
    stream = events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest(call_cids=["default:\x00"]))
    await _refused(stream.read(), "call_cids[0]")
    stream.cancel()


def test_every_string_is_walked() -> None:
    """The check walks nested messages, repeated fields, maps and Structs (a unit test of the walk)."""
    from callplane_server.api.request_checks import nul_violations

    message: Message = call_service_pb2.UpdateCallMembersRequest(
        type="default",
        update_members=[call_pb2.MemberRequest(user_id="ok", custom=struct({"k": ["\x00"]}))],
        remove_members=["fine", "b\x00d"],
    )
    assert [v.field for v in nul_violations(message)] == [
        "update_members[0].custom.k[0]",
        "remove_members[1]",
    ]
