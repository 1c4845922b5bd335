"""Authority fails closed (issue 10, defect 7): nothing acts with the server's authority unless it says
so. An RPC path on which no principal was established is refused, not run as an administrator; background
work states whom it acts for; tasks started inside an RPC do not keep the RPC's caller."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from callplane.v1 import call_type_service_pb2, call_type_service_pb2_grpc
from callplane_server.api.errors import Authenticator, RpcWrapper, WrappingRegistrar
from callplane_server.services.call_types import CallTypeService
from tests.errors import decode, expect_error
from tests.support import SERVER_TOKEN, TEST_SECRET, RunningServer, channel

# Health and reflection skip authentication (they are open to everyone); a method under that prefix that
# reached a rule is exactly the path where nobody established a principal.
BACKDOOR = "grpc.health.v1.Backdoor"


@pytest_asyncio.fixture(loop_scope="module")
async def backdoor(server: RunningServer) -> AsyncIterator[str]:
    """A second grpc server whose one method, registered through the real wrapper under an open prefix,
    creates a call type (admin-only) on the running server's store. Returns its target."""
    assert server.server.store is not None
    service = CallTypeService(server.server.store, server.clock)

    async def create_call_type(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await service.create(request.decode(), {}, None)
        return b""

    grpc_server = grpc.aio.server()
    registrar = WrappingRegistrar(grpc_server, RpcWrapper(Authenticator(TEST_SECRET)))
    registrar.add_registered_method_handlers(
        BACKDOOR, {"CreateCallType": grpc.unary_unary_rpc_method_handler(create_call_type)}
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(0)


@pytest.mark.parametrize("token", [None, SERVER_TOKEN], ids=["no-token", "server-token"])
async def test_an_rpc_path_without_a_principal_is_refused(
    server: RunningServer, backdoor: str, unique, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("backdoor").lower()
    async with channel(backdoor, token=token) as ch:
        call = ch.unary_unary(f"/{BACKDOOR}/CreateCallType")(name.encode())
        with (
            caplog.at_level(logging.ERROR, logger="callplane_server.auth.context"),
            pytest.raises(grpc.aio.AioRpcError) as raised,
        ):
            await call
    got = decode(raised.value)
    # Refused as a permission problem, never INTERNAL (nor run with the server's authority).
    assert (got.code, got.reason) == (grpc.StatusCode.PERMISSION_DENIED, "NO_PRINCIPAL"), got
    assert any("server bug" in record.getMessage() for record in caplog.records), caplog.text
    # Nothing was created.
    stub = call_type_service_pb2_grpc.CallTypeServiceStub(server.channel)
    await expect_error(
        stub.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )


async def test_a_service_called_outside_any_rpc_is_refused(server: RunningServer, unique) -> None:
    from callplane_server.auth.context import NoPrincipal

    assert server.server.store is not None
    service = CallTypeService(server.server.store, server.clock)
    name = unique("nobody").lower()
    # A fresh context: what a task started without authority sees.
    task = asyncio.create_task(service.create(name, {}, None), context=contextvars.Context())
    with pytest.raises(NoPrincipal) as raised:
        await task
    assert raised.value.reason == "NO_PRINCIPAL"


async def test_background_tasks_get_the_authority_they_are_given(server: RunningServer, unique) -> None:
    """A task created while acting as a user would keep that user; authority_context gives it only what
    it is given (here the server's authority, or none)."""
    from callplane_server.auth.context import NoPrincipal, acting_as, authority_context, current_principal
    from callplane_server.auth.tokens import SERVER, Principal

    async def who() -> Principal:
        return current_principal()

    alice = Principal(user_id="alice")
    with acting_as(alice):
        inherited = await asyncio.create_task(who())
        explicit = await asyncio.create_task(who(), context=authority_context(SERVER))
        nobody = asyncio.create_task(who(), context=authority_context(None))
        with pytest.raises(NoPrincipal):
            await nobody
    assert inherited == alice  # the hazard authority_context exists for
    assert explicit == SERVER
    with pytest.raises(NoPrincipal):
        current_principal()  # acting_as restored "nobody"


async def test_timers_act_with_the_servers_authority(server: RunningServer, unique) -> None:
    """Whoever calls run_due (the runner's own task, a test, a tool), handlers act as the server."""
    from callplane_server.auth.context import current_principal
    from callplane_server.auth.tokens import SERVER
    from callplane_server.services.timers import TimerRunner

    store = server.server.store
    assert store is not None
    call_id = unique("timer")  # a timer's call need not exist for it to fire
    kind = unique("probe")
    seen = []

    async def probe(tx, timer, now) -> None:  # type: ignore[no-untyped-def]
        seen.append(current_principal())

    runner = TimerRunner(store, server.clock)
    runner.register(kind, probe)
    due = server.clock()
    await store.write(lambda tx: tx.timers.schedule(kind, f"default:{call_id}", due))
    # From a context with no authority at all.
    fired = await asyncio.create_task(runner.run_due(), context=contextvars.Context())
    assert fired == 1 and seen == [SERVER]
