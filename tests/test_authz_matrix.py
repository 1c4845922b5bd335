"""The authorization matrix (issue 4, acceptance 1): every RPC of every callplane.v1 service × every kind of
caller, with the status each cell must get, on both backends.

Callers: a server token; users in team t1 — a global admin, the call's host member (member role `host`),
a plain member (member role `user`), a non-member, a user blocked from the call (BlockUser); a user of
team t2; and no token, an expired token and a token signed with another secret.

The world: a call of the built-in `default` type in team t1 with members host (host) and member (user).
What each caller holds there is read from that type's grants in the source (BUILTIN_CALL_TYPES), not
copied: a non-member the global role `user`'s, a member also `call_member`'s and its member role's; a
global admin has every capability in every call, across teams; a user of another team and a blocked user
hold none (RPC_RULES in services/authz.py is the table of what each RPC checks).

Each row builds a fresh, valid request for the acting caller (fresh ids per cell); RPCs that change shared
state act on per-cell calls, users and call types made with the server token. Requests are chosen so an
authorized caller succeeds; where the RPC's own outcome is something else, the cell says so.
Unauthenticated cells build their requests against ids that were never created ("dry" cells): the token
is refused before anything else, and a wrongly accepted token cannot damage the shared world."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format

from callplane.v1 import (
    call_data_service_pb2,
    call_data_service_pb2_grpc,
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    moderation_service_pb2,
    moderation_service_pb2_grpc,
    ring_service_pb2,
    ring_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)
from callplane_server.auth.tokens import create_token
from callplane_server.domain.call_types import BUILTIN_CALL_TYPES
from callplane_server.domain.capabilities import CAPABILITIES
from tests.errors import DOMAIN, decode
from tests.support import SERVER_TOKEN, RunningServer, channel, running_server, struct, user_token

TYPE = "default"
T1, T2 = "t1", "t2"
SHARED = "mx-shared"  # the shared call (default:mx-shared, team t1)
EXTRA = "mx-extra"  # a t1 user who is none of the callers: the target of moderation
USERS = {  # caller → (user id, global role, teams)
    "admin": ("mx-admin", "admin", [T1]),
    "host": ("mx-host", "user", [T1]),
    "member": ("mx-member", "user", [T1]),
    "nonmember": ("mx-nonmember", "user", [T1]),
    "blocked": ("mx-blocked", "user", [T1]),
    "other": ("mx-other", "user", [T2]),
}
UID = {name: spec[0] for name, spec in USERS.items()}
AUTHENTICATED = ("server", "admin", "host", "member", "nonmember", "other", "blocked")
UNAUTHENTICATED = {"none": "TOKEN_MISSING", "expired": "TOKEN_EXPIRED", "forged": "TOKEN_SIGNATURE_INVALID"}
PRINCIPALS = (*AUTHENTICATED, *UNAUTHENTICATED)
# Callers that may hold a participant in the shared call (the others cannot join it).
IN_CALL = ("server", "admin", "host", "member", "nonmember")

OK = grpc.StatusCode.OK
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

_GRANTS = {role: set(capabilities) for role, capabilities in BUILTIN_CALL_TYPES[TYPE].grants.items()}
ALL_CAPS = set(CAPABILITIES)
NONMEMBER_CAPS = _GRANTS["user"]
MEMBER_CAPS = NONMEMBER_CAPS | _GRANTS["call_member"] | _GRANTS["user"]
HOST_CAPS = NONMEMBER_CAPS | _GRANTS["call_member"] | _GRANTS["host"]
# own_capabilities in the shared call (GetCall); other-team and blocked users are refused.
OWN_CAPABILITIES = {
    "server": ALL_CAPS,
    "admin": ALL_CAPS,
    "host": HOST_CAPS,
    "member": MEMBER_CAPS,
    "nonmember": NONMEMBER_CAPS,
}


@dataclass(frozen=True)
class Denied:
    """PERMISSION_DENIED with one of `reasons` (several where RPC_RULES leaves the order of checks open)
    and, for MISSING_CAPABILITY, the capability named in the ErrorInfo metadata."""

    reasons: tuple[str, ...]
    capability: str | None = None


def missing(capability: str) -> Denied:
    return Denied(("MISSING_CAPABILITY",), capability)


ADMIN_REQUIRED = Denied(("ADMIN_REQUIRED",))
TEAM = Denied(("TEAM_MISMATCH",))
BLOCKED = Denied(("USER_BLOCKED",))
NOT_YOURSELF = Denied(("NOT_YOURSELF",))

Expected = grpc.StatusCode | Denied


# -- the world -----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def tokens() -> dict[str, str | None]:
    forged_secret = "another-secret-" + "f" * 40
    result: dict[str, str | None] = {"server": SERVER_TOKEN}
    for name, user_id in UID.items():
        result[name] = user_token(user_id)
    result["none"] = None
    result["expired"] = user_token(UID["member"], ttl=timedelta(hours=-1))
    result["forged"] = create_token(forged_secret, user_id=UID["member"], ttl=timedelta(hours=1))
    return result


@dataclass
class Stubs:
    call_types: call_type_service_pb2_grpc.CallTypeServiceStub
    users: user_pb2_grpc.UserServiceStub
    calls: call_service_pb2_grpc.CallServiceStub
    sessions: session_service_pb2_grpc.SessionServiceStub
    rings: ring_service_pb2_grpc.RingServiceStub
    data: call_data_service_pb2_grpc.CallDataServiceStub
    events: event_service_pb2_grpc.EventServiceStub
    moderation: moderation_service_pb2_grpc.ModerationServiceStub
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub

    @classmethod
    def on(cls, ch: grpc.aio.Channel) -> Stubs:
        return cls(
            call_type_service_pb2_grpc.CallTypeServiceStub(ch),
            user_pb2_grpc.UserServiceStub(ch),
            call_service_pb2_grpc.CallServiceStub(ch),
            session_service_pb2_grpc.SessionServiceStub(ch),
            ring_service_pb2_grpc.RingServiceStub(ch),
            call_data_service_pb2_grpc.CallDataServiceStub(ch),
            event_service_pb2_grpc.EventServiceStub(ch),
            moderation_service_pb2_grpc.ModerationServiceStub(ch),
            webhook_service_pb2_grpc.WebhookServiceStub(ch),
        )


@dataclass
class World:
    server: RunningServer
    stubs: dict[str, Stubs]
    visibility_tag: str
    visibility_ids: dict[str, str]  # "t1" / "t2" / "open" → call id
    setup_problems: list[str] = field(default_factory=list)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    # Every stream row starts with a message (a snapshot, or the start progress of a stream from now).
    async with running_server(backend, tmp_path_factory.mktemp(backend), lease_ttl_seconds=600.0) as running:
        yield running


def _members() -> list[call_pb2.MemberRequest]:
    return [
        call_pb2.MemberRequest(user_id=UID["host"], role="host"),
        call_pb2.MemberRequest(user_id=UID["member"], role="user"),
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(server: RunningServer) -> AsyncIterator[World]:
    channels = {name: channel(server.target, token=token) for name, token in tokens().items()}
    srv = Stubs.on(channels["server"])
    people = [
        user_pb2.UserRequest(id=uid, name=name, role=role, teams=teams)
        for name, (uid, role, teams) in USERS.items()
    ]
    people.append(user_pb2.UserRequest(id=EXTRA, name="extra", teams=[T1]))
    await srv.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=people))
    await srv.calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=TYPE,
            id=SHARED,
            data=call_service_pb2.CallData(created_by_id=UID["host"], team=T1, members=_members()),
        )
    )
    problems: list[str] = []
    try:
        await srv.moderation.BlockUser(
            moderation_service_pb2.BlockUserRequest(type=TYPE, id=SHARED, user_id=UID["blocked"])
        )
    except grpc.aio.AioRpcError as error:
        problems.append(f"BlockUser of the blocked caller failed: {error.code().name} {error.details()}")
    tag = new_id("vis")
    ids = {"t1": SHARED, "t2": new_id("mx-t2"), "open": new_id("mx-open")}
    await srv.calls.UpdateCall(
        call_service_pb2.UpdateCallRequest(type=TYPE, id=SHARED, set_custom=struct({"vis": tag}))
    )
    for key, team in (("t2", T2), ("open", "")):
        await srv.calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type=TYPE,
                id=ids[key],
                data=call_service_pb2.CallData(created_by_id=EXTRA, team=team, custom=struct({"vis": tag})),
            )
        )
    try:
        yield World(server, {name: Stubs.on(ch) for name, ch in channels.items()}, tag, ids, problems)
    finally:
        for ch in channels.values():
            await ch.close()


class SetupFailed(AssertionError):
    pass


class Cell:
    """One caller acting in one row: its stubs, its user id, and per-cell fixtures made with the server
    token (in dry cells, ids that are never created)."""

    def __init__(self, world: World, principal: str) -> None:
        self.world = world
        self.principal = principal
        self.dry = principal in UNAUTHENTICATED
        self.s = world.stubs[principal]
        self.srv = world.stubs["server"]

    @property
    def me(self) -> str:
        """The user this caller acts as: itself; the server acts for the plain member (and unauthenticated
        tokens claim to be the plain member)."""
        return UID.get(self.principal, UID["member"])

    @property
    def someone_else(self) -> str:
        """Another existing t1 user (for "as oneself" checks)."""
        return UID["host"] if self.me == UID["member"] else UID["member"]

    async def setup(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except grpc.aio.AioRpcError as error:
            raise SetupFailed(f"setup RPC failed: {error.code().name}: {error.details()}") from error

    async def fresh_call(self, *, live: bool = True) -> str:
        """A new default call in team t1 with members host and member (blocking the blocked caller)."""
        call_id = new_id("mx-call")
        if self.dry:
            return call_id
        await self.setup(
            self.srv.calls.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(
                    type=TYPE,
                    id=call_id,
                    data=call_service_pb2.CallData(created_by_id=UID["host"], team=T1, members=_members()),
                )
            )
        )
        if self.principal == "blocked":
            await self.block(call_id, UID["blocked"])
        if not live:
            await self.setup(
                self.srv.sessions.StopLive(session_service_pb2.StopLiveRequest(type=TYPE, id=call_id))
            )
        return call_id

    async def fresh_user(self) -> str:
        user_id = new_id("mx-user")
        if not self.dry:
            await self.setup(
                self.srv.users.UpsertUsers(
                    user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=user_id, teams=[T1])])
                )
            )
        return user_id

    async def fresh_webhook(self) -> str:
        """A new endpoint (a public address: the matrix server allows no private targets)."""
        if self.dry:
            return "wh_dry"
        created = await self.setup(
            self.srv.webhooks.CreateWebhook(webhook_service_pb2.CreateWebhookRequest(url=WEBHOOK_URL))
        )
        return str(created.webhook.id)

    async def fresh_call_type(self) -> str:
        name = new_id("mx-type")
        if not self.dry:
            await self.setup(
                self.srv.call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
            )
        return name

    async def join(self, user_id: str, call_id: str = SHARED) -> str:
        psid = new_id("p")
        if not self.dry:
            await self.setup(
                self.srv.sessions.JoinCall(
                    session_service_pb2.JoinCallRequest(
                        type=TYPE, id=call_id, user_id=user_id, participant_session_id=psid
                    )
                )
            )
        return psid

    async def own_participant(self) -> str:
        """A participant of this caller in the shared call; callers that cannot join it (other team,
        blocked) get the plain member's participant instead."""
        return await self.join(self.me if self.principal in IN_CALL else UID["member"])

    async def block(self, call_id: str, user_id: str) -> None:
        if not self.dry:
            await self.setup(
                self.srv.moderation.BlockUser(
                    moderation_service_pb2.BlockUserRequest(type=TYPE, id=call_id, user_id=user_id)
                )
            )

    async def ring(self, call_id: str, caller: str, callees: list[str]) -> None:
        if not self.dry:
            await self.setup(
                self.srv.rings.RingCall(
                    ring_service_pb2.RingCallRequest(
                        type=TYPE, id=call_id, user_id=caller, members_ids=callees
                    )
                )
            )

    async def pin(self, psid: str, user_id: str) -> None:
        if not self.dry:
            await self.setup(
                self.srv.data.PinParticipant(
                    call_data_service_pb2.PinParticipantRequest(
                        type=TYPE, id=SHARED, participant_session_id=psid, user_id=user_id
                    )
                )
            )

    @staticmethod
    async def first(stream: Any) -> Any:
        """The first message of a server stream (or its error); the stream is cancelled afterwards."""
        try:
            message = await asyncio.wait_for(stream.read(), timeout=5)
            if message is grpc.aio.EOF:
                # The stream ended at once: surface its status.
                await stream
            return message
        finally:
            stream.cancel()


