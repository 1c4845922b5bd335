"""What `make bench` measures: each row's requests, how they are sent, and the events they must append.

Reads and writes whose every request appends an event with the same body (SendCallEvent) go through h2load,
which repeats one body. Writes that would change nothing on a repeated body (UpdateCall,
UpdateParticipantCustom) or cannot repeat it (GetOrCreateCall creating a call, JoinCall with a new
participant_session_id) go through the generator (tests/bench/generator.py), which puts a new number in
every request. A no-op UpdateCall (setting the stored values again) is a row of its own.

Each write row says which events every OK reply of its methods appends; the bench counts rows of the
`events` table before and after (the bench owns its database) and fails unless they grew by at least that
much. A row that must not write (the no-op, the reads) names the events that must not grow at all.

`prepare` sets the stage after seeding: the no-op's values stored once, a participant holding a lease for
UpdateParticipantCustom, another one keeping the JoinCall/LeaveCall call's session running (both renewed
by `keep_alive` while the bench runs), and one real reply of each measured method for the reference
server to answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from callplane.v1 import (
    call_data_service_pb2,
    call_data_service_pb2_grpc,
    call_pb2,
    call_service_pb2,
    call_service_pb2_grpc,
    query_pb2,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)
from tests.bench import h2load
from tests.bench.generator import MARKER, Step, step
from tests.bench.servers import CALL_TYPE, call_id, custom_for, user_id
from tests.support import struct

CALL_SERVICE = "/callplane.v1.CallService/"
GET_CALL = CALL_SERVICE + "GetCall"
GET_OR_CREATE_CALL = CALL_SERVICE + "GetOrCreateCall"
UPDATE_CALL = CALL_SERVICE + "UpdateCall"
UPDATE_CALL_MEMBERS = CALL_SERVICE + "UpdateCallMembers"
QUERY_CALLS = CALL_SERVICE + "QueryCalls"
QUERY_MEMBERS = CALL_SERVICE + "QueryMembers"
SEND_CALL_EVENT = "/callplane.v1.CallDataService/SendCallEvent"
UPDATE_PARTICIPANT_CUSTOM = "/callplane.v1.CallDataService/UpdateParticipantCustom"
JOIN_CALL = "/callplane.v1.SessionService/JoinCall"
LEAVE_CALL = "/callplane.v1.SessionService/LeaveCall"

#: Holds a lease on the UpdateParticipantCustom call, and keeps the JoinCall/LeaveCall call's session
#: running (so the pairs measure joining a running session, not starting one each time).
HOLDER = "bench-holder"
ANCHOR = "bench-anchor"
#: The no-op UpdateCall's values (stored once before it is measured).
NO_OP_CUSTOM = {"host.tier": "pro", "bump": 1}
MIN_CALLS = 12


@dataclass(frozen=True)
class Expect:
    """Every OK reply of `method` appends `per_request` events of `event_type` (on `call_cid`, or on any
    call when None)."""

    method: str
    event_type: str
    per_request: int = 1
    call_cid: str | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    loader: str  # "h2load" (one body, repeated) or "generator" (a new number in every item)
    steps: tuple[Step, ...]  # h2load: one step, a fixed body
    description: str
    expects: tuple[Expect, ...] = ()
    # (call_cid, event_type) that must not grow at all during the row (a no-op, a read).
    unchanged: tuple[tuple[str, str], ...] = ()
    unit: str = "req/s"

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(s.method for s in self.steps))

    def h2load_body(self) -> bytes:
        (only,) = self.steps
        if only.varies():
            raise ValueError(f"{self.name}: h2load sends one body; this one varies")
        return b"\x00" + len(only.template).to_bytes(4, "big") + only.template


def cid(index: int) -> str:
    return f"{CALL_TYPE}:{call_id(index)}"


@dataclass
class Stage:
    """Where each row writes, and who acts (see `prepare`)."""

    calls: int
    users: int
    hot: int = 0  # the read rows' call
    no_op: int = 0
    update: int = 0
    send: int = 0
    participant: int = 0  # UpdateParticipantCustom: HOLDER is joined here
    join: int = 0  # JoinCall + LeaveCall: ANCHOR is joined here
    replies: dict[str, bytes] = field(default_factory=dict)
    lease_ttl_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.calls < MIN_CALLS:
            raise SystemExit(f"--calls must be at least {MIN_CALLS}")
        self.hot = self.calls // 2
        self.no_op, self.update, self.send, self.participant, self.join = (self.hot + k for k in range(1, 6))

    def member(self, index: int, k: int = 1) -> str:
        """The k-th member of seeded call `index` (k=0 is its host; see servers.seed)."""
        return user_id((index * 5 + k) % self.users)


#: What a read must not append, on any call: a read that wrote (created, updated a call or a member)
#: would append one of these.
READS_WRITE_NOTHING: tuple[tuple[str | None, str], ...] = tuple(
    (None, event_type)
    for event_type in ("call.created", "call.updated", "call.member_added", "call.member_updated")
)
#: The custom values the issue-13 QueryCalls rows look for (see servers.custom_for): a fifth of the calls
#: are in region "eu"; one call in 1,000 has owner "team-42", and one in 1,000 team "t-42".
BROAD_REGION = "eu"
SELECTIVE_OWNER = "team-42"
SELECTIVE_TEAM = "t-42"
NEWEST_FIRST = (query_pb2.SortParam(field="created_at", direction=query_pb2.SORT_DIRECTION_DESC),)


def newest_calls(filter_conditions: dict[str, Any], limit: int = 25) -> call_service_pb2.QueryCallsRequest:
    """QueryCalls of the newest calls matching a filter (sorted by created_at desc)."""
    return call_service_pb2.QueryCallsRequest(
        filter_conditions=struct(filter_conditions), sort=list(NEWEST_FIRST), limit=limit
    )


QUERY_CALLS_BROAD = newest_calls({"custom.region": BROAD_REGION})
QUERY_CALLS_SELECTIVE = newest_calls({"custom.owner": SELECTIVE_OWNER})
QUERY_CALLS_SELECTIVE_INDEXED = newest_calls({"custom.team": SELECTIVE_TEAM})


def read(name: str, method: str, request: Message, description: str) -> Workload:
    """A read row: h2load repeating one request, proven to append none of READS_WRITE_NOTHING."""
    return Workload(name, "h2load", (step(method, request),), description, unchanged=READS_WRITE_NOTHING)


def workloads(stage: Stage) -> list[Workload]:
    hot = call_id(stage.hot)

    rows = [
        read(
            "GetCall",
            GET_CALL,
            call_service_pb2.GetCallRequest(type=CALL_TYPE, id=hot),
            "GetCall of a call with 5 members",
        ),
        read(
            "GetOrCreateCall",
            GET_OR_CREATE_CALL,
            call_service_pb2.GetOrCreateCallRequest(type=CALL_TYPE, id=hot),
            "GetOrCreateCall of an existing call",
        ),
        read(
            "QueryCalls",
            QUERY_CALLS,
            call_service_pb2.QueryCallsRequest(
                filter_conditions=struct({"custom.region": "eu", "custom.priority": {"$gte": 5}}),
                sort=[
                    query_pb2.SortParam(
                        field="custom.priority",
                        direction=query_pb2.SORT_DIRECTION_DESC,
                        type=query_pb2.SORT_TYPE_NUMBER,
                    )
                ],
                limit=25,
            ),
            "QueryCalls: custom filter and sort following the declared region,priority index, 25 per page",
        ),
        read(
            "QueryCalls broad",
            QUERY_CALLS,
            QUERY_CALLS_BROAD,
            'QueryCalls {"custom.region": "eu"} (20 % of calls) sorted by created_at desc, 25 per page; no '
            "declared index serves it",
        ),
        read(
            "QueryCalls selective",
            QUERY_CALLS,
            QUERY_CALLS_SELECTIVE,
            'QueryCalls {"custom.owner": "team-42"} (0.1 % of calls) sorted by created_at desc, 25 per page; '
            "no declared index",
        ),
        read(
            "QueryCalls selective indexed",
            QUERY_CALLS,
            QUERY_CALLS_SELECTIVE_INDEXED,
            'QueryCalls {"custom.team": "t-42"} (0.1 % of calls) sorted by created_at desc, 25 per page; '
            "declared index team:string",
        ),
        read(
            "QueryMembers",
            QUERY_MEMBERS,
            call_service_pb2.QueryMembersRequest(type=CALL_TYPE, id=hot, limit=25),
            "QueryMembers of a call",
        ),
        Workload(
            "SendCallEvent",
            "h2load",
            (
                step(
                    SEND_CALL_EVENT,
                    call_data_service_pb2.SendCallEventRequest(
                        type=CALL_TYPE,
                        id=call_id(stage.send),
                        user_id=stage.member(stage.send),
                        custom=struct({"kind": "reaction", "emoji": ":tada:"}),
                    ),
                ),
            ),
            "SendCallEvent to everyone (each request appends an event)",
            expects=(Expect(SEND_CALL_EVENT, "custom", 1, cid(stage.send)),),
        ),
        Workload(
            "UpdateCall",
            "generator",
            (
                step(
                    UPDATE_CALL,
                    call_service_pb2.UpdateCallRequest(
                        type=CALL_TYPE, id=call_id(stage.update), set_custom=struct({"bench_n": MARKER})
                    ),
                ),
            ),
            "UpdateCall setting a new custom value each time (with its call.updated event)",
            expects=(Expect(UPDATE_CALL, "call.updated", 1, cid(stage.update)),),
        ),
        Workload(
            "UpdateParticipantCustom",
            "generator",
            (
                step(
                    UPDATE_PARTICIPANT_CUSTOM,
                    call_data_service_pb2.UpdateParticipantCustomRequest(
                        type=CALL_TYPE,
                        id=call_id(stage.participant),
                        participant_session_id=HOLDER,
                        user_id=stage.member(stage.participant),
                        mode=session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
                        custom=struct({"bench_n": MARKER}),
                    ),
                ),
            ),
            "UpdateParticipantCustom with a new value each time",
            expects=(
                Expect(
                    UPDATE_PARTICIPANT_CUSTOM, "call.participant_custom_updated", 1, cid(stage.participant)
                ),
            ),
        ),
        Workload(
            "GetOrCreateCall create",
            "generator",
            (step(GET_OR_CREATE_CALL, create_request("gen-" + MARKER, stage)),),
            "GetOrCreateCall creating a new call with 5 members each time",
            expects=(Expect(GET_OR_CREATE_CALL, "call.created", 1),),
        ),
        Workload(
            "JoinCall+LeaveCall",
            "generator",
            (
                step(
                    JOIN_CALL,
                    session_service_pb2.JoinCallRequest(
                        type=CALL_TYPE,
                        id=call_id(stage.join),
                        user_id=stage.member(stage.join),
                        participant_session_id="p-" + MARKER,
                    ),
                ),
                step(
                    LEAVE_CALL,
                    session_service_pb2.LeaveCallRequest(
                        type=CALL_TYPE, id=call_id(stage.join), participant_session_id="p-" + MARKER
                    ),
                ),
            ),
            "JoinCall then LeaveCall of a new participant_session_id in a running session (pairs/s)",
            expects=(
                Expect(JOIN_CALL, "call.session_participant_joined", 1, cid(stage.join)),
                Expect(JOIN_CALL, "call.session_participant_count_updated", 1, cid(stage.join)),
                Expect(LEAVE_CALL, "call.session_participant_left", 1, cid(stage.join)),
                Expect(LEAVE_CALL, "call.session_participant_count_updated", 1, cid(stage.join)),
            ),
            unit="pairs/s",
        ),
        Workload(
            "UpdateCall no-op",
            "h2load",
            (
                step(
                    UPDATE_CALL,
                    call_service_pb2.UpdateCallRequest(
                        type=CALL_TYPE, id=call_id(stage.no_op), set_custom=struct(NO_OP_CUSTOM)
                    ),
                ),
            ),
            "UpdateCall setting the values the call already has (changes nothing, appends no event)",
            unchanged=((cid(stage.no_op), "call.updated"),),
        ),
    ]
    return rows


def create_request(new_id: str, stage: Stage) -> call_service_pb2.GetOrCreateCallRequest:
    members = [
        call_pb2.MemberRequest(user_id=user_id(k % stage.users), role="host" if k == 0 else "user")
        for k in range(5)
    ]
    return call_service_pb2.GetOrCreateCallRequest(
        type=CALL_TYPE,
        id=new_id,
        data=call_service_pb2.CallData(
            created_by_id=members[0].user_id, members=members, custom=custom_for(0)
        ),
    )


def h2load_reference_body(stage: Stage) -> bytes:
    """The reference row's request (GetCall of the hot call), as h2load sends it."""
    return h2load.grpc_body(call_service_pb2.GetCallRequest(type=CALL_TYPE, id=call_id(stage.hot)))


