"""Authentication: every RPC but health and reflection needs a valid bearer token, and each way a token
can be wrong is refused as UNAUTHENTICATED with its own reason."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callplane.v1 import call_service_pb2, call_service_pb2_grpc, user_pb2, user_pb2_grpc
from callplane_server.auth.tokens import create_token, verify_token
from callplane_server.errors import Unauthenticated
from tests.errors import expect_error
from tests.support import SERVER_TOKEN, TEST_SECRET, RunningServer, channel, struct, user_token


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _unsigned(claims: dict[str, object]) -> str:
    """An `alg: none` token: header and claims, no signature."""
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


# Built at import: claims that must not expire while the suite runs get a day (a minute did not last).
NOW = int(datetime.now(UTC).timestamp())
BAD_TOKENS = {
    "missing": (None, "TOKEN_MISSING"),
    "not-a-jwt": ("not.a.jwt", "TOKEN_MALFORMED"),
    "garbage": ("garbage", "TOKEN_MALFORMED"),
    "expired": (create_token(TEST_SECRET, user_id="alice", ttl=timedelta(hours=-1)), "TOKEN_EXPIRED"),
    "forged": (create_token("another-secret-" + "x" * 32, ttl=timedelta(hours=1)), "TOKEN_SIGNATURE_INVALID"),
    "alg-none": (_unsigned({"server": True, "iat": NOW}), "TOKEN_ALGORITHM_NOT_ALLOWED"),
    "hs512": (
        jwt.encode({"server": True, "iat": NOW}, TEST_SECRET, algorithm="HS512"),
        "TOKEN_ALGORITHM_NOT_ALLOWED",
    ),
    "user-without-exp": (jwt.encode({"user_id": "alice", "iat": NOW}, TEST_SECRET), "TOKEN_CLAIMS_INVALID"),
    "without-iat": (jwt.encode({"server": True}, TEST_SECRET), "TOKEN_CLAIMS_INVALID"),
    "empty-user": (
        jwt.encode({"user_id": "", "iat": NOW, "exp": NOW + 86_400}, TEST_SECRET),
        "TOKEN_CLAIMS_INVALID",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_unauthenticated_with_a_reason(server: RunningServer, case: str) -> None:
    token, reason = BAD_TOKENS[case]
    async with channel(server.target, token=token) as unauthenticated:
        stub = call_service_pb2_grpc.CallServiceStub(unauthenticated)
        await expect_error(
            stub.QueryCalls(call_service_pb2.QueryCallsRequest()), grpc.StatusCode.UNAUTHENTICATED, reason
        )


async def test_a_non_bearer_authorization_header_is_malformed(server: RunningServer) -> None:
    async with channel(server.target, token=None) as plain:
        stub = call_service_pb2_grpc.CallServiceStub(plain)
        call = stub.QueryCalls(
            call_service_pb2.QueryCallsRequest(), metadata=[("authorization", "Basic abc")]
        )
        await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")


async def test_streams_need_a_token_too(server: RunningServer) -> None:
    from callplane.v1 import event_service_pb2, event_service_pb2_grpc

    async with channel(server.target, token=None) as plain:
        stream = event_service_pb2_grpc.EventServiceStub(plain).SubscribeEvents(
            event_service_pb2.SubscribeEventsRequest()
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.read()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_valid_server_and_user_tokens_are_accepted(server: RunningServer, unique) -> None:
    """Each token is accepted as whom it names: the server finds the user it created (in a team of its
    own); the user's token sees exactly itself (nobody outside its teams)."""
    user_id, team = unique("token-user"), unique("team")
    async with channel(server.target, token=SERVER_TOKEN) as authed:
        users = user_pb2_grpc.UserServiceStub(authed)
        await users.UpsertUsers(
            user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id, teams=[team])])
        )
        seen_by_server = await users.QueryUsers(
            user_pb2.QueryUsersRequest(filter_conditions=struct({"id": user_id}))
        )
    async with channel(server.target, token=user_token(user_id)) as authed:
        users = user_pb2_grpc.UserServiceStub(authed)
        seen_by_user = await users.QueryUsers(user_pb2.QueryUsersRequest(limit=100))
    assert [user.id for user in seen_by_server.users] == [user_id]
    assert [user.id for user in seen_by_user.users] == [user_id]


async def test_health_is_open_without_a_token(server: RunningServer) -> None:
    async with channel(server.target, token=None) as plain:
        reply = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_user_token_claims_round_trip() -> None:
    token = create_token(TEST_SECRET, user_id="bob", ttl=timedelta(minutes=5), call_cids=["default:a"])
    principal = verify_token(TEST_SECRET, token)
    assert principal.user_id == "bob" and not principal.is_server
    assert principal.call_cids == frozenset({"default:a"})
    assert verify_token(TEST_SECRET, SERVER_TOKEN).is_server


def test_user_tokens_need_a_ttl() -> None:
    with pytest.raises(ValueError):
        create_token(TEST_SECRET, user_id="bob")


def test_leeway_does_not_accept_long_expired_tokens() -> None:
    old = create_token(
        TEST_SECRET, user_id="bob", ttl=timedelta(seconds=1), now=datetime.now(UTC) - timedelta(minutes=1)
    )
    with pytest.raises(Unauthenticated) as raised:
        verify_token(TEST_SECRET, old)
    assert raised.value.reason == "TOKEN_EXPIRED"
