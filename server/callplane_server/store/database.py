"""Engines, per-connection settings, transactions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry import trace
from sqlalchemy import Executable, event, exc
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from callplane_server import deadlines
from callplane_server.distribution import Distribution
from callplane_server.errors import CallplaneError, DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs worth retrying the whole transaction for: serialization failure, deadlock, unique violation
# (a concurrent insert of the same key: the retry re-reads and sees the winner's row).
_RETRYABLE_SQLSTATES = {"40001", "40P01", "23505"}
_SQLITE_BUSY_TIMEOUT_MS = 10_000

registry.register("sqlite.callplane", "callplane_server.store.sqlite_driver", "InlineSQLiteDialect")


def normalize_url(url: str) -> URL:
    """Accept the usual `sqlite:///path` / `postgresql://` spellings and pick the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("SQLite needs a file path: sqlite:///path/to/callplane.db")
        return parsed.set(drivername="sqlite+callplane")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:/// or postgresql://"
    )


def _sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, exc.DBAPIError):
        if _sqlstate(error) in _RETRYABLE_SQLSTATES:
            return True
        # SQLite reports a lost concurrent insert as IntegrityError without SQLSTATE.
        if isinstance(error, exc.IntegrityError) and "UNIQUE constraint failed" in str(error.orig):
            return True
    return False


def _is_unavailable(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, OSError, TimeoutError)):
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated or isinstance(error, (exc.InterfaceError, exc.OperationalError)):
            return True
        # Connection failures, database gone or not accepting logins, shutdown, out of resources.
        state = _sqlstate(error) or ""
        return state.startswith(("08", "3D", "28", "57P", "53"))
    return isinstance(error, exc.TimeoutError)


def _is_out_of_space(error: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full"), PostgreSQL's disk_full (53100), ENOSPC."""
    if _sqlstate(error) == "53100":
        return True
    # The error, the driver's (`orig`), what those wrap, and what was being handled when they were raised
    # (a rollback to a savepoint that SQLite had already discarded along with the full disk's error).
    pending: list[BaseException] = [error]
    for _ in range(12):
        if not pending:
            break
        candidate = pending.pop(0)
        if getattr(candidate, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(candidate, OSError) and candidate.errno == errno.ENOSPC:
            return True
        pending.extend(
            cause
            for cause in (getattr(candidate, "orig", None), candidate.__cause__, candidate.__context__)
            if cause is not None
        )
    return False


def _raise_as_outage(error: Exception) -> None:
    """Raises Unavailable from a database error that is an outage (or a conflict that retries did not
    resolve); returns for anything else (the caller re-raises it as it is)."""
    if _is_out_of_space(error):
        log.error("database out of space: %s", error)
        raise Unavailable(
            "the database has no space left on device; retry once an operator has freed some",
            reason="STORAGE_FULL",
        ) from error
    if _is_unavailable(error) or _is_retryable(error):
        log.warning("database unavailable: %s", error)
        raise Unavailable("the database is unavailable; retry", reason="DATABASE_UNAVAILABLE") from error


class DatabaseInUse(RuntimeError):
    """Another server process already serves this SQLite database."""


class _ProcessLock:
    """An exclusive flock next to the SQLite file, held while the database is open (released by the OS
    if the process dies), as etcd does for its data file. One process per embedded database is what
    lets a server trust that every change passes through it."""

    def __init__(self, database_path: Path) -> None:
        self.path = database_path.with_name(database_path.name + ".lock")
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._descriptor, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._descriptor)
            raise DatabaseInUse(
                f"{database_path} is served by process {holder}; an SQLite database takes one server "
                "process (scale out with PostgreSQL)"
            ) from None
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = -1


@dataclass
class _Unit:
    work: Callable[[AsyncSession], Coroutine[Any, Any, Any]]
    done: asyncio.Future[Any]
    # The submitter's context (who is calling, for instance): the unit runs in it, not the group's.
    context: contextvars.Context
    # The submitter's RPC deadline (time.monotonic()), and whether it stopped waiting (cancelled).
    deadline: float | None = None
    abandoned: bool = False

    def caller_gone(self) -> bool:
        return self.abandoned or deadlines.passed(self.deadline)


def _caller_gone() -> DeadlineExceeded:
    return DeadlineExceeded(
        "the deadline passed before the write committed; it was rolled back", reason="DEADLINE_EXCEEDED"
    )


GROUP_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64)


