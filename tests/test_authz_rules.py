"""RPC_RULES is enforced (issue 10, defect 8): a method without an entry cannot be registered, so a new RPC
cannot ship unchecked; every RPC a real server registers has exactly one rule, and the README's table is
RPC_RULES. (tests/test_authz_matrix.py checks every registered RPC has a row in the matrix.)"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from callplane_server.api.errors import Authenticator, RpcWrapper, WrappingRegistrar
from callplane_server.services.authz import RPC_RULES, MissingRule, rule_for
from tests.support import TEST_SECRET, RunningServer, channel

OPEN = ("/grpc.health.", "/grpc.reflection.")
README = Path(__file__).resolve().parents[1] / "README.md"


async def _nothing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


HANDLER = grpc.unary_unary_rpc_method_handler(_nothing)


def _registrar() -> WrappingRegistrar:
    return WrappingRegistrar(grpc.aio.server(), RpcWrapper(Authenticator(TEST_SECRET)))


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("callplane.v1.CallService", "ShinyNewRpc"),
        ("callplane.v2.CallService", "GetCall"),
        ("evil.Svc", "Do"),
    ],
)
async def test_a_method_without_a_rule_cannot_be_registered(service: str, method: str) -> None:
    registrar = _registrar()
    with pytest.raises(MissingRule, match=re.escape(f"/{service}/")):
        registrar.add_registered_method_handlers(service, {"GetCall": HANDLER, method: HANDLER})
    assert registrar.methods == []  # nothing of that service was registered


async def test_methods_with_a_rule_and_open_methods_register() -> None:
    registrar = _registrar()
    registrar.add_registered_method_handlers("callplane.v1.CallService", {"GetCall": HANDLER})
    registrar.add_registered_method_handlers("grpc.health.v1.Health", {"Check": HANDLER})
    assert registrar.methods == ["/callplane.v1.CallService/GetCall", "/grpc.health.v1.Health/Check"]


async def test_a_generic_handler_without_a_rule_is_not_served() -> None:
    """Handlers registered only generically are checked when first looked up: UNIMPLEMENTED, not served."""
    grpc_server = grpc.aio.server()
    registrar = WrappingRegistrar(grpc_server, RpcWrapper(Authenticator(TEST_SECRET)))
    registrar.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("callplane.v1.CallService", {"ShinyNewRpc": HANDLER})]
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await ch.unary_unary("/callplane.v1.CallService/ShinyNewRpc")(b"")
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await grpc_server.stop(0)


async def test_every_registered_rpc_has_exactly_one_rule(server: RunningServer) -> None:
    registered = server.server.rpc_methods
    assert any(m.startswith("/grpc.health.") for m in registered), registered  # the walk sees everything
    checked = {m for m in registered if not m.startswith(OPEN)}
    for method in checked:
        assert rule_for(method)
    # And no rule for an RPC that does not exist (a renamed or removed RPC leaves none behind).
    assert {f"/callplane.v1.{key}" for key in RPC_RULES} == checked


def test_the_readme_table_is_rpc_rules() -> None:
    rows = re.findall(r"^\| `([A-Za-z]+/[A-Za-z]+)` \| (.+?) \|$", README.read_text(), flags=re.MULTILINE)
    assert rows, "the README has no RPC table"
    assert [key for key, _ in rows] == list(RPC_RULES), "the README lists other RPCs, or in another order"
    assert dict(rows) == RPC_RULES, "the README's table differs from RPC_RULES (services/authz.py)"