# -- the rows ------------------------------------------------------------------------------------------

Act = Callable[[Cell], Awaitable[Any]]
Check = Callable[[Cell, Any], None]


@dataclass(frozen=True)
class Row:
    method: str  # full method name, e.g. /callplane.v1.CallService/GetCall
    variant: str
    act: Act
    expect: dict[str, Expected]
    check: Check | None = None

    @property
    def id(self) -> str:
        name = self.method.rsplit(".", 1)[-1]
        return f"{name}:{self.variant}" if self.variant else name


ROWS: list[Row] = []


def row(
    service: str,
    rpc: str,
    *,
    variant: str = "",
    check: Check | None = None,
    server: Expected,
    admin: Expected,
    host: Expected,
    member: Expected,
    nonmember: Expected,
    other: Expected,
    blocked: Expected,
) -> Callable[[Act], Act]:
    """Registers a row: the decorated function acts as the caller; every token failure is UNAUTHENTICATED."""
    expect: dict[str, Expected] = {
        "server": server,
        "admin": admin,
        "host": host,
        "member": member,
        "nonmember": nonmember,
        "other": other,
        "blocked": blocked,
    }
    expect.update(dict.fromkeys(UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED))

    def register(act: Act) -> Act:
        ROWS.append(Row(f"/callplane.v1.{service}/{rpc}", variant, act, expect, check))
        return act

    return register


