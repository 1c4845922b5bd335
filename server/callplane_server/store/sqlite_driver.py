"""SQLAlchemy's aiosqlite dialect, with statements that cannot block run on the event loop.

Through the stock dialect every cursor call (open, execute, fetch, close) goes to aiosqlite's thread and
back: about four hops per statement, each waiting its turn on a busy event loop, which cost more than the
statements themselves (a page-cached SQLite statement takes microseconds); measured, it halved read
throughput. Here aiosqlite still opens, owns and closes each connection and runs every call that can
block on its thread: a COMMIT that wrote (it fsyncs, synchronous=FULL, and may checkpoint the WAL) and
BEGIN IMMEDIATE (it may wait for the write lock). Every other statement runs inline on the same sqlite3
connection: readers in WAL mode never wait for a lock, and the process lock (database.py) keeps other
processes off the file. SQLAlchemy serializes the calls on a connection, so the two threads never use it
at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.engine import Connection
from sqlalchemy.util.concurrency import await_


class _InlineCursor:
    """The async cursor API SQLAlchemy's adapter expects, over a sqlite3 cursor, without a thread."""

    __slots__ = ("_connection", "_cursor")

    def __init__(self, connection: _InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection._open().cursor()

    async def __aenter__(self) -> _InlineCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, operation: str, parameters: Sequence[Any] = ()) -> _InlineCursor:
        if operation.startswith("BEGIN IMMEDIATE"):
            # Takes the write lock, so it may wait (busy_timeout): never on the loop.
            await self._connection.driver.execute_fetchall(operation, parameters)
        else:
            self._cursor.execute(operation, parameters)
        return self

    async def executemany(self, operation: str, parameters: Sequence[Sequence[Any]]) -> _InlineCursor:
        self._cursor.executemany(operation, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None


class _InlineConnection:
    """The async connection API SQLAlchemy's adapter expects: aiosqlite's connection for what can block,
    its sqlite3 connection for the rest."""

    def __init__(self, driver: aiosqlite.Connection, connection: sqlite3.Connection) -> None:
        self.driver = driver
        self.sqlite: sqlite3.Connection | None = connection
        self._changes_committed = connection.total_changes

    @property
    def _connection(self) -> sqlite3.Connection | None:  # what the adapter tests for "still open"
        return self.sqlite

    @property
    def isolation_level(self) -> str | None:
        return self._open().isolation_level

    @property
    def in_transaction(self) -> bool:
        """False once SQLite itself has rolled the transaction back (it does on a full disk, an I/O
        error and a few others: https://sqlite.org/lang_transaction.html, "Response To Errors")."""
        return self._open().in_transaction

    def _open(self) -> sqlite3.Connection:
        if self.sqlite is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        return self.sqlite

    def cursor(self) -> _InlineCursor:
        self._open()
        return _InlineCursor(self)

    async def commit(self) -> None:
        connection = self._open()
        if connection.total_changes != self._changes_committed:
            # This transaction wrote: the commit fsyncs (and may checkpoint the WAL).
            await self.driver.commit()
        else:
            connection.commit()
        self._changes_committed = connection.total_changes

    async def rollback(self) -> None:
        connection = self._open()
        connection.rollback()
        self._changes_committed = connection.total_changes

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._open().create_function(*args, **kwargs)

    async def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite = None
            await self.driver.close()

    def stop(self) -> None:
        self.sqlite = None
        self.driver.stop()


class _InlineAdaptedConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    @property
    def isolation_level(self) -> str | None:
        # no-any-return: the adapter types _connection as SQLAlchemy's DBAPI protocol (attributes are Any)
        return self._connection.isolation_level  # type: ignore[no-any-return]

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._connection._open().isolation_level = value


class _InlineDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *args: Any, **kwargs: Any) -> _InlineAdaptedConnection:
        kwargs["check_same_thread"] = False  # used inline and on aiosqlite's thread, never at once
        opened: list[sqlite3.Connection] = []

        def connector() -> sqlite3.Connection:
            opened.append(sqlite3.connect(*args, **kwargs))
            return opened[0]

        driver = aiosqlite.Connection(connector, iter_chunk_size=64)
        driver._thread.daemon = True  # as the stock dialect does: a leaked connection must not hang exit
        await_(driver)
        # arg-type: _InlineConnection has what the adapter calls but not the protocol's catch-all __getattr__
        return _InlineAdaptedConnection(self, _InlineConnection(driver, opened[0]))  # type: ignore[arg-type]


class InlineSQLiteDialect(SQLiteDialect_aiosqlite):
    """`sqlite+callplane://`: the aiosqlite dialect with `_InlineDBAPI`. SAVEPOINT and RELEASE (one pair
    per write of a group commit) run straight on the sqlite3 connection: SQLAlchemy compiles a new clause
    for each, which cost more than the rest of a small write's statements together. A rollback to a
    savepoint (a write that failed) keeps SQLAlchemy's path, which reports its errors with their cause."""

    driver = "callplane"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> _InlineDBAPI:
        return _InlineDBAPI(aiosqlite, sqlite3)

    def do_savepoint(self, connection: Connection, name: str) -> None:
        _run_inline(connection, f"SAVEPOINT {self.identifier_preparer.quote(name)}")

    def do_release_savepoint(self, connection: Connection, name: str) -> None:
        _run_inline(connection, f"RELEASE SAVEPOINT {self.identifier_preparer.quote(name)}")


def _run_inline(connection: Connection, sql: str) -> None:
    """Runs `sql` on the connection's sqlite3 connection; engine listeners see it as any statement."""
    from callplane_server.store.execution import InlineExecution

    context = None
    if connection._has_events or connection.engine._has_events:
        context = InlineExecution()
        connection.dispatch.before_cursor_execute(connection, None, sql, (), context, False)
    adapted = connection.connection.dbapi_connection
    inline: _InlineConnection = adapted._connection  # type: ignore[union-attr]
    try:
        # A sqlite3 error goes up as it is: the Connection wraps it as it wraps any driver error.
        inline._open().execute(sql)
    finally:
        if context is not None and connection.dispatch.after_cursor_execute:
            connection.dispatch.after_cursor_execute(connection, None, sql, (), context, False)
