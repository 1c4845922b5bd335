"""Query plans of QueryCalls on a migrated database with thousands of calls (issue 13, goal 2).

A broad custom-data equality (a fifth of the calls) sorted by `created_at desc` with no declared index
must walk the sort index and stop after the page: SQLite's plan scans `ix_calls_created_at_cid` with no
temporary B-tree for the ORDER BY; PostgreSQL's (with statistics, on enough rows that a sequential scan
is a real alternative) is a Limit over an Index Scan of that index, with no Sort node. The statement is
the one `CallRepository.query_stamps` executes, for a server token and for a user token (whose visibility
conditions ride along as filters). With an index on the filtered field, SQLite's planner would read and
sort every match: there the page is read from a bounded window of the sort index first.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from callplane_server.domain.records import PageRequest, SortInput
from callplane_server.store.database import normalize_url
from callplane_server.store.execution import Statements
from callplane_server.store.migrations.runner import upgrade_to_head
from callplane_server.store.models import CallMemberRow, CallRow, UserRow
from callplane_server.store.query import CursorSigner
from callplane_server.store.query.jsonsql import JsonScalar
from callplane_server.store.repositories import CallRepository
from callplane_server.store.visibility import CallReader
from tests.support import fresh_database

CALLS = 20000
REGIONS = ("eu", "us", "ap", "sa", "af")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SORT_INDEX = "ix_calls_created_at_cid"
BROAD = PageRequest(
    filter_conditions={"custom.region": "eu"}, sort=(SortInput("created_at", "desc"),), limit=25
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    """A migrated database (the production schema) with CALLS calls of 5 members each, analyzed."""
    async with fresh_database(backend, tmp_path_factory.mktemp(f"plans-{backend}")) as url:
        created = create_async_engine(normalize_url(url))
        try:
            await upgrade_to_head(created)
            async with created.begin() as connection:
                await connection.execute(
                    UserRow.__table__.insert(),
                    [
                        {"id": f"u{i}", "name": "", "role": "user", "created_at": T0, "updated_at": T0}
                        for i in range(100)
                    ],
                )
                calls, members = [], []
                for i in range(CALLS):
                    cid, moment = f"default:c{i:05d}", T0 + timedelta(seconds=i)
                    calls.append(
                        {
                            "cid": cid,
                            "type": "default",
                            "id": f"c{i:05d}",
                            "custom": {
                                "region": REGIONS[i % 5],
                                "owner": f"team-{i % 1000}",
                                "priority": i % 10,
                            },
                            "member_count": 5,
                            "created_at": moment,
                            "updated_at": moment,
                        }
                    )
                    members += [
                        {
                            "call_cid": cid,
                            "user_id": f"u{(i + k) % 100}",
                            "created_at": moment,
                            "updated_at": moment,
                        }
                        for k in range(2)
                    ]
                await connection.execute(CallRow.__table__.insert(), calls)
                await connection.execute(CallMemberRow.__table__.insert(), members)
            if backend == "postgres":  # what autovacuum does on a live database
                async with created.begin() as connection:
                    await connection.execute(text("ANALYZE"))
            yield created
        finally:
            await created.dispose()


@contextmanager
def captured(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


class PlannedCalls(CallRepository):
    """QueryCalls as the planner runs it: without SQLite's first walk of a window of the sort index."""

    async def _walk_first(self, page: PageRequest) -> tuple[str, ...]:
        return ()


async def plan(engine: AsyncEngine, reader: CallReader | None) -> tuple[int, Any]:
    """(rows returned, plan) of the statement CallRepository.query_stamps runs for BROAD, as planned."""
    async with AsyncSession(engine) as session:
        repository = PlannedCalls(session, CursorSigner(b"plan-test-secret-0123456789"), Statements(session))
        with captured(engine) as statements:
            page = await repository.query_stamps(BROAD, reader=reader)
        ((sql, parameters),) = statements
        connection = await session.connection()
        if engine.dialect.name == "sqlite":
            rows = await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters)
            return len(page.items), [row[3] for row in rows]
        rows = await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, parameters)
        document = rows.scalar_one()
        return len(page.items), (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]


def _id(cid: str) -> str:
    """The call id of a cid (`type:id`)."""
    return cid.split(":", 1)[1]


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _readers() -> dict[str, CallReader | None]:
    grants = {"default": {"user": ["read-call"], "call_member": ["read-call"]}}
    return {
        "server": None,
        "user": CallReader(user_id="u1", role="user", teams=[], call_cids=None, grants=grants),
        "user in teams": CallReader(
            user_id="u1", role="user", teams=["red", "blue"], call_cids=None, grants=grants
        ),
        "member only": CallReader(
            user_id="u1",
            role="user",
            teams=[],
            call_cids=None,
            grants={"default": {"call_member": ["read-call"]}},
        ),
    }


