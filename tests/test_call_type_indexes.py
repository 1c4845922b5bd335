"""Custom-data indexes declared by call types, through the API on both databases: built in the background
(BUILDING, then READY, in the database's catalog), listed with their state, dropped once nothing declares
them; the planner uses a declared index; queries no index serves are logged once per shape, or refused
with INDEX_REQUIRED when the server requires indexes."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import event, text

from callplane.v1 import (
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_pb2,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    query_pb2,
)
from callplane_server.app import CallplaneServer
from callplane_server.config import Config
from callplane_server.domain.records import PageRequest, SortInput
from callplane_server.store import Store, Transaction
from callplane_server.store.custom_indexes import parse_custom_index, query_shape
from tests.errors import expect_error
from tests.support import (
    TEST_SECRET,
    RunningServer,
    TestClock,
    channel,
    eventually,
    running_server,
    struct,
)

BUILDING = call_type_pb2.CUSTOM_INDEX_STATE_BUILDING
READY = call_type_pb2.CUSTOM_INDEX_STATE_READY
MANAGER_LOG = "callplane_server.store.index_manager"


def fresh_key(prefix: str = "k") -> str:
    """A custom-data key no other test uses (the module's tests share one database)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def type_name() -> str:
    return f"ix-{uuid.uuid4().hex[:10]}"


async def catalog(server: RunningServer) -> set[str]:
    """Index names on the calls table, from the database's own catalog."""
    statement = (
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'calls'"
        if server.backend == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'calls'"
    )
    async with server.server.store.database.write_engine.connect() as connection:
        return set((await connection.exec_driver_sql(statement)).scalars())


async def index_rows(server: RunningServer) -> dict[str, str]:
    async with server.server.store.database.write_engine.connect() as connection:
        rows = await connection.execute(text("SELECT name, state FROM custom_indexes"))
        return {row.name: row.state for row in rows}


async def declared(stub: Any, name: str) -> list[call_type_pb2.CustomIndex]:
    reply = await stub.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))
    return list(reply.call_type.custom_indexes)


async def ready(stub: Any, name: str) -> bool:
    indexes = await declared(stub, name)
    return bool(indexes) and all(index.state == READY for index in indexes)


def specs_update(name: str, *specs: str) -> call_type_service_pb2.UpdateCallTypeRequest:
    return call_type_service_pb2.UpdateCallTypeRequest(
        name=name, custom_indexes=call_type_service_pb2.CustomIndexSpecs(specs=list(specs))
    )


# --- lifecycle through the API -----------------------------------------------------------------------


async def test_a_declared_index_is_built_listed_and_dropped(
    server: RunningServer, call_types, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=MANAGER_LOG)
    key = fresh_key("owner")
    spec = f"{key}:string"
    index = parse_custom_index(spec)
    name = type_name()
    created = await call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=name, custom_indexes=[f"custom.{key}:string:asc"])
    )
    (listed,) = created.call_type.custom_indexes
    assert (listed.spec, listed.name, listed.state) == (spec, index.name, BUILDING)

    await eventually(lambda: ready(call_types, name))
    (built,) = await declared(call_types, name)
    assert built.HasField("build_duration") and built.HasField("writes_blocked")
    built_logs = [
        r.getMessage() for r in caplog.records if r.name == MANAGER_LOG and index.name in r.getMessage()
    ]
    if server.backend == "postgres":
        assert built.writes_blocked.ToTimedelta().total_seconds() == 0  # CONCURRENTLY: writes go on
        assert any("built concurrently" in message for message in built_logs), built_logs
    else:
        assert any("SQLite blocked writes for" in message for message in built_logs), built_logs
    everything = await call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
    (in_list,) = [t for t in everything.call_types if t.name == name]
    assert [(i.spec, i.state) for i in in_list.custom_indexes] == [(spec, READY)]
    assert index.name in await catalog(server)

    # Settings-only updates keep the declared indexes.
    kept = await call_types.UpdateCallType(call_type_service_pb2.UpdateCallTypeRequest(name=name))
    assert [i.spec for i in kept.call_type.custom_indexes] == [spec]

    updated = await call_types.UpdateCallType(specs_update(name))
    assert list(updated.call_type.custom_indexes) == []

    async def dropped() -> bool:
        return index.name not in await catalog(server) and index.name not in await index_rows(server)

    await eventually(dropped)