async def prepare(target: str, token: str, stage: Stage) -> None:
    """The no-op's values stored once, HOLDER and ANCHOR joined, and one real reply per measured method in
    `stage.replies` (what the reference server answers with)."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        calls = call_service_pb2_grpc.CallServiceStub(channel)
        data = call_data_service_pb2_grpc.CallDataServiceStub(channel)
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        replies: dict[str, Message] = {}
        replies[GET_CALL] = await calls.GetCall(
            call_service_pb2.GetCallRequest(type=CALL_TYPE, id=call_id(stage.hot)), metadata=metadata
        )
        await calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(
                type=CALL_TYPE, id=call_id(stage.no_op), set_custom=struct(NO_OP_CUSTOM)
            ),
            metadata=metadata,
        )
        replies[UPDATE_CALL] = await calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(
                type=CALL_TYPE, id=call_id(stage.update), set_custom=struct({"bench_n": "0" * 16})
            ),
            metadata=metadata,
        )
        replies[SEND_CALL_EVENT] = await data.SendCallEvent(
            call_data_service_pb2.SendCallEventRequest(
                type=CALL_TYPE,
                id=call_id(stage.send),
                user_id=stage.member(stage.send),
                custom=struct({"kind": "reaction", "emoji": ":tada:"}),
            ),
            metadata=metadata,
        )
        holder = await sessions.JoinCall(
            session_service_pb2.JoinCallRequest(
                type=CALL_TYPE,
                id=call_id(stage.participant),
                user_id=stage.member(stage.participant),
                participant_session_id=HOLDER,
            ),
            metadata=metadata,
        )
        stage.lease_ttl_seconds = holder.lease_ttl.ToTimedelta().total_seconds()
        replies[UPDATE_PARTICIPANT_CUSTOM] = await data.UpdateParticipantCustom(
            call_data_service_pb2.UpdateParticipantCustomRequest(
                type=CALL_TYPE,
                id=call_id(stage.participant),
                participant_session_id=HOLDER,
                user_id=stage.member(stage.participant),
                mode=session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE,
                custom=struct({"bench_n": "0" * 16}),
            ),
            metadata=metadata,
        )
        await sessions.JoinCall(
            session_service_pb2.JoinCallRequest(
                type=CALL_TYPE,
                id=call_id(stage.join),
                user_id=stage.member(stage.join, 0),
                participant_session_id=ANCHOR,
            ),
            metadata=metadata,
        )
        # A pair as the generator sends it (joining the running session, then leaving), for its replies.
        replies[JOIN_CALL] = await sessions.JoinCall(
            session_service_pb2.JoinCallRequest(
                type=CALL_TYPE,
                id=call_id(stage.join),
                user_id=stage.member(stage.join),
                participant_session_id="p-setup",
            ),
            metadata=metadata,
        )
        replies[LEAVE_CALL] = await sessions.LeaveCall(
            session_service_pb2.LeaveCallRequest(
                type=CALL_TYPE, id=call_id(stage.join), participant_session_id="p-setup"
            ),
            metadata=metadata,
        )
        replies[GET_OR_CREATE_CALL] = await calls.GetOrCreateCall(
            create_request("gen-setup", stage), metadata=metadata
        )
    stage.replies = {method: reply.SerializeToString() for method, reply in replies.items()}


@contextlib.asynccontextmanager
async def keep_alive(target: str, token: str, stage: Stage) -> AsyncIterator[None]:
    """Renews HOLDER's and ANCHOR's leases (KeepAlive, a third of the lease apart) until the block ends."""
    metadata = (("authorization", f"Bearer {token}"),)

    async def renew() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            while True:
                for index, participant in ((stage.participant, HOLDER), (stage.join, ANCHOR)):
                    await sessions.KeepAlive(
                        session_service_pb2.KeepAliveRequest(
                            type=CALL_TYPE, id=call_id(index), participant_session_id=participant
                        ),
                        metadata=metadata,
                        timeout=stage.lease_ttl_seconds / 3,
                    )
                await asyncio.sleep(stage.lease_ttl_seconds / 3)

    task = asyncio.ensure_future(renew())
    try:
        yield
    finally:
        if task.done():
            failure = task.exception()
            raise SystemExit(f"KeepAlive of the bench's participants failed: {failure!r}")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class EventCounter:
    """Counts rows of the `events` table by type (and call), straight from the bench's own database."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url

    async def counts(self, keys: list[tuple[str | None, str]]) -> dict[tuple[str | None, str], int]:
        if self._url.startswith("sqlite"):
            return await asyncio.to_thread(self._sqlite_counts, keys)
        return await self._postgres_counts(keys)

    def _sqlite_counts(self, keys: list[tuple[str | None, str]]) -> dict[tuple[str | None, str], int]:
        path = self._url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as connection:
            return {key: int(connection.execute(*_count_sql(key, "?")).fetchone()[0]) for key in keys}

    async def _postgres_counts(self, keys: list[tuple[str | None, str]]) -> dict[tuple[str | None, str], int]:
        import asyncpg
        from sqlalchemy.engine import make_url

        dsn = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(dsn)
        try:
            found = {}
            for key in keys:
                sql, parameters = _count_sql(key, "$")
                found[key] = int(await connection.fetchval(sql, *parameters))
            return found
        finally:
            await connection.close()


