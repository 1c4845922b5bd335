"""Fuzzes every RPC of every callplane.v1 service (found in the generated descriptors, so a new RPC is
fuzzed without a change here) with hostile messages built field by field, and with raw bytes, using a
server token and user tokens, on SQLite and PostgreSQL. For every request:

- the status is never UNKNOWN or INTERNAL (a client can't make the server fail), nor UNAVAILABLE (the
  database stays up), and every error carries callplane's ErrorInfo;
- a rejected request changes nothing: every table (the event log through the global event position) reads
  the same before and after it, straight from the in-process server's database;
- the server still answers SERVING to grpc.health.v1 after each RPC's batch of examples.

The default run is short (a few examples per RPC); `make fuzz` runs FUZZ_EXAMPLES (100,000) per backend.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import pkgutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

import callplane.v1
from callplane.v1 import call_pb2, call_service_pb2, session_service_pb2, user_pb2
from callplane_server.app import SERVICE_NAMES
from callplane_server.store.models import Base
from tests.errors import decode
from tests.fuzz import stats
from tests.fuzz.strategies import (
    World,
    messages,
    raw_requests,
)
from tests.support import RunningServer, channel, in_ci, struct, user_token


@dataclass(frozen=True)
class Rpc:
    path: str
    input: _descriptor.Descriptor
    server_streaming: bool

    def __str__(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def callplane_rpcs() -> Iterator[Rpc]:
    for module_info in pkgutil.iter_modules(callplane.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"callplane.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert not method.client_streaming, f"client streaming is not fuzzed yet: {method.full_name}"
                yield Rpc(f"/{service.full_name}/{method.name}", method.input_type, method.server_streaming)


RPCS = sorted(callplane_rpcs(), key=lambda rpc: rpc.path)
TESTS_PER_BACKEND = 2 * len(RPCS)

# FUZZ_EXAMPLES: examples per backend, spread over every RPC's two tests (structured and raw bytes).
_TOTAL = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)
EXAMPLES_PER_TEST = math.ceil(_TOTAL / TESTS_PER_BACKEND) if _TOTAL else 3
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    derandomize=in_ci(),
    database=None if in_ci() else settings.default.database,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
UNARY_TIMEOUT = 60.0  # seconds; a bound on a hang, not an assertion on speed
FIRST_MESSAGE_WAIT = 0.2  # streams: how long to wait for the first message before cancelling


def test_every_served_service_is_fuzzed() -> None:
    fuzzed = {rpc.path.split("/")[1] for rpc in RPCS}
    assert set(SERVICE_NAMES) <= fuzzed
    assert len(RPCS) >= 40


# -- the world: real users, calls, a participant and pagination cursors -----------------------------------


@dataclass
class Fuzzing:
    server: RunningServer
    world: World
    channels: dict[str, grpc.aio.Channel]

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Fuzzing({self.server.backend})"


MEMBER = "fz-alice"
STRANGER = "fz-mallory"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzzing(server: RunningServer) -> AsyncIterator[Fuzzing]:
    world = World()
    world.user_ids = [MEMBER, "fz-bob", STRANGER, *(f"fz-user-{i}" for i in range(4))]
    world.call_ids = ["fz-call-1", "fz-call-2", "fz-call-3"]
    users = server.channel.unary_unary(
        "/callplane.v1.UserService/UpsertUsers",
        request_serializer=user_pb2.UpsertUsersRequest.SerializeToString,
        response_deserializer=user_pb2.UpsertUsersResponse.FromString,
    )
    await users(
        user_pb2.UpsertUsersRequest(
            users=[
                user_pb2.UserRequest(id=u, name=u, custom=struct({"n": i}))
                for i, u in enumerate(world.user_ids)
            ]
        )
    )
    create = server.channel.unary_unary(
        "/callplane.v1.CallService/GetOrCreateCall",
        request_serializer=call_service_pb2.GetOrCreateCallRequest.SerializeToString,
        response_deserializer=call_service_pb2.GetOrCreateCallResponse.FromString,
    )
    members = [call_pb2.MemberRequest(user_id=u) for u in world.user_ids if u != STRANGER]
    for call_id in world.call_ids:
        await create(
            call_service_pb2.GetOrCreateCallRequest(
                type="default",
                id=call_id,
                data=call_service_pb2.CallData(
                    created_by_id=MEMBER, members=members, custom=struct({"n": 1})
                ),
            )
        )
    channels = {
        "server": server.channel,
        "member": channel(server.target, token=user_token(MEMBER)),
        "stranger": channel(server.target, token=user_token(STRANGER)),
    }
    join = channels["member"].unary_unary(
        "/callplane.v1.SessionService/JoinCall",
        request_serializer=session_service_pb2.JoinCallRequest.SerializeToString,
        response_deserializer=session_service_pb2.JoinCallResponse.FromString,
    )
    joined = await join(session_service_pb2.JoinCallRequest(type="default", id="fz-call-1", user_id=MEMBER))
    world.participant_session_ids = [joined.participant.participant_session_id, "fz-missing-participant"]
    world.cursors = await _real_cursors(server)
    assert world.cursors, "no query returned a `next` cursor to tamper with"
    try:
        yield Fuzzing(server, world, channels)
    finally:
        for name, held in channels.items():
            if name != "server":
                await held.close()


async def _real_cursors(server: RunningServer) -> list[str]:
    queries = [
        (
            "/callplane.v1.UserService/QueryUsers",
            user_pb2.QueryUsersRequest(limit=1),
            user_pb2.QueryUsersResponse,
        ),
        (
            "/callplane.v1.CallService/QueryCalls",
            call_service_pb2.QueryCallsRequest(limit=1),
            call_service_pb2.QueryCallsResponse,
        ),
        (
            "/callplane.v1.CallService/QueryMembers",
            call_service_pb2.QueryMembersRequest(type="default", id="fz-call-1", limit=1),
            call_service_pb2.QueryMembersResponse,
        ),
    ]
    cursors = []
    for path, request, reply_type in queries:
        query = server.channel.unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        reply = await query(request)
        cursors += [c for c in (reply.next, reply.prev) if c]
    return cursors


# -- observable state ------------------------------------------------------------------------------------

# The event log only grows by positions, and compaction may trim it: the `counters` row of the global
# event position (and users.last_event_seq for addressed events) stand for it.
_UNCOMPARED_TABLES = {"events", "event_recipients"}


async def database_state(server: RunningServer) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the event log, read directly from the server's database."""
    store = server.server.store
    assert store is not None

    async def read(session: AsyncSession) -> dict[str, list[tuple[Any, ...]]]:
        state = {}
        for table in Base.metadata.sorted_tables:
            if table.name in _UNCOMPARED_TABLES:
                continue
            rows = await session.execute(select(table).order_by(*table.primary_key.columns))
            state[table.name] = [tuple(row) for row in rows]
        return state

    return await store.database.run(read, write=False)