def by_capability(capability: str) -> dict[str, Expected]:
    """The usual shape of a call RPC checking one capability in the shared call."""

    def holder(capabilities: set[str]) -> Expected:
        return OK if capability in capabilities else missing(capability)

    return dict(
        server=OK,
        admin=OK,
        host=holder(HOST_CAPS),
        member=holder(MEMBER_CAPS),
        nonmember=holder(NONMEMBER_CAPS),
        other=TEAM,
        blocked=BLOCKED,
    )


def everyone(outcome: Expected = OK) -> dict[str, Expected]:
    return dict.fromkeys(AUTHENTICATED, outcome)


def admins_only() -> dict[str, Expected]:
    users = dict.fromkeys(("host", "member", "nonmember", "other", "blocked"), ADMIN_REQUIRED)
    return dict(server=OK, admin=OK, **users)


# CallTypeService ----------------------------------------------------------------------------------------


@row("CallTypeService", "CreateCallType", **admins_only())
async def _(cx: Cell) -> Any:
    return await cx.s.call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=new_id("mx-type"))
    )


@row("CallTypeService", "GetCallType", **everyone())
async def _(cx: Cell) -> Any:
    return await cx.s.call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=TYPE))


@row("CallTypeService", "ListCallTypes", **everyone())
async def _(cx: Cell) -> Any:
    return await cx.s.call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())


@row("CallTypeService", "UpdateCallType", **admins_only())
async def _(cx: Cell) -> Any:
    name = await cx.fresh_call_type()
    grants = {"user": call_type_pb2.Capabilities(capabilities=["read-call"])}
    return await cx.s.call_types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(name=name, grants=grants)
    )