@pytest.mark.parametrize("who", list(_readers()))
async def test_broad_custom_filter_walks_the_sort_index(engine: AsyncEngine, backend: str, who: str) -> None:
    returned, found = await plan(engine, _readers()[who])
    if who != "member only":  # u1 is a member of 5 % of the calls: fewer than a page of them in eu
        assert returned == BROAD.limit
    if backend == "sqlite":
        assert any(f"USING INDEX {SORT_INDEX}" in step and step.startswith("SCAN calls") for step in found), (
            found
        )
        assert not any("TEMP B-TREE" in step for step in found), found
        return
    assert found["Node Type"] == "Limit", found
    nodes = list(_nodes(found))
    assert not any("Sort" in node["Node Type"] for node in nodes), found
    scans = [node for node in nodes if node.get("Relation Name") == "calls"]
    assert [(node["Node Type"], node.get("Index Name")) for node in scans] == [("Index Scan", SORT_INDEX)], (
        found
    )


def _expected(matches: Callable[[int], bool]) -> list[str]:
    """Ids of the matching calls, newest first."""
    return [f"c{i:05d}" for i in range(CALLS - 1, -1, -1) if matches(i)]


def _of_calls(statements: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The statements reading calls (not SQLite's look for an index on custom data in its schema)."""
    return [(sql, parameters) for sql, parameters in statements if "sqlite_master" not in sql]


async def _declare(engine: AsyncEngine, field: str) -> str:
    """An index on a custom string field, as a declared custom index is built (the expression the filter
    compiler emits, then cid); returns its name."""
    name = f"ix_test_custom_{field}"
    expression = JsonScalar(CallRow.__table__.c.custom, (field,), "string").compile(
        dialect=engine.dialect, compile_kwargs={"include_table": False}
    )
    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"CREATE INDEX {name} ON calls (({expression}), cid)")
        if engine.dialect.name == "postgresql":
            await connection.execute(text("ANALYZE calls"))
    return name


async def _drop(engine: AsyncEngine, name: str) -> None:
    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"DROP INDEX {name}")


async def test_broad_filter_walks_the_sort_index_despite_an_index_on_the_field(
    engine: AsyncEngine, backend: str
) -> None:
    """With an index on custom.region, SQLite's planner would fetch every eu call through it and sort
    them all; the page is read from a bounded window of the sort index instead, in one statement (after
    a look in the schema for an index on custom data)."""
    name = await _declare(engine, "region")
    try:
        async with AsyncSession(engine) as session:
            repository = CallRepository(
                session, CursorSigner(b"plan-test-secret-0123456789"), Statements(session)
            )
            with captured(engine) as statements:
                first = await repository.query_stamps(BROAD)
            ((sql, parameters),) = _of_calls(statements)
            with captured(engine) as statements:
                second = await repository.query_stamps(replace(BROAD, next=first.next))
            assert len(_of_calls(statements)) == 1
            connection = await session.connection()
            if backend == "sqlite":
                found = [
                    row[3]
                    for row in await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters)
                ]
                assert any(step.startswith(f"SCAN calls USING INDEX {SORT_INDEX}") for step in found), found
                assert not any(name in step for step in found), found
            else:
                rows = await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, parameters)
                document = rows.scalar_one()
                plan = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
                scans = [node for node in _nodes(plan) if node.get("Relation Name") == "calls"]
                assert [node.get("Index Name") for node in scans] == [SORT_INDEX], plan
        eu = _expected(lambda i: REGIONS[i % 5] == "eu")
        assert [_id(cid) for cid, *_ in first.items] == eu[:25]
        assert [_id(cid) for cid, *_ in second.items] == eu[25:50]
    finally:
        await _drop(engine, name)


@pytest.mark.parametrize("declared", [False, True])
async def test_selective_filter_pages(engine: AsyncEngine, declared: bool) -> None:
    """A filter matching too few calls for the sort index's window to hold a page still reads every
    page right (the window finds less than a page; the query then runs as planned)."""
    name = await _declare(engine, "owner") if declared else None
    try:
        async with AsyncSession(engine) as session:
            repository = CallRepository(
                session, CursorSigner(b"plan-test-secret-0123456789"), Statements(session)
            )
            request = replace(BROAD, filter_conditions={"custom.owner": "team-42"}, limit=7)
            pages, cursor = [], ""
            while True:
                page = await repository.query_stamps(replace(request, next=cursor))
                pages.append([_id(cid) for cid, *_ in page.items])
                if not page.next:
                    break
                cursor = page.next
        expected = _expected(lambda i: i % 1000 == 42)
        assert [len(page) for page in pages] == [7, 7, 6]
        assert [call_id for page in pages for call_id in page] == expected
    finally:
        if name is not None:
            await _drop(engine, name)