def _difference(before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]) -> str:
    lines = []
    for table in before:
        old, new = {repr(row) for row in before[table]}, {repr(row) for row in after[table]}
        if old != new:
            lines.append(f"{table}: removed {sorted(old - new)[:3]} added {sorted(new - old)[:3]}")
    return "; ".join(lines)


async def settle(server: RunningServer) -> None:
    """Waits until no stream handler of the server is still winding down (a WatchCall holding presence
    records the participant's leave after the client cancelled), so its writes can't be blamed on the next
    request. Bounded: gives up after a few seconds and lets the state comparison speak."""
    sessions = server.server.sessions
    for _ in range(500):
        busy = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").endswith(("stream_closed", "watch_call"))
        ]
        if not busy and (sessions is None or not sessions._held):
            return
        await asyncio.sleep(0.01)


# -- one request -------------------------------------------------------------------------------------------


# UNAVAILABLE too: the database never goes away during a fuzz run, so "unavailable; retry" would send a
# client retrying a request that can never succeed.
_FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)


async def send(
    fuzzing: Fuzzing, rpc: Rpc, token: str, payload: bytes
) -> tuple[grpc.StatusCode, str, grpc.aio.AioRpcError | None]:
    """Sends serialized bytes as the request of `rpc`; a stream is read up to its first message."""
    target = fuzzing.channels[token]
    if not rpc.server_streaming:
        call = target.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)
        try:
            await call(payload, timeout=UNARY_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", error
        return grpc.StatusCode.OK, "", None
    stream = target.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)(payload)
    try:
        try:
            await asyncio.wait_for(stream.read(), FIRST_MESSAGE_WAIT)
        except TimeoutError:
            pass  # open and quiet: fine
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", error
        return grpc.StatusCode.OK, "", None
    finally:
        stream.cancel()
        await settle(fuzzing.server)


def _from_transport(code: grpc.StatusCode, details: str) -> bool:
    """Refused by gRPC itself before any handler ran (a request over the 4 MB message limit)."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Received message larger than max" in details


async def check(fuzzing: Fuzzing, rpc: Rpc, token: str, payload: bytes) -> None:
    server = fuzzing.server
    before = await database_state(server)
    code, details, error = await send(fuzzing, rpc, token, payload)
    backend = server.backend
    stats.record(backend, rpc.path, code)
    stats.trace(f"{backend} {rpc.path} {token} {code.name} {details[:150]!r}")
    if code in _FORBIDDEN:
        raise AssertionError(f"{rpc.path} as {token} answered {code.name}: {details!r}")
    if error is not None and not _from_transport(code, details):
        # Every error is a google.rpc.Status with ErrorInfo (a client can read why), never a transport
        # failure such as an error too large for gRPC's metadata limit.
        info = decode(error).info
        assert info is not None and info.domain == "callplane", (
            f"{rpc.path} as {token} answered {code.name} without callplane error details: {details[:300]!r}"
        )
    if code != grpc.StatusCode.OK:
        after = await database_state(server)
        stats.compared(backend)
        assert after == before, (
            f"{rpc.path} as {token} was refused ({code.name}: {details!r}) "
            f"but changed {_difference(before, after)}"
        )


TOKENS = st.sampled_from(["server", "member", "stranger"])


@pytest.fixture(autouse=True)
async def still_serving(fuzzing: Fuzzing) -> AsyncIterator[None]:
    yield
    health = health_pb2_grpc.HealthStub(fuzzing.server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ_SETTINGS
@given(data=st.data())
async def test_hostile_messages(fuzzing: Fuzzing, rpc: Rpc, data: st.DataObject) -> None:
    request = data.draw(messages(fuzzing.world, rpc.input), label="request")
    token = data.draw(TOKENS, label="token")
    await check(fuzzing, rpc, token, request.SerializeToString())


@pytest.mark.parametrize("rpc", RPCS, ids=str)
@FUZZ_SETTINGS
@given(data=st.data())
async def test_raw_bytes(fuzzing: Fuzzing, rpc: Rpc, data: st.DataObject) -> None:
    payload = data.draw(raw_requests(fuzzing.world, rpc.input), label="payload")
    token = data.draw(TOKENS, label="token")
    await check(fuzzing, rpc, token, payload)