def _count_sql(key: tuple[str | None, str], style: str) -> tuple[str, tuple[Any, ...]]:
    call_cid, event_type = key
    first, second = ("?", "?") if style == "?" else ("$1", "$2")
    if call_cid is None:
        return f"SELECT count(*) FROM events WHERE type = {first}", (event_type,)
    return (
        f"SELECT count(*) FROM events WHERE type = {first} AND call_cid = {second}",
        (event_type, call_cid),
    )


def check_events(
    name: str,
    backend: str,
    workload: Workload,
    ok: dict[str, float],
    before: dict[tuple[str | None, str], int],
    after: dict[tuple[str | None, str], int],
) -> dict[str, Any]:
    """SystemExit unless every event the OK replies owe was appended, and nothing that must not grow
    grew. Returns what was checked (for the JSON)."""
    wanted: dict[tuple[str | None, str], float] = {}
    for expect in workload.expects:
        key = (expect.call_cid, expect.event_type)
        wanted[key] = wanted.get(key, 0.0) + ok.get(expect.method, 0.0) * expect.per_request
    checked: dict[str, Any] = {}
    for key, expected in wanted.items():
        grew = after[key] - before[key]
        label = f"{key[1]} on {key[0] or 'any call'}"
        checked[label] = {"expected_at_least": int(expected), "appended": grew}
        if expected <= 0:
            raise SystemExit(f"{name} on {backend}: no OK reply counted for {label}; nothing was measured")
        if grew < expected:
            raise SystemExit(
                f"{name} on {backend}: {grew} {label} events appended, but the server answered OK to "
                f"{expected:.0f} requests that each append one: the measured requests did not all write"
            )
    for call_cid, event_type in workload.unchanged:
        key = (call_cid, event_type)
        grew = after[key] - before[key]
        label = f"{event_type} on {call_cid or 'any call'}"
        checked[label] = {"expected": 0, "appended": grew}
        if grew:
            raise SystemExit(
                f"{name} on {backend}: {grew} {label} events appended; this row must not write "
                "(a no-op or a read)"
            )
    return checked


def event_keys(workload: Workload) -> list[tuple[str | None, str]]:
    keys: list[tuple[str | None, str]] = [(e.call_cid, e.event_type) for e in workload.expects]
    keys += list(workload.unchanged)
    return list(dict.fromkeys(keys))