async def test_an_index_two_call_types_declare_stays_until_neither_does(
    server: RunningServer, call_types
) -> None:
    spec = f"{fresh_key('team')}:string,{fresh_key('rank')}:number:desc"
    index = parse_custom_index(spec)
    first, second = type_name(), type_name()
    for name in (first, second):
        await call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(name=name, custom_indexes=[spec])
        )
    await eventually(lambda: ready(call_types, first))
    assert await ready(call_types, second)

    # The first undeclares it: the second still declares it, so it is neither dropping nor dropped.
    await call_types.UpdateCallType(specs_update(first))
    assert (await index_rows(server))[index.name] == "READY"
    assert index.name in await catalog(server)
    assert await ready(call_types, second)

    # Deleting the second call type removes the last declaration.
    await call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=second))

    async def dropped() -> bool:
        return index.name not in await catalog(server) and index.name not in await index_rows(server)

    await eventually(dropped)

    # Declared again later: built again.
    await call_types.UpdateCallType(specs_update(first, spec))
    await eventually(lambda: ready(call_types, first))
    assert index.name in await catalog(server)


async def test_invalid_specs_are_refused_naming_each(call_types) -> None:
    await expect_error(
        call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=type_name(), custom_indexes=["region", "ok:string", "custom.ok:string", "x:text"]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["custom_indexes[0]", "custom_indexes[2]", "custom_indexes[3]"],
    )
    name = type_name()
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    await expect_error(
        call_types.UpdateCallType(specs_update(name, "a..b:number")),
        grpc.StatusCode.INVALID_ARGUMENT,
        fields=["custom_indexes.specs[0]"],
    )
    assert await declared(call_types, name) == []


# --- the planner uses a declared index ---------------------------------------------------------------


async def _plan(server: RunningServer, page: PageRequest) -> str:
    """The plan of the statement CallRepository.query runs for `page`, as text."""
    store = server.server.store
    captured: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM calls" in statement:
            captured.append((statement, parameters))

    engine = store.database.read_engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await store.database.run(
            lambda session: Transaction(session, store.signer).calls.query_stamps(page), write=False
        )
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statement, parameters = captured[-1]  # the planned query (on SQLite a sort-index window may come first)
    async with store.database.write_engine.connect() as connection:
        if server.backend == "sqlite":
            rows = await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
            return " | ".join(str(row[3]) for row in rows)
        await connection.exec_driver_sql("ANALYZE calls")
        rows = await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)
        return str(rows.scalar())


async def test_a_selective_query_uses_the_declared_index(server: RunningServer, call_types, calls) -> None:
    key = fresh_key("owner")
    index = parse_custom_index(f"{key}:string")
    name = type_name()
    await call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=name, custom_indexes=[str(index)])
    )
    for number in range(300):
        await calls.GetOrCreateCall(
            call_service_pb2.GetOrCreateCallRequest(
                type=name,
                id=f"c{number}",
                data=call_service_pb2.CallData(custom=struct({key: f"team-{number}"})),
            )
        )
    await eventually(lambda: ready(call_types, name), seconds=30)
    page = PageRequest(
        filter_conditions={f"custom.{key}": "team-7"}, sort=(SortInput("created_at", "desc"),), limit=25
    )
    plan = await _plan(server, page)
    assert index.name in plan, plan
    reply = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(
            filter_conditions=struct({f"custom.{key}": "team-7"}),
            sort=[query_pb2.SortParam(field="created_at", direction=query_pb2.SORT_DIRECTION_DESC)],
        )
    )
    assert [state.call.id for state in reply.calls] == ["c7"]


# --- queries no index serves ---------------------------------------------------------------------------


def test_which_index_serves_which_shape() -> None:
    def unserved(conditions: dict[str, Any], *specs: str, sort: tuple[SortInput, ...] = ()) -> str | None:
        shape = query_shape(conditions, sort)
        assert shape is not None
        branch = shape.unserved([parse_custom_index(spec) for spec in specs])
        return None if branch is None else str(branch.suggestion())

    number_sort = (SortInput("custom.priority", "desc", "number"),)
    assert unserved({"custom.owner": "x"}) == "owner:string"
    assert unserved({"custom.owner": "x"}, "owner:string") is None
    assert unserved({"custom.owner": "x"}, "owner:number") == "owner:string"  # the kind matters
    assert unserved({"custom.owner": "x"}, "owner:string,size:number") is None
    assert unserved({"custom.owner": "x"}, "size:number,owner:string") == "owner:string"
    assert unserved({"custom.region": "eu", "custom.priority": {"$gte": 3}}, "region:string") is None
    assert (
        unserved({"custom.region": "eu", "custom.owner": "x"}, "owner:string") == "owner:string,region:string"
    )
    assert unserved({"custom.priority": {"$gte": 3}}) == "priority:number"
    assert unserved({}, sort=number_sort) == "priority:number:desc"
    assert unserved({}, "priority:number", sort=number_sort) is None
    assert unserved({"custom.owner": {"$in": ["a", "b"]}}, "owner:string") is None
    # $or: every branch needs its own index.
    either = {"$or": [{"custom.owner": "x"}, {"custom.team": "y"}]}
    assert unserved(either, "owner:string") == "team:string"
    assert unserved(either, "owner:string", "team:string") is None
    # Nothing an index would help with: no requirement.
    assert unserved({"custom.owner": {"$ne": "x"}, "custom.tags": {"$contains": "a"}}) is None
    assert unserved({"type": "default", "created_by_user_id": "u"}) is None
    assert query_shape({"custom.bad path": 1}, ()) is None


