"""Custom-data indexes as part of the API: call types declare them, any replica builds them online, and
every replica knows which are READY (to tell a query that would scan).

State lives in the database (`custom_indexes`, one row per index, and `call_type_custom_indexes`, the call
types declaring it) so every replica sees it. A declaration commits the row as BUILDING; a replica then
claims it (`claimed_by` / `claimed_until`, renewed while it works, so exactly one builds it and another
takes over if that one dies) and builds it: PostgreSQL `CREATE INDEX CONCURRENTLY` on an autocommit
connection (writes go on), SQLite a plain `CREATE INDEX` through the writer (SQLite cannot build
concurrently: writes wait, and the time they waited is recorded and logged). An interrupted concurrent
build leaves an INVALID index behind: the next build drops it first. An index nothing declares any more
(no call type, no server flag) becomes DROPPING and is dropped the same way (`DROP INDEX CONCURRENTLY`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import CustomIndexStatus, PageRequest
from callplane_server.errors import FailedPrecondition
from callplane_server.store.custom_indexes import (
    ANALYZE_CALLS,
    Conjunction,
    CustomIndex,
    create_statement,
    parse_custom_index,
    query_shape,
)
from callplane_server.store.database import Database
from callplane_server.store.models import CallTypeCustomIndexRow, CustomIndexRow
from callplane_server.store.query.entities import CALLS
from callplane_server.store.query.filters import compile_filter

log = logging.getLogger(__name__)

BUILDING, READY, FAILED, DROPPING = "BUILDING", "READY", "FAILED", "DROPPING"

_INDEXES = cast(Table, CustomIndexRow.__table__)
_DECLARATIONS = cast(Table, CallTypeCustomIndexRow.__table__)

#: A claim lasts this long unless renewed (every third of it while the work runs).
CLAIM_SECONDS = 30.0
#: How often a replica looks for work another replica left (it died mid-build) and for indexes other
#: replicas finished; its own declarations wake it at once.
POLL_SECONDS = 15.0
#: Query shapes remembered as already logged (a bound on memory against endlessly varied filters).
_MAX_LOGGED_SHAPES = 1024


class CustomIndexRepository:
    """The declarations of one transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def of_call_types(self, call_types: Sequence[str]) -> dict[str, list[CustomIndexStatus]]:
        """Each call type's declared indexes, in declaration order, with their state."""
        found: dict[str, list[CustomIndexStatus]] = {name: [] for name in call_types}
        if not call_types:
            return found
        rows = await self._session.execute(
            select(_DECLARATIONS.c.call_type, _INDEXES)
            .join(_INDEXES, _INDEXES.c.name == _DECLARATIONS.c.index_name)
            .where(_DECLARATIONS.c.call_type.in_(list(call_types)))
            .order_by(_DECLARATIONS.c.call_type, _DECLARATIONS.c.position)
        )
        for row in rows:
            found[row.call_type].append(
                CustomIndexStatus(
                    spec=row.spec,
                    name=row.name,
                    # Dropping: only once nothing declares it, so a declared one is never reported so.
                    state=BUILDING if row.state == DROPPING else row.state,
                    error=row.error,
                    build_seconds=row.build_seconds,
                    writes_blocked_seconds=row.writes_blocked_seconds,
                )
            )
        return found

    async def declare(self, call_type: str, indexes: Sequence[CustomIndex]) -> bool:
        """Makes `indexes` the ones `call_type` declares: new ones become BUILDING (FAILED ones are
        retried), ones nothing declares any more DROPPING. True when an index needs building or
        dropping."""
        current = set(
            (
                await self._session.execute(
                    select(_DECLARATIONS.c.index_name).where(_DECLARATIONS.c.call_type == call_type)
                )
            ).scalars()
        )
        wanted = {index.name: index for index in indexes}
        work = False
        for name, index in wanted.items():
            # Locked, so a concurrent removal of its last other declaration sees this one (PostgreSQL).
            row = (
                await self._session.execute(
                    select(_INDEXES.c.state).where(_INDEXES.c.name == name).with_for_update()
                )
            ).first()
            if row is None:
                await self._session.execute(
                    insert(_INDEXES).values(name=name, spec=str(index), state=BUILDING)
                )
                work = True
            elif row.state in (DROPPING, FAILED):
                await self._session.execute(
                    update(_INDEXES).where(_INDEXES.c.name == name).values(state=BUILDING, error="")
                )
                work = True
            elif row.state == BUILDING:
                work = True  # a worker that found this row locked by us looks again once woken
        await self._session.execute(delete(_DECLARATIONS).where(_DECLARATIONS.c.call_type == call_type))
        if wanted:
            await self._session.execute(
                insert(_DECLARATIONS),
                [
                    {"call_type": call_type, "index_name": name, "position": position}
                    for position, name in enumerate(wanted)
                ],
            )
        for name in sorted(current - set(wanted)):
            row = (
                await self._session.execute(
                    select(_INDEXES.c.server_declared).where(_INDEXES.c.name == name).with_for_update()
                )
            ).first()
            others = await self._session.scalar(
                select(func.count()).select_from(_DECLARATIONS).where(_DECLARATIONS.c.index_name == name)
            )
            if row is not None and not row.server_declared and not others:
                await self._session.execute(
                    update(_INDEXES).where(_INDEXES.c.name == name).values(state=DROPPING)
                )
                work = True
        return work