@row("CallTypeService", "DeleteCallType", **admins_only())
async def _(cx: Cell) -> Any:
    name = await cx.fresh_call_type()
    return await cx.s.call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name))


# UserService --------------------------------------------------------------------------------------------


# A user may upsert itself with its role and teams unchanged; blocks and teams of calls do not matter here.
@row("UserService", "UpsertUsers", variant="self", **everyone())
async def _(cx: Cell) -> Any:
    if cx.principal == "server":
        request = user_pb2.UserRequest(id=new_id("mx-user"), teams=[T1])
    else:
        user_id, role, teams = USERS.get(cx.principal, USERS["member"])
        request = user_pb2.UserRequest(id=user_id, name=f"{cx.principal} again", role=role, teams=teams)
    return await cx.s.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[request]))


@row(
    "UserService", "UpsertUsers", variant="others",
    server=OK, admin=OK, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    request = user_pb2.UserRequest(id=new_id("mx-user"), teams=[T1])
    return await cx.s.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[request]))


# Changing one's own role is an admin's business (RPC_RULES: "role and teams unchanged").
@row(
    "UserService", "UpsertUsers", variant="own-role",
    server=OK, admin=OK, host=ADMIN_REQUIRED, member=ADMIN_REQUIRED, nonmember=ADMIN_REQUIRED,
    other=ADMIN_REQUIRED, blocked=ADMIN_REQUIRED,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    if cx.principal == "server":
        request = user_pb2.UserRequest(id=new_id("mx-user"), role="moderator", teams=[T1])
    else:
        user_id, role, teams = USERS.get(cx.principal, USERS["member"])
        # users try to make themselves admins; the admin re-upserts itself unchanged
        request = (
            user_pb2.UserRequest(id=user_id, role=role, teams=teams)
            if cx.principal == "admin"
            else user_pb2.UserRequest(id=user_id, role="admin", teams=teams)
        )
    return await cx.s.users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[request]))


@row("UserService", "UpdateUsersPartial", variant="self", **everyone())
async def _(cx: Cell) -> Any:
    target = await cx.fresh_user() if cx.principal == "server" else cx.me
    patch = user_pb2.UserPartialUpdate(id=target, set=struct({"name": f"{cx.principal} renamed"}))
    return await cx.s.users.UpdateUsersPartial(user_pb2.UpdateUsersPartialRequest(users=[patch]))


@row(
    "UserService", "UpdateUsersPartial", variant="others",
    server=OK, admin=OK, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    target = await cx.fresh_user()
    patch = user_pb2.UserPartialUpdate(id=target, set=struct({"name": "renamed by someone else"}))
    return await cx.s.users.UpdateUsersPartial(user_pb2.UpdateUsersPartialRequest(users=[patch]))


def _visible_users(cx: Cell, response: Any) -> None:
    everybody = {*UID.values(), EXTRA}
    t1 = everybody - {UID["other"]}
    # Interpretation: "user tokens see only users sharing a team" — a global admin sees everyone.
    wanted = {"server": everybody, "admin": everybody, "other": {UID["other"]}}.get(cx.principal, t1)
    assert {user.id for user in response.users} == wanted


@row("UserService", "QueryUsers", check=_visible_users, **everyone())
async def _(cx: Cell) -> Any:
    ids = [*UID.values(), EXTRA]
    request = user_pb2.QueryUsersRequest(filter_conditions=struct({"id": {"$in": ids}}), limit=100)
    return await cx.s.users.QueryUsers(request)


@row("UserService", "DeleteUsers", **admins_only())
async def _(cx: Cell) -> Any:
    victim = await cx.fresh_user()
    return await cx.s.users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[victim]))


# CallService --------------------------------------------------------------------------------------------


# Creating needs create-call in the new call (team t1): every t1 user has it through `user`; the blocked
# user is blocked only in other calls; the t2 user cannot create in team t1.
@row(
    "CallService", "GetOrCreateCall", variant="create",
    server=OK, admin=OK, host=OK, member=OK, nonmember=OK, other=TEAM, blocked=OK,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    data = call_service_pb2.CallData(created_by_id=cx.me, team=T1)
    return await cx.s.calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(type=TYPE, id=new_id("mx-new"), data=data)
    )


# A user token creates calls as itself only.
@row(
    "CallService", "GetOrCreateCall", variant="create-as-other",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    data = call_service_pb2.CallData(created_by_id=cx.someone_else, team=T1)
    return await cx.s.calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(type=TYPE, id=new_id("mx-new"), data=data)
    )


@row("CallService", "GetOrCreateCall", variant="get", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    return await cx.s.calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type=TYPE, id=SHARED))


def _own_capabilities(cx: Cell, response: Any) -> None:
    assert set(response.own_capabilities) == OWN_CAPABILITIES[cx.principal], cx.principal