async def test_a_query_no_index_serves_is_logged_once_per_shape(
    server: RunningServer, calls, caplog: pytest.LogCaptureFixture
) -> None:
    key, other = fresh_key("owner"), fresh_key("zone")
    caplog.set_level(logging.WARNING, logger=MANAGER_LOG)
    for value in ("a", "b", "c"):
        await calls.QueryCalls(
            call_service_pb2.QueryCallsRequest(filter_conditions=struct({f"custom.{key}": value}))
        )
    await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct({f"custom.{other}": 1}))
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == MANAGER_LOG and key in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f'custom_indexes: ["{key}:string"]' in warnings[0]
    assert f"--custom-index {key}:string" in warnings[0]
    assert any(f"{other}:number" in r.getMessage() for r in caplog.records if r.name == MANAGER_LOG)


async def test_require_indexes_refuses_until_one_is_declared(backend: str, tmp_path: Path) -> None:
    flagged = parse_custom_index("topic:string")
    async with running_server(backend, tmp_path, require_indexes=True, custom_indexes=(flagged,)) as server:
        calls = call_service_pb2_grpc.CallServiceStub(server.channel)
        call_types = call_type_service_pb2_grpc.CallTypeServiceStub(server.channel)

        def query(conditions: dict[str, Any], **request: Any) -> Any:
            return calls.QueryCalls(
                call_service_pb2.QueryCallsRequest(filter_conditions=struct(conditions), **request)
            )

        refused = await expect_error(
            query({"custom.owner": "x"}), grpc.StatusCode.FAILED_PRECONDITION, reason="INDEX_REQUIRED"
        )
        assert refused.metadata["index"] == "owner:string"
        assert "owner:string" in refused.message
        # An invalid filter is still INVALID_ARGUMENT; queries without custom fields, or served by the
        # server's own index, run.
        await expect_error(
            query({"custom.owner": {"$bogus": 1}}), grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_FILTER"
        )
        await query({"type": "default"})
        await query({"custom.topic": "news"})

        # Declared but not built yet (the worker is held back): refused, naming the index being built.
        manager = server.server.store.indexes
        await manager.close()
        await call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(name="owned", custom_indexes=["owner:string"])
        )
        building = await expect_error(
            query({"custom.owner": "x"}), grpc.StatusCode.FAILED_PRECONDITION, reason="INDEX_REQUIRED"
        )
        assert building.metadata == {"index": "owner:string", "state": "BUILDING"}
        assert refused.metadata["state"] == "MISSING"
        while await manager._work_once():
            pass
        assert await ready(call_types, "owned")
        await query({"custom.owner": "x"})

        # A call type declaring the server's own index and then dropping it leaves it in place.
        await call_types.UpdateCallType(specs_update("owned", "owner:string", "topic:string"))
        await call_types.UpdateCallType(specs_update("owned", "owner:string"))
        assert (await index_rows(server))[flagged.name] == "READY"
        assert flagged.name in await catalog(server)
        await query({"custom.topic": "news"})


async def test_a_build_left_unfinished_is_resumed(backend: str, tmp_path: Path) -> None:
    """A replica died mid-build: its claim runs out and another builds it; on PostgreSQL the INVALID index
    an interrupted CREATE INDEX CONCURRENTLY leaves is dropped and built again."""
    index = parse_custom_index("resumed:string")
    async with running_server(backend, tmp_path) as server:
        store = server.server.store
        if backend == "postgres":
            # What an interrupted concurrent build leaves: an index by that name, marked invalid.
            async with store.database.write_engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.exec_driver_sql(f"CREATE INDEX {index.name} ON calls (type)")
                await autocommit.exec_driver_sql(
                    f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{index.name}'::regclass"
                )
        async with store.database.write_engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO custom_indexes (name, spec, state, claimed_by, claimed_until) "
                    "VALUES (:name, :spec, 'BUILDING', 'a-dead-replica', 0)"
                ),
                {"name": index.name, "spec": str(index)},
            )
        store.indexes.wake()

        async def built() -> bool:
            return (await index_rows(server)).get(index.name) == "READY"

        await eventually(built)
        assert index.name in await catalog(server)
        if backend == "postgres":
            async with store.database.write_engine.connect() as connection:
                definition = await connection.scalar(
                    text("SELECT pg_get_indexdef(CAST(:name AS regclass))"), {"name": index.name}
                )
                valid = await connection.scalar(
                    text("SELECT indisvalid FROM pg_index WHERE indexrelid = CAST(:name AS regclass)"),
                    {"name": index.name},
                )
            assert "resumed" in definition and valid is True


