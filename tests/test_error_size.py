"""An error always reaches the client as a readable google.rpc.Status, however large the values it names:
messages and details echo request values cut to a bounded size. Before, an error naming a huge value
(a 100 KB id, an unknown filter field of 100 KB) built a trailer past gRPC's 16 KB metadata limit, and the
client got RESOURCE_EXHAUSTED "Stream removed" instead of the error (found by tests/fuzz)."""

from __future__ import annotations

import grpc
import pytest

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from tests.errors import DOMAIN, decode
from tests.support import RunningServer, struct

HUGE = ("é" * 40_000, "x" * 200_000, "😀" * 30_000)

# Well under gRPC's default soft limit of 8 KB for all metadata of a reply.
TRAILER_BUDGET = 6_000


async def _readable_error(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    error = caught.value
    assert "Stream removed" not in (error.details() or ""), error.details()[:200]
    details = decode(error)
    assert details.info is not None and details.info.domain == DOMAIN, (error.code(), error.details()[:200])
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    size = sum(len(key) + len(value) for key, value in (error.trailing_metadata() or ()))
    assert size < TRAILER_BUDGET, size


@pytest.mark.parametrize("huge", HUGE, ids=("accented", "ascii", "astral"))
async def test_errors_naming_huge_values_stay_readable(server: RunningServer, huge: str) -> None:
    calls = call_service_pb2_grpc.CallServiceStub(server.channel)
    users = user_pb2_grpc.UserServiceStub(server.channel)
    sessions = session_service_pb2_grpc.SessionServiceStub(server.channel)
    await _readable_error(calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=huge)))
    await _readable_error(calls.GetCall(call_service_pb2.GetCallRequest(type=huge, id="x")))
    await _readable_error(
        calls.QueryCalls(call_service_pb2.QueryCallsRequest(filter_conditions=struct({huge: 1})))
    )
    await _readable_error(users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[huge, huge + "2"])))
    await _readable_error(
        sessions.LeaveCall(
            session_service_pb2.LeaveCallRequest(type="default", id="x", participant_session_id=huge)
        )
    )