class _GroupCommit:
    """Group commit for the single SQLite writer: while one transaction runs, the writers that arrive
    queue up; the next transaction runs all of them, each in its own session under a SAVEPOINT (a unit
    that fails rolls back alone, as if it had its own transaction), and commits once. Every unit is
    acknowledged only after that commit, so durability is unchanged (one fsync per group, not per write).
    A unit whose caller is gone (deadline passed, RPC cancelled) when its turn comes, or by the end of its
    work, rolls back to its savepoint alone and fails with DeadlineExceeded.
    """

    MAX_UNITS = 64

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        #: Set when tracing is on (see Database.tracer).
        self.tracer: trace.Tracer | None = None
        self._queue: list[_Unit] = []
        self._running = False
        #: Writes per group commit (the metrics show how much grouping saves).
        self.batch_sizes = Distribution(GROUP_SIZE_BOUNDS)
        # What the units leave for the group to write once, before the commit (see Database.defer_to_group).
        self.write_deferred: Callable[[AsyncSession, list[Any]], Awaitable[Any]] | None = None
        self.committed: Callable[[Any], None] | None = None

    async def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        # arg-type: _Unit runs `work` as a task, which needs a coroutine; every caller's work returns one.
        unit = _Unit(
            work,  # type: ignore[arg-type]
            asyncio.get_running_loop().create_future(),
            contextvars.copy_context(),
            deadlines.current_deadline(),
        )
        self._queue.append(unit)
        if not self._running:
            self._running = True
            # Started by whichever writer comes first (often inside an RPC): an empty context, so the
            # drainer holds nobody's authority; each unit runs in the context of its own writer.
            asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())
        try:
            # Shielded: a unit the group has started must finish there, not be torn out of it.
            return await asyncio.shield(unit.done)
        except asyncio.CancelledError:
            unit.abandoned = True  # rolled back if its savepoint is still open
            raise

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[: self.MAX_UNITS], self._queue[self.MAX_UNITS :]
                self.batch_sizes.observe(len(group))
                if self.tracer is None:
                    await self._run_group(group)
                else:
                    await self._run_traced_group(self.tracer, group)
        finally:
            self._running = False

    async def _run_traced_group(self, tracer: trace.Tracer, group: list[_Unit]) -> None:
        """The group in a span of the first traced unit's trace, linked to the others' (its BEGIN,
        savepoints and COMMIT are its children; each unit's statements are its own transaction's)."""
        spans = [
            context
            for context in (unit.context.run(trace.get_current_span).get_span_context() for unit in group)
            if context.is_valid
        ]
        if not spans:
            await self._run_group(group)
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(spans[0]))
        with tracer.start_as_current_span(
            "sqlite group commit",
            context=parent,
            links=[trace.Link(context) for context in spans[1:]],
            attributes={"db.system": "sqlite", "callplane.group_commit.writes": len(group)},
        ):
            await self._run_group(group)

    async def _run_group(self, group: list[_Unit]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        deferred: list[Any] = []  # left by the units that succeeded, in order
        remembered: dict[Any, Any] = {}  # what they remembered for the units after them
        written: Any = None
        try:
            async with self._engine.connect() as connection:
                await connection.begin()  # BEGIN IMMEDIATE (see _configure_sqlite)
                for unit in group:
                    if unit.caller_gone():
                        outcomes.append((False, _caller_gone()))
                        continue
                    scope = GroupScope(deferred, remembered)
                    session = AsyncSession(
                        bind=connection,
                        join_transaction_mode="create_savepoint",
                        expire_on_commit=False,
                        autoflush=False,
                        info={GROUP_SCOPE: scope},
                    )
                    try:
                        async with session.begin():
                            task = asyncio.get_running_loop().create_task(
                                unit.work(session), context=unit.context
                            )
                            result = await task
                            if unit.caller_gone():
                                raise _caller_gone()  # back to the savepoint: this unit only
                        outcomes.append((True, result))
                        scope.keep()
                    except Exception as error:
                        if not await _in_transaction(connection):
                            # SQLite rolled the whole group back (a full disk, an I/O error): the units
                            # before this one are lost too, and what follows would run outside it.
                            raise
                        outcomes.append((False, error))
                    finally:
                        await session.close()
                if deferred and self.write_deferred is not None:
                    session = AsyncSession(bind=connection, expire_on_commit=False, autoflush=False)
                    try:
                        written = await self.write_deferred(session, deferred)
                    finally:
                        await session.close()
                await connection.commit()
        except Exception as error:
            # Nothing of the group was committed (or we cannot know): every unit fails with the cause.
            for unit in group:
                _settle(unit, False, error)
            return
        if deferred and self.committed is not None:
            self.committed(written)
        for unit, (succeeded, value) in zip(group, outcomes, strict=True):
            _settle(unit, succeeded, value)


#: Session.info key of the GroupScope of a unit of SQLite's group commit.
GROUP_SCOPE = "callplane.group"


class GroupScope:
    """What one unit of a group commit shares with the group: items it leaves for the group to write
    before the commit (`defer`), and state it remembers for the units after it (`remember`, `recall`).
    Both are kept only if the unit succeeds: a unit rolled back to its savepoint leaves nothing."""

    def __init__(self, deferred: list[Any], remembered: dict[Any, Any]) -> None:
        self._group_deferred = deferred
        self._group_remembered = remembered
        self._deferred: list[Any] = []
        self._remembered: dict[Any, Any] = {}

    def defer(self, items: Iterable[Any]) -> None:
        self._deferred.extend(items)

    def deferred(self) -> Iterator[Any]:
        """The group's deferred items so far: the earlier units' and this one's."""
        yield from self._group_deferred
        yield from self._deferred

    def remember(self, key: Any, value: Any) -> None:
        self._remembered[key] = value

    def recall(self, key: Any) -> Any:
        if key in self._remembered:
            return self._remembered[key]
        return self._group_remembered.get(key)

    def forget_all(self) -> None:
        """This unit may have changed anything (users, call types): nothing remembered holds."""
        self._remembered.clear()
        self._group_remembered.clear()

    def keep(self) -> None:
        """The unit succeeded: what it left becomes the group's."""
        self._group_deferred.extend(self._deferred)
        self._group_remembered.update(self._remembered)


async def _in_transaction(connection: AsyncConnection) -> bool:
    driver = (await connection.get_raw_connection()).driver_connection  # sqlite_driver._InlineConnection
    return driver is not None and bool(driver.in_transaction)


def _settle(unit: _Unit, succeeded: bool, value: Any) -> None:
    if unit.done.done():
        return
    if unit.abandoned:
        unit.done.cancel()  # nobody will read it (an exception left unread would be logged)
    elif succeeded:
        unit.done.set_result(value)
    else:
        unit.done.set_exception(value)


class Database:
    """Owns the engines. SQLite gets a single writer connection (writes are serialized anyway; one
    connection avoids lock contention) with BEGIN IMMEDIATE, and a pool of readers with plain BEGIN."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.get_backend_name()
        self._process_lock: _ProcessLock | None = None
        if self.dialect == "sqlite":
            path = Path(self.url.database or "")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._process_lock = _ProcessLock(path)
            # Every transaction ends in an explicit commit or rollback, so the pool's reset on return
            # would only add a round trip to the driver's thread.
            self.write_engine = create_async_engine(
                self.url, echo=echo, pool_size=1, max_overflow=0, pool_reset_on_return=None
            )
            self.read_engine = create_async_engine(
                self.url, echo=echo, pool_size=pool_size, max_overflow=0, pool_reset_on_return=None
            )
            self._configure_sqlite(self.write_engine, begin="BEGIN IMMEDIATE")
            self._configure_sqlite(self.read_engine, begin="BEGIN")
        else:
            self.write_engine = create_async_engine(
                self.url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
            self.read_engine = self.write_engine
            self._connecting_is_an_outage(self.write_engine)
        # Writes that keep the server's own state alive (its replica lease), on a connection of their
        # own: they must not queue behind RPC writes for the pool when the server is overloaded, or
        # another replica would take it for dead. SQLite has one process: nobody else judges its lease.
        self._upkeep_engine = (
            None
            if self.dialect == "sqlite"
            else create_async_engine(self.url, echo=echo, pool_size=1, max_overflow=0, pool_pre_ping=True)
        )
        # Single statements outside any transaction (the call cache's freshness check): autocommit, so
        # asyncpg sends no BEGIN/COMMIT, and no pre-ping, so a statement is one round trip (a connection
        # found dead is replaced and the statement retried, in `probe`). SQLite: the pool of readers.
        self.probe_engine = (
            self.read_engine
            if self.dialect == "sqlite"
            else create_async_engine(
                self.url,
                echo=echo,
                pool_size=pool_size,
                max_overflow=pool_size,
                isolation_level="AUTOCOMMIT",
            )
        )
        if self.probe_engine is not self.read_engine:
            self._connecting_is_an_outage(self.probe_engine)
        self._write_sessions = async_sessionmaker(self.write_engine, expire_on_commit=False, autoflush=False)
        self._upkeep_sessions = (
            async_sessionmaker(self._upkeep_engine, expire_on_commit=False, autoflush=False)
            if self._upkeep_engine is not None
            else self._write_sessions
        )
        # SQLite has one writer connection: writers that queue for it share one commit.
        self._group_commit = _GroupCommit(self.write_engine) if self.dialect == "sqlite" else None
        self._read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False, autoflush=False)
        self._tracer: trace.Tracer | None = None

    @property
    def tracer(self) -> trace.Tracer | None:
        """When set (tracing on), every transaction is a span, and so is each SQLite group commit."""
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer
        if self._group_commit is not None:
            self._group_commit.tracer = tracer

    def defer_to_group(
        self, write: Callable[[AsyncSession, list[Any]], Awaitable[Any]], committed: Callable[[Any], None]
    ) -> None:
        """With group commit (SQLite): a unit may leave items to its GroupScope (`session.info[GROUP_SCOPE]`)
        instead of writing them; the group writes those of every unit that succeeded with `write`, once,
        right before its commit, and calls `committed` with what `write` returned after the commit."""
        if self._group_commit is not None:
            self._group_commit.write_deferred = write
            self._group_commit.committed = committed

    @staticmethod
    def _configure_sqlite(engine: AsyncEngine, *, begin: str) -> None:
        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take over transaction control from the sqlite3 module so we can say BEGIN IMMEDIATE.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # These are per connection, so every new connection gets them.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(connection: Any) -> None:
            # A deferred transaction that later writes fails at once with "database is locked",
            # ignoring busy_timeout; writers therefore take the write lock up front.
            connection.exec_driver_sql(begin)

    @staticmethod
    def _connecting_is_an_outage(engine: AsyncEngine) -> None:
        @event.listens_for(engine.sync_engine, "handle_error")
        def on_error(context: Any) -> None:
            # No connection yet: the server refused us (not accepting connections, SQLSTATE 55000 after
            # ALTER DATABASE ... ALLOW_CONNECTIONS false; too many clients; database gone; shutting down).
            # Whatever the SQLSTATE, nothing was asked of the database yet: an outage, not a fault.
            if context.connection is None and not context.is_pre_ping:
                context.is_disconnect = True

    @property
    def group_commit_sizes(self) -> Distribution | None:
        """Writes per group commit (SQLite); None where writes are not grouped."""
        return None if self._group_commit is None else self._group_commit.batch_sizes

    @property
    def sole_writer(self) -> bool:
        """True when no other process can change this database (an embedded SQLite file we hold the
        lock of): then every change is one this process made."""
        return self._process_lock is not None

    @property
    def engines(self) -> dict[str, AsyncEngine]:
        """Every engine by role (several roles may share one engine)."""
        engines = {"write": self.write_engine, "read": self.read_engine, "probe": self.probe_engine}
        if self._upkeep_engine is not None:
            engines["upkeep"] = self._upkeep_engine
        return engines

    async def dispose(self) -> None:
        await self.write_engine.dispose()
        if self.probe_engine is not self.read_engine:
            await self.probe_engine.dispose()
        if self._upkeep_engine is not None:
            await self._upkeep_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()
        if self._process_lock is not None:
            self._process_lock.release()

    @asynccontextmanager
    async def _session(self, *, write: bool, upkeep: bool = False) -> AsyncIterator[AsyncSession]:
        factory = self._upkeep_sessions if upkeep else self._write_sessions if write else self._read_sessions
        async with factory() as session, session.begin():
            yield session

    async def run(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, write: bool, upkeep: bool = False
    ) -> T:
        """Run `work` in one transaction, retrying it whole on transient conflicts; database
        outages surface as Unavailable, domain errors pass through untouched. `upkeep`: a write of the
        server's own upkeep, on its own connection (PostgreSQL)."""
        if self._tracer is not None and trace.get_current_span().get_span_context().is_valid:
            return await self._run_traced(self._tracer, work, write=write, upkeep=upkeep)
        return await self._run(work, write=write, upkeep=upkeep)

    async def _run_traced(
        self,
        tracer: trace.Tracer,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        write: bool,
        upkeep: bool,
    ) -> T:
        """`_run` in a span of its own (within a trace only: background work starts none)."""
        attempts = 0

        async def counted(session: AsyncSession) -> T:
            nonlocal attempts
            attempts += 1
            return await work(session)

        with tracer.start_as_current_span(
            "transaction",
            attributes={"db.system": self.dialect, "callplane.transaction.write": write},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._run(counted, write=write, upkeep=upkeep)
            except Exception as error:
                span.set_attribute("error.type", type(error).__name__)
                raise
            finally:
                span.set_attribute("callplane.transaction.attempts", attempts)

    async def _run(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, write: bool, upkeep: bool = False
    ) -> T:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_retryable),
                stop=stop_after_attempt(5),
                wait=wait_random_exponential(multiplier=0.005, max=0.2),
                reraise=True,
            ):
                with attempt:
                    if write and self._group_commit is not None:
                        return await self._group_commit.run(work)
                    async with self._session(write=write, upkeep=upkeep) as session:
                        result = await work(session)
                        if write and deadlines.passed(deadlines.current_deadline()):
                            # Nobody waits for the answer: roll back rather than commit unseen.
                            raise _caller_gone()
                        return result
        except CallplaneError:
            raise
        except Exception as error:
            _raise_as_outage(error)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def probe(self, statement: Executable, parameters: Mapping[str, Any]) -> list[Any]:
        """The rows of one read statement, run outside any transaction (it sees everything committed
        before it starts). A pooled connection found dead is replaced and the statement run again
        once; outages surface as Unavailable."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(
                    lambda error: isinstance(error, exc.DBAPIError) and error.connection_invalidated
                ),
                stop=stop_after_attempt(2),
                reraise=True,
            ):
                with attempt:
                    async with self.probe_engine.connect() as connection:
                        return list(await connection.execute(statement, parameters))
        except Exception as error:
            _raise_as_outage(error)
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def listen(self, channel: str, on_notify: Callable[[str], None]) -> Callable[[], Awaitable[None]]:
        """PostgreSQL only: calls `on_notify` with the payload of every NOTIFY on `channel`, and with ""
        after each (re)connection (a doorbell: it may miss notifications while reconnecting, so callers
        also poll). Returns an async stop function."""
        if self.dialect != "postgresql":

            async def nothing() -> None:
                return None

            return nothing
        import asyncpg

        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)

        async def keep_listening() -> None:
            while True:
                try:
                    connection = await asyncpg.connect(dsn)
                    try:
                        lost = asyncio.Event()
                        connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                        await connection.add_listener(channel, lambda *args: on_notify(args[-1]))
                        on_notify("")  # anything missed while disconnected is picked up by a poll
                        await lost.wait()
                    finally:
                        await connection.close()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning("event notifications unavailable (%s); polling only, retrying", error)
                    await asyncio.sleep(1.0)

        task = asyncio.create_task(keep_listening(), name=f"listen-{channel}", context=contextvars.Context())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return stop

    async def run_ddl(self, statements: list[str]) -> None:
        """Runs schema statements in one transaction on the writer (at startup, before serving)."""
        async with self.write_engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent; serialized across processes)."""
        from callplane_server.store.migrations.runner import upgrade_to_head

        await upgrade_to_head(self.write_engine)