@row("CallService", "GetCall", check=_own_capabilities, **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    return await cx.s.calls.GetCall(call_service_pb2.GetCallRequest(type=TYPE, id=SHARED))


@row("CallService", "UpdateCall", **by_capability("update-call"))
async def _(cx: Cell) -> Any:
    request = call_service_pb2.UpdateCallRequest(
        type=TYPE, id=SHARED, set_custom=struct({cx.principal: new_id("v")})
    )
    return await cx.s.calls.UpdateCall(request)


# settings_override needs update-call and update-call-settings; plain users lack the first already.
@row("CallService", "UpdateCall", variant="settings", **by_capability("update-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    settings = call_type_pb2.CallSettings()
    json_format.ParseDict({"audio": {"mic_default_on": False}}, settings)
    request = call_service_pb2.UpdateCallRequest(type=TYPE, id=call_id, settings_override=settings)
    return await cx.s.calls.UpdateCall(request)


@row("CallService", "EndCall", **by_capability("end-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    return await cx.s.calls.EndCall(call_service_pb2.EndCallRequest(type=TYPE, id=call_id))


@row("CallService", "DeleteCall", **admins_only())
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    return await cx.s.calls.DeleteCall(call_service_pb2.DeleteCallRequest(type=TYPE, id=call_id))


def _visible_calls(cx: Cell, response: Any) -> None:
    ids = cx.world.visibility_ids
    # The admin is in team t1 only, but the global admin role reaches across teams (authz._explain).
    wanted = {
        "server": {"t1", "t2", "open"},
        "admin": {"t1", "t2", "open"},
        "other": {"t2", "open"},
        "blocked": {"open"},
    }.get(cx.principal, {"t1", "open"})
    assert {state.call.id for state in response.calls} == {ids[key] for key in wanted}


# Everyone may query; each sees only the calls it may read (asserted by _visible_calls).
@row("CallService", "QueryCalls", check=_visible_calls, **everyone())
async def _(cx: Cell) -> Any:
    request = call_service_pb2.QueryCallsRequest(
        filter_conditions=struct({"custom.vis": cx.world.visibility_tag}), limit=100
    )
    return await cx.s.calls.QueryCalls(request)


@row("CallService", "UpdateCallMembers", variant="update", **by_capability("update-call-member"))
async def _(cx: Cell) -> Any:
    request = call_service_pb2.UpdateCallMembersRequest(
        type=TYPE, id=SHARED, update_members=[call_pb2.MemberRequest(user_id=EXTRA, role="user")]
    )
    return await cx.s.calls.UpdateCallMembers(request)


@row("CallService", "UpdateCallMembers", variant="remove", **by_capability("remove-call-member"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    request = call_service_pb2.UpdateCallMembersRequest(type=TYPE, id=call_id, remove_members=[UID["member"]])
    return await cx.s.calls.UpdateCallMembers(request)


@row("CallService", "QueryMembers", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    return await cx.s.calls.QueryMembers(call_service_pb2.QueryMembersRequest(type=TYPE, id=SHARED))


# SessionService -----------------------------------------------------------------------------------------


# The default type grants join-call to `user`, so a non-member may join (the members-only recipe of the
# seeds takes it away; acceptance 2 tests that).
@row("SessionService", "JoinCall", **by_capability("join-call"))
async def _(cx: Cell) -> Any:
    request = session_service_pb2.JoinCallRequest(
        type=TYPE, id=SHARED, user_id=cx.me, participant_session_id=new_id("p")
    )
    return await cx.s.sessions.JoinCall(request)


# Users join as themselves only (the server may join anyone). The check comes before the call's.
@row(
    "SessionService", "JoinCall", variant="as-other",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    request = session_service_pb2.JoinCallRequest(
        type=TYPE, id=SHARED, user_id=cx.someone_else, participant_session_id=new_id("p")
    )
    return await cx.s.sessions.JoinCall(request)


# "own participant": other-team and blocked users cannot have one, so they act on the plain member's
# participant — either check may refuse them first.
OWN_PARTICIPANT = dict(
    server=OK,
    admin=OK,
    host=OK,
    member=OK,
    nonmember=OK,
    other=Denied(("NOT_OWN_PARTICIPANT", "TEAM_MISMATCH")),
    blocked=Denied(("NOT_OWN_PARTICIPANT", "USER_BLOCKED")),
)
# Someone else's participant: only the server token may touch it (no capability lets a user act on
# another user's connection through these RPCs; KickUser is the moderator's way).
OTHERS_PARTICIPANT = dict(
    server=OK,
    admin=Denied(("NOT_OWN_PARTICIPANT",)),
    host=Denied(("NOT_OWN_PARTICIPANT",)),
    member=Denied(("NOT_OWN_PARTICIPANT",)),
    nonmember=Denied(("NOT_OWN_PARTICIPANT",)),
    other=Denied(("NOT_OWN_PARTICIPANT", "TEAM_MISMATCH")),
    blocked=Denied(("NOT_OWN_PARTICIPANT", "USER_BLOCKED")),
)


@row("SessionService", "LeaveCall", **OWN_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.own_participant()
    request = session_service_pb2.LeaveCallRequest(type=TYPE, id=SHARED, participant_session_id=psid)
    return await cx.s.sessions.LeaveCall(request)


@row("SessionService", "LeaveCall", variant="others", **OTHERS_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    request = session_service_pb2.LeaveCallRequest(type=TYPE, id=SHARED, participant_session_id=psid)
    return await cx.s.sessions.LeaveCall(request)


@row("SessionService", "KeepAlive", **OWN_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.own_participant()
    request = session_service_pb2.KeepAliveRequest(type=TYPE, id=SHARED, participant_session_id=psid)
    return await cx.s.sessions.KeepAlive(request)


@row("SessionService", "KeepAlive", variant="others", **OTHERS_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    request = session_service_pb2.KeepAliveRequest(type=TYPE, id=SHARED, participant_session_id=psid)
    return await cx.s.sessions.KeepAlive(request)


# Publishing audio needs send-audio, which every t1 caller holds in the default type.
@row("SessionService", "UpdateParticipant", **OWN_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.own_participant()
    request = session_service_pb2.UpdateParticipantRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, published_tracks=[session_pb2.TRACK_TYPE_AUDIO]
    )
    return await cx.s.sessions.UpdateParticipant(request)


@row("SessionService", "UpdateParticipant", variant="others", **OTHERS_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    request = session_service_pb2.UpdateParticipantRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, published_tracks=[session_pb2.TRACK_TYPE_AUDIO]
    )
    return await cx.s.sessions.UpdateParticipant(request)


@row("SessionService", "QueryCallParticipants", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    request = session_service_pb2.QueryCallParticipantsRequest(type=TYPE, id=SHARED)
    return await cx.s.sessions.QueryCallParticipants(request)


@row("SessionService", "QueryCallSessions", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    return await cx.s.sessions.QueryCallSessions(
        session_service_pb2.QueryCallSessionsRequest(type=TYPE, id=SHARED)
    )


# GoLive needs a call in backstage: the server puts a fresh call there first.
@row("SessionService", "GoLive", **by_capability("update-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call(live=False)
    return await cx.s.sessions.GoLive(session_service_pb2.GoLiveRequest(type=TYPE, id=call_id))


@row("SessionService", "StopLive", **by_capability("update-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    return await cx.s.sessions.StopLive(session_service_pb2.StopLiveRequest(type=TYPE, id=call_id))


# RingService --------------------------------------------------------------------------------------------


# Ringing needs create-call, as oneself; callees must be members (the host rings the member and vice versa).
@row("RingService", "RingCall", **by_capability("create-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    callee = UID["host"] if cx.me == UID["member"] else UID["member"]
    request = ring_service_pb2.RingCallRequest(type=TYPE, id=call_id, user_id=cx.me, members_ids=[callee])
    return await cx.s.rings.RingCall(request)


@row(
    "RingService", "RingCall", variant="as-other",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    caller = cx.someone_else
    callee = UID["host"] if caller == UID["member"] else UID["member"]
    request = ring_service_pb2.RingCallRequest(type=TYPE, id=call_id, user_id=caller, members_ids=[callee])
    return await cx.s.rings.RingCall(request)


# Only members can be rung, so the admin and the non-member pass the read-call check and then meet the
# RPC's own answer: nobody rang them (FAILED_PRECONDITION NOT_RINGING).
@row(
    "RingService", "AcceptCall",
    server=OK, admin=FAILED_PRECONDITION, host=OK, member=OK, nonmember=FAILED_PRECONDITION,
    other=TEAM, blocked=BLOCKED,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    if cx.me in (UID["host"], UID["member"]):
        await cx.ring(call_id, cx.someone_else, [cx.me])
    return await cx.s.rings.AcceptCall(
        ring_service_pb2.AcceptCallRequest(type=TYPE, id=call_id, user_id=cx.me)
    )


# The caller cancels its own ring (any t1 user may ring, members or not).
@row("RingService", "RejectCall", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    if cx.principal in IN_CALL:
        callee = UID["host"] if cx.me == UID["member"] else UID["member"]
        await cx.ring(call_id, cx.me, [callee])
    request = ring_service_pb2.RejectCallRequest(
        type=TYPE, id=call_id, user_id=cx.me, reason=ring_service_pb2.REJECT_REASON_CANCEL
    )
    return await cx.s.rings.RejectCall(request)


@row(
    "RingService", "RejectCall", variant="as-other",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    callee = cx.someone_else
    caller = UID["host"] if callee == UID["member"] else UID["member"]
    await cx.ring(call_id, caller, [callee])
    request = ring_service_pb2.RejectCallRequest(
        type=TYPE, id=call_id, user_id=callee, reason=ring_service_pb2.REJECT_REASON_DECLINE
    )
    return await cx.s.rings.RejectCall(request)


# CallDataService ----------------------------------------------------------------------------------------


# Own participant, as oneself: the t2 and blocked users name themselves and a participant that is not
# theirs, so the call check or the ownership check refuses them.
@row(
    "CallDataService", "UpdateParticipantCustom",
    server=OK, admin=OK, host=OK, member=OK, nonmember=OK,
    other=Denied(("TEAM_MISMATCH", "NOT_OWN_PARTICIPANT")),
    blocked=Denied(("USER_BLOCKED", "NOT_OWN_PARTICIPANT")),
)  # fmt: skip
async def _(cx: Cell) -> Any:
    psid = await cx.own_participant()
    request = call_data_service_pb2.UpdateParticipantCustomRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, user_id=cx.me, custom=struct({"k": 1})
    )
    return await cx.s.data.UpdateParticipantCustom(request)


@row(
    "CallDataService", "UpdateParticipantCustom", variant="others",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    request = call_data_service_pb2.UpdateParticipantCustomRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, user_id=EXTRA, custom=struct({"k": 1})
    )
    return await cx.s.data.UpdateParticipantCustom(request)


# A live participant of the session, as oneself (t2 and blocked users are refused by the call check).
@row(
    "CallDataService", "UpdateSessionCustom",
    server=OK, admin=OK, host=OK, member=OK, nonmember=OK, other=TEAM, blocked=BLOCKED,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    if cx.principal in IN_CALL:
        await cx.own_participant()
    request = call_data_service_pb2.UpdateSessionCustomRequest(
        type=TYPE,
        id=SHARED,
        user_id=cx.me,
        mode=session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
        custom=struct({cx.principal: new_id("v")}),
    )
    return await cx.s.data.UpdateSessionCustom(request)


@row("CallDataService", "SendCallEvent", **by_capability("create-reaction"))
async def _(cx: Cell) -> Any:
    request = call_data_service_pb2.SendCallEventRequest(
        type=TYPE, id=SHARED, user_id=cx.me, custom=struct({"hello": cx.principal}), request_id=new_id("r")
    )
    return await cx.s.data.SendCallEvent(request)


@row(
    "CallDataService", "SendCallEvent", variant="as-other",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    request = call_data_service_pb2.SendCallEventRequest(
        type=TYPE, id=SHARED, user_id=cx.someone_else, custom=struct({"hello": cx.principal})
    )
    return await cx.s.data.SendCallEvent(request)


@row("CallDataService", "PinParticipant", **by_capability("pin-for-everyone"))
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    request = call_data_service_pb2.PinParticipantRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, user_id=EXTRA
    )
    return await cx.s.data.PinParticipant(request)


@row("CallDataService", "UnpinParticipant", **by_capability("pin-for-everyone"))
async def _(cx: Cell) -> Any:
    psid = await cx.join(EXTRA)
    await cx.pin(psid, EXTRA)
    request = call_data_service_pb2.UnpinParticipantRequest(
        type=TYPE, id=SHARED, participant_session_id=psid, user_id=EXTRA
    )
    return await cx.s.data.UnpinParticipant(request)


# EventService (server streams: the first message or the error) -----------------------------------------


def _is_snapshot(cx: Cell, message: Any) -> None:
    assert message.WhichOneof("message") == "snapshot", message


@row("EventService", "WatchCall", check=_is_snapshot, **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    return await cx.first(
        cx.s.events.WatchCall(event_service_pb2.WatchCallRequest(type=TYPE, id=SHARED, snapshot=True))
    )


# Holding presence needs one's own participant besides read-call.
@row("EventService", "WatchCall", variant="presence", **OWN_PARTICIPANT)
async def _(cx: Cell) -> Any:
    psid = await cx.own_participant()
    request = event_service_pb2.WatchCallRequest(
        type=TYPE, id=SHARED, snapshot=True, participant_session_id=psid
    )
    return await cx.first(cx.s.events.WatchCall(request))


@row("EventService", "WatchUser", **everyone())
async def _(cx: Cell) -> Any:
    return await cx.first(cx.s.events.WatchUser(event_service_pb2.WatchUserRequest(user_id=cx.me)))


@row(
    "EventService", "WatchUser", variant="others",
    server=OK, admin=NOT_YOURSELF, host=NOT_YOURSELF, member=NOT_YOURSELF, nonmember=NOT_YOURSELF,
    other=NOT_YOURSELF, blocked=NOT_YOURSELF,
)  # fmt: skip
async def _(cx: Cell) -> Any:
    return await cx.first(cx.s.events.WatchUser(event_service_pb2.WatchUserRequest(user_id=cx.someone_else)))


# Interpretation of "user tokens must list call_cids": the request's call_cids filter, each call readable.
@row("EventService", "SubscribeEvents", variant="call", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    request = event_service_pb2.SubscribeEventsRequest(call_cids=[f"{TYPE}:{SHARED}"])
    return await cx.first(cx.s.events.SubscribeEvents(request))


@row("EventService", "SubscribeEvents", variant="all", **admins_only())
async def _(cx: Cell) -> Any:
    return await cx.first(cx.s.events.SubscribeEvents(event_service_pb2.SubscribeEventsRequest()))


# ModerationService --------------------------------------------------------------------------------------


@row("ModerationService", "UpdateUserPermissions", **by_capability("update-call-permissions"))
async def _(cx: Cell) -> Any:
    request = moderation_service_pb2.UpdateUserPermissionsRequest(
        type=TYPE, id=SHARED, user_id=EXTRA, grant_permissions=["pin-for-everyone"]
    )
    return await cx.s.moderation.UpdateUserPermissions(request)


# Users ask for themselves (read-call). The request names no user, so a server token asks on nobody's
# behalf: it passes (it may do everything) and nothing is sent — the server's documented no-op.
@row("ModerationService", "RequestPermission", **by_capability("read-call"))
async def _(cx: Cell) -> Any:
    request = moderation_service_pb2.RequestPermissionRequest(
        type=TYPE, id=SHARED, permissions=["pin-for-everyone"]
    )
    return await cx.s.moderation.RequestPermission(request)


@row("ModerationService", "BlockUser", **by_capability("block-users"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    request = moderation_service_pb2.BlockUserRequest(type=TYPE, id=call_id, user_id=EXTRA)
    return await cx.s.moderation.BlockUser(request)


@row("ModerationService", "UnblockUser", **by_capability("block-users"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    await cx.block(call_id, EXTRA)
    request = moderation_service_pb2.UnblockUserRequest(type=TYPE, id=call_id, user_id=EXTRA)
    return await cx.s.moderation.UnblockUser(request)


@row("ModerationService", "KickUser", **by_capability("kick-user"))
async def _(cx: Cell) -> Any:
    call_id = await cx.fresh_call()
    await cx.join(EXTRA, call_id)
    request = moderation_service_pb2.KickUserRequest(type=TYPE, id=call_id, user_id=EXTRA)
    return await cx.s.moderation.KickUser(request)


@row("ModerationService", "KickUser", variant="block", **by_capability("kick-user"))
async def _(cx: Cell) -> Any:
    # The host holds kick-user and block-users; plain users hold neither, kick-user is checked first.
    call_id = await cx.fresh_call()
    await cx.join(EXTRA, call_id)
    request = moderation_service_pb2.KickUserRequest(type=TYPE, id=call_id, user_id=EXTRA, block=True)
    return await cx.s.moderation.KickUser(request)


# -- the tests -----------------------------------------------------------------------------------------


async def test_every_rpc_has_a_row(server: RunningServer) -> None:
    """Every RPC the real server registers (health and reflection aside) has a row, every row an RPC."""
    registered = {
        m for m in server.server.rpc_methods if not m.startswith(("/grpc.health.", "/grpc.reflection."))
    }
    rows = {r.method for r in ROWS}
    assert registered, "the server registered nothing"
    assert registered - rows == set(), "RPCs without a row in the matrix"
    assert rows - registered == set(), "rows for RPCs the server does not serve"
    assert len({r.id for r in ROWS}) == len(ROWS), "duplicate row ids"


def _describe(expected: Expected) -> str:
    if isinstance(expected, Denied):
        capability = f" ({expected.capability})" if expected.capability else ""
        return f"PERMISSION_DENIED {'/'.join(expected.reasons)}{capability}"
    return expected.name


# WebhookService -----------------------------------------------------------------------------------------

WEBHOOK_URL = "https://93.184.216.34/hooks"  # never contacted: the matrix server delivers nothing


@row("WebhookService", "CreateWebhook", **admins_only())
async def _(cx: Cell) -> Any:
    return await cx.s.webhooks.CreateWebhook(webhook_service_pb2.CreateWebhookRequest(url=WEBHOOK_URL))


@row("WebhookService", "GetWebhook", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.GetWebhook(webhook_service_pb2.GetWebhookRequest(id=webhook_id))


@row("WebhookService", "ListWebhooks", **admins_only())
async def _(cx: Cell) -> Any:
    return await cx.s.webhooks.ListWebhooks(webhook_service_pb2.ListWebhooksRequest())


@row("WebhookService", "UpdateWebhook", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.UpdateWebhook(
        webhook_service_pb2.UpdateWebhookRequest(id=webhook_id, description="changed")
    )


@row("WebhookService", "DeleteWebhook", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.DeleteWebhook(webhook_service_pb2.DeleteWebhookRequest(id=webhook_id))


@row("WebhookService", "RotateWebhookSecret", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.RotateWebhookSecret(
        webhook_service_pb2.RotateWebhookSecretRequest(id=webhook_id)
    )


# An ACTIVE endpoint: whoever may resume it learns that it is not FAILING.
@row(
    "WebhookService",
    "ResumeWebhook",
    **{
        **admins_only(),
        "server": grpc.StatusCode.FAILED_PRECONDITION,
        "admin": grpc.StatusCode.FAILED_PRECONDITION,
    },
)
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.ResumeWebhook(webhook_service_pb2.ResumeWebhookRequest(id=webhook_id))


@row("WebhookService", "ListWebhookDeliveries", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.ListWebhookDeliveries(
        webhook_service_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id)
    )


@row("WebhookService", "RedeliverWebhook", **admins_only())
async def _(cx: Cell) -> Any:
    webhook_id = await cx.fresh_webhook()
    return await cx.s.webhooks.RedeliverWebhook(
        webhook_service_pb2.RedeliverWebhookRequest(id=webhook_id, after_position=0)
    )


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("case", ROWS, ids=[r.id for r in ROWS])
async def test_authz_cell(world: World, case: Row, principal: str) -> None:
    expected = case.expect[principal]
    if principal == "blocked" and world.setup_problems:
        pytest.fail("; ".join(world.setup_problems), pytrace=False)
    cx = Cell(world, principal)
    want = _describe(expected)
    try:
        response = await case.act(cx)
    except grpc.aio.AioRpcError as error:
        got = decode(error)
        got_text = f"{got.code.name} {got.reason}: {got.message}"
        if isinstance(expected, Denied):
            assert got.code == grpc.StatusCode.PERMISSION_DENIED, f"want {want}, got {got_text}"
            assert got.info is not None and got.info.domain == DOMAIN, f"no callplane ErrorInfo: {got_text}"
            assert got.reason in expected.reasons, f"want {want}, got {got_text}"
            if expected.capability:
                assert got.metadata.get("capability") == expected.capability, f"want {want}, got {got_text}"
        else:
            assert got.code == expected, f"want {want}, got {got_text}"
            if principal in UNAUTHENTICATED:
                assert got.reason == UNAUTHENTICATED[principal], got_text
        return
    except TimeoutError:
        pytest.fail(f"want {want}, got no message within 5 s", pytrace=False)
    assert expected == OK, f"want {want}, got OK"
    if case.check is not None:
        case.check(cx, response)