async def test_a_restarted_sqlite_server_resumes_its_unfinished_build(tmp_path: Path) -> None:
    """The one process of an SQLite database died mid-build, holding the claim: on restart the claim is
    its previous life's, and the build resumes at once."""
    index = parse_custom_index("restarted:number")
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    config = Config(
        listen="127.0.0.1:0", database_url=url, data_dir=tmp_path, run_timers=False, api_secret=TEST_SECRET
    )
    first = CallplaneServer(config)
    await first.start()
    try:
        async with first.store.database.write_engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO custom_indexes (name, spec, state, claimed_by, claimed_until) "
                    "VALUES (:name, :spec, 'BUILDING', 'the-previous-life', :until)"
                ),
                {"name": index.name, "spec": str(index), "until": time.time() + 3600},
            )
    finally:
        await first.stop(grace=0)
    second = CallplaneServer(config)
    await second.start()
    try:
        running = RunningServer("sqlite", second, TestClock(), channel(f"127.0.0.1:{second.port}"))

        async def built() -> bool:
            return (await index_rows(running)).get(index.name) == "READY"

        await eventually(built)
        assert index.name in await catalog(running)
        await running.channel.close()
    finally:
        await second.stop(grace=0)


async def test_the_python_client_declares_and_lists_indexes(server: RunningServer) -> None:
    from callplane.client import CallplaneClient
    from tests.support import SERVER_TOKEN

    spec = f"{fresh_key('client')}:string"
    name = type_name()
    async with CallplaneClient(server.target, token=SERVER_TOKEN) as client:
        created = await client.create_call_type(name, custom_indexes=[spec])
        assert [(i.spec, i.state) for i in created.custom_indexes] == [(spec, "BUILDING")]

        async def client_sees_ready() -> bool:
            indexes = (await client.get_call_type(name)).custom_indexes
            return [i.state for i in indexes] == ["READY"]

        await eventually(client_sees_ready)
        (index,) = (await client.get_call_type(name)).custom_indexes
        assert index.build_duration is not None and index.writes_blocked is not None
        assert (await client.update_call_type(name)).custom_indexes[0].spec == spec  # kept
        assert (await client.update_call_type(name, custom_indexes=[])).custom_indexes == []


async def test_two_replicas_racing_for_a_build_build_it_once(tmp_path: Path) -> None:
    """PostgreSQL: any replica may build an index, but the claim in the table lets exactly one."""
    index = parse_custom_index("raced:string")
    async with running_server("postgres", tmp_path) as server:
        first = server.server.store
        second = await Store.open(str(first.database.url.render_as_string(hide_password=False)))
        try:
            # Their background workers stopped, so the race is between these two claims only.
            await first.indexes.close()
            await second.indexes.close()
            async with first.database.write_engine.begin() as connection:
                await connection.execute(
                    text("INSERT INTO custom_indexes (name, spec, state) VALUES (:name, :spec, 'BUILDING')"),
                    {"name": index.name, "spec": str(index)},
                )
            claimed = await asyncio.gather(first.indexes._work_once(), second.indexes._work_once())
            assert sorted(claimed) == [False, True]
            assert (await index_rows(server))[index.name] == "READY"
            assert index.name in await catalog(server)
        finally:
            await second.close()


async def test_declaring_a_failed_index_retries_it(server: RunningServer, call_types) -> None:
    index = parse_custom_index(f"{fresh_key('retry')}:string")
    async with server.server.store.database.write_engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO custom_indexes (name, spec, state, error) "
                "VALUES (:name, :spec, 'FAILED', 'boom')"
            ),
            {"name": index.name, "spec": str(index)},
        )
    name = type_name()
    created = await call_types.CreateCallType(
        call_type_service_pb2.CreateCallTypeRequest(name=name, custom_indexes=[str(index)])
    )
    (listed,) = created.call_type.custom_indexes
    assert (listed.state, listed.error) == (BUILDING, "")
    await eventually(lambda: ready(call_types, name))
    assert index.name in await catalog(server)