class IndexManager:
    """This replica's part: builds and drops what it claims, knows which indexes are READY, and judges
    QueryCalls shapes against them (logging each unserved shape once; refusing it with `require`)."""

    def __init__(
        self, database: Database, server_indexes: Sequence[CustomIndex] = (), *, require: bool = False
    ) -> None:
        self._database = database
        self._server_indexes = {index.name: index for index in server_indexes}
        self.require = require
        self._me = uuid.uuid4().hex
        self._ready: dict[str, CustomIndex] = dict(self._server_indexes)
        self._building: dict[str, CustomIndex] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged: set[QueryShapeKey] = set()
        self.poll_seconds = POLL_SECONDS

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Records the server's own indexes (already created, before serving) and starts the worker,
        which at once resumes builds and drops left unfinished."""

        async def register(session: AsyncSession) -> None:
            if self._database.sole_writer:
                # One process owns an SQLite database: claims left behind are its previous life's.
                await session.execute(update(_INDEXES).values(claimed_by=None, claimed_until=None))
            for name, index in self._server_indexes.items():
                row = (await session.execute(select(_INDEXES.c.state).where(_INDEXES.c.name == name))).first()
                if row is None:
                    await session.execute(
                        insert(_INDEXES).values(name=name, spec=str(index), state=READY, server_declared=True)
                    )
                else:
                    # A DROPPING one may be gone already: build it again (a no-op if it is still there).
                    state = BUILDING if row.state in (DROPPING, FAILED) else row.state
                    await session.execute(
                        update(_INDEXES)
                        .where(_INDEXES.c.name == name)
                        .values(server_declared=True, state=state)
                    )

        await self._database.run(register, write=True)
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="custom-indexes", context=contextvars.Context())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """A declaration committed: look for work now."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            # The only process of an SQLite database has nobody else's work to look for: it waits to be
            # woken (or retries after a failure). A replica reads every poll_seconds, and idle, only reads.
            timeout: float | None = None if self._database.sole_writer else self.poll_seconds
            try:
                while await self.refresh() and await self._work_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("custom index upkeep failed; retrying in %.0fs", self.poll_seconds)
                timeout = self.poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def refresh(self) -> bool:
        """Re-reads which indexes are READY (other replicas build some); True when one waits to be built
        or dropped and nobody holds it."""

        async def read(session: AsyncSession) -> list[Any]:
            return list(await session.execute(select(_INDEXES)))

        ready = dict(self._server_indexes)
        building: dict[str, CustomIndex] = {}
        waiting = False
        now = time.time()
        for row in await self._database.run(read, write=False):
            if row.state == READY:
                with contextlib.suppress(ValueError):
                    ready[row.name] = parse_custom_index(row.spec)
            elif row.state in (BUILDING, DROPPING):
                waiting = waiting or row.claimed_by is None or (row.claimed_until or 0.0) < now
                if row.state == BUILDING:
                    with contextlib.suppress(ValueError):
                        building[row.name] = parse_custom_index(row.spec)
        self._ready, self._building = ready, building
        return waiting

    # --- building and dropping --------------------------------------------------------------------

    async def _work_once(self) -> bool:
        """Claims one index to build or drop and does it; False when there is none."""
        me = self._me

        async def claim(session: AsyncSession) -> tuple[str, str, str] | None:
            now = time.time()
            row = (
                await session.execute(
                    select(_INDEXES.c.name, _INDEXES.c.spec, _INDEXES.c.state)
                    .where(
                        _INDEXES.c.state.in_((BUILDING, DROPPING)),
                        or_(_INDEXES.c.claimed_by.is_(None), _INDEXES.c.claimed_until < now),
                    )
                    .order_by(_INDEXES.c.name)
                    .limit(1)
                    # Not SKIP LOCKED: a row locked by a declaration in progress is waited for (it may
                    # be ours to build). A claim by another replica meanwhile fails the re-checked WHERE.
                    .with_for_update()
                )
            ).first()
            if row is None:
                return None
            await session.execute(
                update(_INDEXES)
                .where(_INDEXES.c.name == row.name)
                .values(claimed_by=me, claimed_until=now + CLAIM_SECONDS)
            )
            return row.name, row.spec, row.state

        claimed = await self._database.run(claim, write=True)
        if claimed is None:
            return False
        name, spec, state = claimed
        renewing = asyncio.create_task(self._renew(name))
        try:
            if state == BUILDING:
                await self._build(name, spec)
            else:
                await self._drop(name)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        return True

    async def _renew(self, name: str) -> None:
        me = self._me

        async def renew(session: AsyncSession) -> None:
            await session.execute(
                update(_INDEXES)
                .where(_INDEXES.c.name == name, _INDEXES.c.claimed_by == me)
                .values(claimed_until=time.time() + CLAIM_SECONDS)
            )

        while True:
            await asyncio.sleep(CLAIM_SECONDS / 3)
            try:
                await self._database.run(renew, write=True)
            except Exception as error:  # the next renewal may get through; the claim outlives two misses
                log.warning("could not renew the claim on custom index %s: %s", name, error)

    async def _build(self, name: str, spec: str) -> None:
        started = time.monotonic()
        try:
            index = parse_custom_index(spec)
            blocked = await self._create(index)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.error("custom index %s (%s) failed to build: %s", name, spec, error)
            with contextlib.suppress(Exception):
                await self._drop_invalid(name)
            await self._finish(name, FAILED, error=str(error).splitlines()[0][:1000])
            return
        seconds = time.monotonic() - started
        if self._database.dialect == "sqlite":
            log.info(
                "custom index %s (%s) built in %.3fs; SQLite blocked writes for %.3fs while it built",
                name,
                spec,
                seconds,
                blocked,
            )
        else:
            log.info("custom index %s (%s) built concurrently in %.3fs", name, spec, seconds)
        await self._finish(name, READY, build_seconds=seconds, writes_blocked_seconds=blocked)

    async def _create(self, index: CustomIndex) -> float:
        """Builds the index; returns how long it blocked writes."""
        dialect = self._database.write_engine.dialect
        if self._database.dialect == "postgresql":
            await self._drop_invalid(index.name)
            await self._autocommit(create_statement(index, dialect, concurrently=True))
            await self._autocommit(ANALYZE_CALLS)
            return 0.0
        statement = create_statement(index, dialect)
        began = 0.0

        async def build(session: AsyncSession) -> None:
            nonlocal began
            began = time.monotonic()  # the writer is ours from here: every other write waits
            await session.execute(text(statement))

        await self._database.run(build, write=True)
        return time.monotonic() - began

    async def _drop_invalid(self, name: str) -> None:
        """PostgreSQL: an interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index, which IF NOT
        EXISTS would take for built."""
        if self._database.dialect != "postgresql":
            return
        async with self._database.write_engine.connect() as connection:
            valid = await connection.scalar(
                text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": name}
            )
            await connection.rollback()
        if valid is False:
            log.warning("custom index %s was left invalid by an interrupted build: dropping it", name)
            await self._autocommit(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")

    async def _autocommit(self, statement: str) -> None:
        """PostgreSQL's CONCURRENTLY statements refuse to run inside a transaction."""
        async with self._database.write_engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.exec_driver_sql(statement)

    async def _drop(self, name: str) -> None:
        if self._database.dialect == "postgresql":
            await self._autocommit(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        else:
            await self._database.run(
                lambda session: session.execute(text(f"DROP INDEX IF EXISTS {name}")), write=True
            )
        me = self._me

        async def forget(session: AsyncSession) -> None:
            # Still DROPPING (not declared again meanwhile: then it is BUILDING and built again).
            await session.execute(
                delete(_INDEXES).where(
                    _INDEXES.c.name == name, _INDEXES.c.state == DROPPING, _INDEXES.c.claimed_by == me
                )
            )
            await session.execute(
                update(_INDEXES)
                .where(_INDEXES.c.name == name, _INDEXES.c.claimed_by == me)
                .values(claimed_by=None, claimed_until=None)
            )

        await self._database.run(forget, write=True)
        self._ready.pop(name, None)
        log.info("custom index %s dropped: nothing declares it any more", name)

    async def _finish(self, name: str, state: str, **values: Any) -> None:
        me = self._me

        async def finish(session: AsyncSession) -> None:
            # Unless it was undeclared meanwhile (DROPPING: dropped next).
            await session.execute(
                update(_INDEXES)
                .where(_INDEXES.c.name == name, _INDEXES.c.claimed_by == me, _INDEXES.c.state == BUILDING)
                .values(state=state, **values)
            )
            await session.execute(
                update(_INDEXES)
                .where(_INDEXES.c.name == name, _INDEXES.c.claimed_by == me)
                .values(claimed_by=None, claimed_until=None)
            )

        await self._database.run(finish, write=True)

    # --- queries ----------------------------------------------------------------------------------

    @property
    def ready(self) -> list[CustomIndex]:
        return list(self._ready.values())

    async def check_query(self, page: PageRequest) -> None:
        """Logs (once per shape) a QueryCalls request no READY index serves, naming the index to
        declare; with `require`, refuses it with FAILED_PRECONDITION `INDEX_REQUIRED`."""
        shape = query_shape(page.filter_conditions, page.sort)
        if shape is None:
            return
        branch = shape.unserved(self._ready.values())
        if branch is None:
            return
        if self.require:
            await self.refresh()  # another replica may have finished it since the last poll
            branch = shape.unserved(self._ready.values())
            if branch is None:
                return
        # An index being built that will serve it is the one to wait for; else the one to declare.
        pending = next((index for index in self._building.values() if branch.served_by(index)), None)
        suggestion = str(pending or branch.suggestion())
        key = _shape_key(branch)
        if key not in self._logged:
            if len(self._logged) >= _MAX_LOGGED_SHAPES:
                self._logged.clear()
            self._logged.add(key)
            if pending is not None:
                log.warning(
                    "QueryCalls on custom data (%s) reads every call until custom index %s is built",
                    _describe(branch),
                    suggestion,
                )
            else:
                log.warning(
                    "QueryCalls on custom data with no index to serve it (%s): it reads every call. "
                    'Declare one: custom_indexes: ["%s"] on a call type, or --custom-index %s',
                    _describe(branch),
                    suggestion,
                    suggestion,
                )
        if self.require:
            compile_filter(CALLS, page.filter_conditions)  # an invalid filter is INVALID_ARGUMENT first
            if pending is not None:
                message = (
                    f'QueryCalls needs the custom index "{suggestion}", which is still building; retry '
                    "once GetCallType shows it READY"
                )
            else:
                message = (
                    f'QueryCalls needs the custom index "{suggestion}": declare it in a call type\'s '
                    "custom_indexes (UpdateCallType) or with --custom-index; this server refuses queries "
                    "no index serves (--require-indexes)"
                )
            raise FailedPrecondition(
                message,
                reason="INDEX_REQUIRED",
                metadata={"index": suggestion, "state": BUILDING if pending is not None else "MISSING"},
            )


QueryShapeKey = tuple[frozenset[Any], frozenset[Any], tuple[Any, ...]]


def _shape_key(branch: Conjunction) -> QueryShapeKey:
    return (branch.equalities, branch.ranges, tuple((s.path, s.kind) for s in branch.sorts))


def _describe(branch: Conjunction) -> str:
    def names(fields: Iterable[tuple[tuple[str, ...], str]]) -> str:
        return ", ".join(sorted(f"custom.{'.'.join(path)}:{kind}" for path, kind in fields))

    parts = []
    if branch.equalities:
        parts.append(f"equal: {names(branch.equalities)}")
    if branch.ranges:
        parts.append(f"range: {names(branch.ranges)}")
    if branch.sorts:
        parts.append(f"sort: {', '.join(str(sort) for sort in branch.sorts)}")
    return "; ".join(parts)
