"""Read-your-writes across replicas: two `callplane serve` processes on one PostgreSQL database, each with
its own call cache (on SQLite, one process: its cache must forget what its own writes changed).

Every test first reads through replica B (filling B's cache, for a server token and a user token), then
changes something through replica A, then reads through B at once: B must answer with the change, for
every kind of change a rendered call or a caller's capabilities depend on (the call, its members, users,
teams, call types and their grants, per-call permissions, blocks, deletion).

A cache that trusted its entries would fail every one of these on PostgreSQL (B never hears of A's
writes before the read); they hold because B checks each entry with one statement before using it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from callplane.v1 import (
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    moderation_service_pb2,
    moderation_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from tests.support import channel, fresh_database, serve_subprocess, serving_port, struct, user_token


async def _serve(database_url: str, data_dir: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`callplane serve` on the database in a process of its own, and its port."""
    process = await serve_subprocess(data_dir, "--database-url", database_url)
    port, _lines = await serving_port(process)
    assert process.stderr is not None
    # Keep reading its log, or the pipe fills and the server blocks on writing it.
    asyncio.get_running_loop().create_task(_drain(process.stderr))
    return process, port


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@dataclass(eq=False)
class Replica:
    target: str
    channels: dict[str | None, grpc.aio.Channel]

    def _channel(self, token: str | None) -> grpc.aio.Channel:
        if token not in self.channels:
            self.channels[token] = channel(self.target, token) if token else channel(self.target)
        return self.channels[token]

    def calls(self, token: str | None = None) -> call_service_pb2_grpc.CallServiceStub:
        return call_service_pb2_grpc.CallServiceStub(self._channel(token))

    def stub(self, factory: type) -> Any:
        return factory(self._channel(None))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def replicas(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two server processes on PostgreSQL; on SQLite (one process per database) the same process twice,
    whose cache then learns of its own changes."""
    folder = tmp_path_factory.mktemp("replicas")
    async with fresh_database(backend, folder) as url:
        started = [
            await _serve(url, folder / name) for name in ("a", "b")[: 2 if backend == "postgres" else 1]
        ]
        pair = tuple(Replica(f"127.0.0.1:{port}", {}) for _process, port in started)
        if len(pair) == 1:
            pair = (pair[0], pair[0])
        try:
            yield pair  # type: ignore[misc]
        finally:
            for replica in set(pair):
                for opened in replica.channels.values():
                    await opened.close()
            for process, _port in started:
                process.terminate()
                await process.wait()


_serial = 0


def _unique(prefix: str) -> str:
    global _serial
    _serial += 1
    return f"{prefix}-{_serial}"


async def _users(replica: Replica, *users: user_pb2.UserRequest) -> None:
    stub = replica.stub(user_pb2_grpc.UserServiceStub)
    await stub.UpsertUsers(user_pb2.UpsertUsersRequest(users=list(users)))


async def _call(replica: Replica, members: list[str], *, team: str = "") -> str:
    call_id = _unique("c")
    await replica.calls().GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                created_by_id=members[0],
                members=[call_pb2.MemberRequest(user_id=m) for m in members],
                team=team,
            ),
        )
    )
    return call_id


def _get(call_id: str) -> call_service_pb2.GetCallRequest:
    return call_service_pb2.GetCallRequest(type="default", id=call_id)


async def _warm(replica: Replica, call_id: str, *tokens: str | None) -> None:
    """Reads the call through `replica` twice per caller, so its cache holds it for each."""
    for token in tokens:
        for _ in range(2):
            await replica.calls(token).GetCall(_get(call_id))
            await replica.calls(token).QueryMembers(
                call_service_pb2.QueryMembersRequest(type="default", id=call_id)
            )


async def _query_as(
    replica: Replica, user_id: str, call_id: str, call_type: str = "default"
) -> call_service_pb2.QueryCallsResponse:
    """QueryCalls for one call, as the user (twice: the second may be served from what the first kept)."""
    request = call_service_pb2.QueryCallsRequest(filter_conditions=struct({"id": call_id, "type": call_type}))
    await replica.calls(user_token(user_id)).QueryCalls(request)
    return await replica.calls(user_token(user_id)).QueryCalls(request)


async def _denied(replica: Replica, token: str, call_id: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.calls(token).GetCall(_get(call_id))
    return refused.value.code()


async def test_a_call_change_through_one_replica_is_read_through_the_other(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    host = _unique("u")
    await _users(a, user_pb2.UserRequest(id=host))
    call_id = await _call(a, [host])
    await _warm(b, call_id, None, user_token(host))
    for n in range(5):
        await a.calls().UpdateCall(
            call_service_pb2.UpdateCallRequest(type="default", id=call_id, set_custom=struct({"n": n}))
        )
        assert (await b.calls().GetCall(_get(call_id))).call.custom["n"] == n
        assert (await b.calls(user_token(host)).GetCall(_get(call_id))).call.custom["n"] == n
        found = await b.calls().GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id)
        )
        assert found.call.custom["n"] == n and not found.created
        page = await b.calls().QueryCalls(
            call_service_pb2.QueryCallsRequest(filter_conditions=struct({"id": call_id}))
        )
        assert [c.call.custom["n"] for c in page.calls] == [n]


async def test_member_changes_are_read_through_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    host, guest, late = (_unique("u") for _ in range(3))
    await _users(a, *(user_pb2.UserRequest(id=u) for u in (host, guest, late)))
    call_id = await _call(a, [host, guest])
    await _warm(b, call_id, None, user_token(guest))
    before = set((await b.calls(user_token(guest)).GetCall(_get(call_id))).own_capabilities)
    assert "end-call" not in before

    await a.calls().UpdateCallMembers(
        call_service_pb2.UpdateCallMembersRequest(
            type="default",
            id=call_id,
            update_members=[
                call_pb2.MemberRequest(user_id=late),
                call_pb2.MemberRequest(user_id=guest, role="host"),
            ],
        )
    )
    seen = await b.calls().GetCall(_get(call_id))
    assert {m.user_id for m in seen.members} == {host, guest, late}
    listed = await b.calls().QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
    assert {m.user_id: m.role for m in listed.members}[guest] == "host"
    # The member's new call role grants the host's capabilities at once.
    assert "end-call" in (await b.calls(user_token(guest)).GetCall(_get(call_id))).own_capabilities

    await a.calls().UpdateCallMembers(
        call_service_pb2.UpdateCallMembersRequest(type="default", id=call_id, remove_members=[late])
    )
    assert {m.user_id for m in (await b.calls().GetCall(_get(call_id))).members} == {host, guest}


async def test_user_changes_are_read_through_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    host, guest = _unique("u"), _unique("u")
    await _users(a, user_pb2.UserRequest(id=host, name="Old"), user_pb2.UserRequest(id=guest))
    call_id = await _call(a, [host])
    await _warm(b, call_id, None, user_token(guest))
    assert "end-call" not in (await b.calls(user_token(guest)).GetCall(_get(call_id))).own_capabilities

    # The member's user as rendered in the call.
    await _users(a, user_pb2.UserRequest(id=host, name="New"))
    (member,) = (await b.calls().GetCall(_get(call_id))).members
    assert member.user.name == "New"
    listed = await b.calls().QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
    assert [m.user.name for m in listed.members] == ["New"]

    # The caller's global role.
    await _users(a, user_pb2.UserRequest(id=guest, role="admin"))
    assert "end-call" in (await b.calls(user_token(guest)).GetCall(_get(call_id))).own_capabilities

    # Deleting the member's user removes the membership.
    await a.stub(user_pb2_grpc.UserServiceStub).DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[host]))
    assert not (await b.calls().GetCall(_get(call_id))).members


async def test_team_changes_are_read_through_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    member = _unique("u")
    team = _unique("team")
    await _users(a, user_pb2.UserRequest(id=member, teams=[team]))
    call_id = await _call(a, [member], team=team)
    await _warm(b, call_id, user_token(member))
    assert [c.call.id for c in (await _query_as(b, member, call_id)).calls] == [call_id]
    await _users(a, user_pb2.UserRequest(id=member, teams=[]))
    assert await _denied(b, user_token(member), call_id) == grpc.StatusCode.PERMISSION_DENIED
    assert not (await _query_as(b, member, call_id)).calls
    await _users(a, user_pb2.UserRequest(id=member, teams=[team]))
    assert (await b.calls(user_token(member)).GetCall(_get(call_id))).call.id == call_id


async def test_call_type_changes_are_read_through_the_other_replica(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    name = _unique("type").replace("-", "_")
    types = a.stub(call_type_service_pb2_grpc.CallTypeServiceStub)
    await types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    member = _unique("u")
    await _users(a, user_pb2.UserRequest(id=member))
    call_id = _unique("c")
    await a.calls().GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=name,
            id=call_id,
            data=call_service_pb2.CallData(
                created_by_id=member, members=[call_pb2.MemberRequest(user_id=member)]
            ),
        )
    )
    get = call_service_pb2.GetCallRequest(type=name, id=call_id)
    for _ in range(2):
        await b.calls().GetCall(get)
        mine = await b.calls(user_token(member)).GetCall(get)
    assert "read-call" in mine.own_capabilities and "end-call" not in mine.own_capabilities

    # Settings: the call's effective settings follow its type's.
    await types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(
            name=name,
            settings=call_type_pb2.CallSettings(audio=call_type_pb2.AudioSettings(mic_default_on=True)),
        )
    )
    assert (await b.calls().GetCall(get)).call.settings.audio.mic_default_on

    # Grants: what a member may do follows its type's grants.
    await types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(
            name=name,
            grants={"call_member": call_type_pb2.Capabilities(capabilities=["read-call", "end-call"])},
        )
    )
    assert "end-call" in (await b.calls(user_token(member)).GetCall(get)).own_capabilities
    (listed,) = (await _query_as(b, member, call_id, name)).calls
    assert "end-call" in listed.own_capabilities and listed.call.settings.audio.mic_default_on
    await types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(
            name=name,
            grants={
                "call_member": call_type_pb2.Capabilities(capabilities=[]),
                "user": call_type_pb2.Capabilities(capabilities=[]),
            },
        )
    )
    assert await _denied_on(b, user_token(member), get) == grpc.StatusCode.PERMISSION_DENIED
    assert not (await _query_as(b, member, call_id, name)).calls


async def _denied_on(
    replica: Replica, token: str, request: call_service_pb2.GetCallRequest
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.calls(token).GetCall(request)
    return refused.value.code()


async def test_permission_changes_and_blocks_are_read_through_the_other_replica(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    host, guest = _unique("u"), _unique("u")
    await _users(a, user_pb2.UserRequest(id=host), user_pb2.UserRequest(id=guest))
    call_id = await _call(a, [host, guest])
    await _warm(b, call_id, user_token(guest))
    moderation = a.stub(moderation_service_pb2_grpc.ModerationServiceStub)
    await moderation.UpdateUserPermissions(
        moderation_service_pb2.UpdateUserPermissionsRequest(
            type="default", id=call_id, user_id=guest, grant_permissions=["end-call"]
        )
    )
    assert "end-call" in (await b.calls(user_token(guest)).GetCall(_get(call_id))).own_capabilities
    await moderation.BlockUser(
        moderation_service_pb2.BlockUserRequest(type="default", id=call_id, user_id=guest)
    )
    assert await _denied(b, user_token(guest), call_id) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_deleted_call_is_gone_on_the_other_replica(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    host = _unique("u")
    await _users(a, user_pb2.UserRequest(id=host))
    call_id = await _call(a, [host])
    await _warm(b, call_id, None)
    await a.calls().DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id, hard=True))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await b.calls().GetCall(_get(call_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # Recreated under the same id: the new call, not the cached old one.
    await a.calls().GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default", id=call_id, data=call_service_pb2.CallData(custom=struct({"second": True}))
        )
    )
    assert (await b.calls().GetCall(_get(call_id))).call.custom["second"] is True
