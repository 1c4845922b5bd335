"""Running prebuilt Core statements on a unit of work's connection.

On SQLite the hot statements skip SQLAlchemy's execution layer: each statement object is compiled once
(SQL text, parameter order, the column types' bind and result processors) and then runs straight on the
transaction's sqlite3 connection, which the inline driver uses on the event loop anyway. A page-cached
SQLite statement takes a few microseconds; SQLAlchemy's per-execution work around it (the greenlet hop,
the execution context, cache-key lookup, result set-up) took ~100 µs, several times a write's whole
database cost. The statements are the same objects either way, so the SQL is the same; engine
`before_cursor_execute` listeners still see every statement. Statements that need SQLAlchemy's help
(expanding IN lists, Python-side column defaults) and every PostgreSQL statement take the normal path.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Executable, Result, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler

Parameters = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


class Rows:
    """The part of SQLAlchemy's Result the store uses, over rows already fetched and converted."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]


class _Plan:
    """One statement compiled for SQLite, with its parameter order and type conversions."""

    __slots__ = ("_binds", "_convert", "_defaults", "_row", "sql")

    def __init__(self, compiled: SQLCompiler, dialect: Dialect) -> None:
        self.sql = compiled.string
        processors = compiled._bind_processors
        names = compiled.positiontup or ()
        # One processor per parameter (SQLAlchemy types them as possibly a sequence, for tuple binds).
        self._binds: list[tuple[str, Callable[[Any], Any] | None]] = [
            (name, processors.get(name))  # type: ignore[misc]
            for name in names
        ]
        self._defaults = {
            name: compiled.binds[name].effective_value for name in names if name in compiled.binds
        }
        columns = compiled._result_columns
        self._row: Callable[..., Any] | None = None
        self._convert: list[Callable[[Any], Any] | None] = []
        if columns:
            self._row = namedtuple("Row", [column[0] for column in columns])  # type: ignore[misc]
            self._convert = [column[3]._cached_result_processor(dialect, None) for column in columns]

    def arguments(self, parameters: Mapping[str, Any]) -> tuple[Any, ...]:
        values = []
        for name, process in self._binds:
            value = parameters[name] if name in parameters else self._defaults.get(name)
            values.append(process(value) if process is not None and value is not None else value)
        return tuple(values)

    def rows(self, fetched: list[tuple[Any, ...]]) -> list[Any]:
        if self._row is None:
            return []
        convert, make = self._convert, self._row
        return [
            make(
                *[
                    value if fn is None or value is None else fn(value)
                    for fn, value in zip(convert, raw, strict=True)
                ]
            )
            for raw in fetched
        ]


_PLANS: dict[tuple[int, tuple[str, ...]], tuple[Executable, _Plan | None]] = {}


def _plan_for(statement: Executable, keys: tuple[str, ...], dialect: Dialect) -> _Plan | None:
    slot = (id(statement), keys)
    found = _PLANS.get(slot)
    if found is not None and found[0] is statement:
        return found[1]
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) or None)  # type: ignore[attr-defined]
    plan: _Plan | None = None
    needs_help = (
        "_post_compile_expanded_state",
        "literal_execute_params",
        "post_compile_params",
        "insert_prefetch",
        "update_prefetch",
    )  # (`postfetch`, columns set to SQL expressions, matters only to the ORM's state: not needed here)
    usable = isinstance(compiled, SQLCompiler) and not any(
        getattr(compiled, name, None) for name in needs_help
    )
    if usable:
        assert isinstance(compiled, SQLCompiler)
        try:
            plan = _Plan(compiled, dialect)
        except (TypeError, ValueError):  # a column name namedtuple refuses: take the normal path
            plan = None
    _PLANS[slot] = (statement, plan)  # statements are module-level constants: a few dozen entries
    return plan


class Statements:
    """Executes Core statements on the transaction's connection (see the module docstring)."""

    __slots__ = ("_connection", "_session", "_sqlite")

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._connection: AsyncConnection | None = None
        self._sqlite: sqlite3.Connection | None = None

    async def execute(self, statement: Executable, parameters: Parameters = None) -> Result[Any] | Rows:
        if self._connection is None:
            self._connection = await self._session.connection()
            if self._connection.dialect.name == "sqlite":
                raw = await self._connection.get_raw_connection()
                inline = raw.driver_connection
                self._sqlite = inline.sqlite if inline is not None else None
        if self._sqlite is not None:
            rows = self._inline(statement, parameters)
            if rows is not None:
                return rows
        return await self._connection.execute(statement, parameters)

    def _inline(self, statement: Executable, parameters: Parameters) -> Rows | None:
        assert self._connection is not None and self._sqlite is not None
        many = isinstance(parameters, Sequence)
        batch: Sequence[Mapping[str, Any]] = parameters if many else [parameters or {}]  # type: ignore[list-item,assignment]
        if not batch:
            return Rows([])
        keys = tuple(batch[0])
        plan = _plan_for(statement, keys, self._connection.dialect)
        if plan is None:
            return None
        arguments = [plan.arguments(item) for item in batch]
        connection = self._connection.sync_connection
        assert connection is not None
        cursor = self._sqlite.cursor()
        cursor_arguments: Any = arguments if many else arguments[0]
        context = _announce(connection, cursor, plan.sql, cursor_arguments, many)
        try:
            if many:
                cursor.executemany(plan.sql, arguments)
                return Rows([])
            cursor.execute(plan.sql, arguments[0])
            return Rows(plan.rows(cursor.fetchall()))
        except sqlite3.Error as error:
            # As SQLAlchemy raises it (IntegrityError, OperationalError...), for the retry and outage rules.
            raise exc.DBAPIError.instance(plan.sql, arguments, error, sqlite3.Error) from error
        finally:
            if context is not None and connection.dispatch.after_cursor_execute:
                connection.dispatch.after_cursor_execute(
                    connection, cursor, plan.sql, cursor_arguments, context, many
                )
            cursor.close()


class InlineExecution:
    """Stands in for SQLAlchemy's execution context in the cursor events of a statement run inline, for
    listeners that keep per-statement state on it (OpenTelemetry's statement span, ended by
    after_cursor_execute)."""


def _announce(connection: Any, cursor: Any, sql: str, arguments: Any, many: bool) -> InlineExecution | None:
    """Fires before_cursor_execute for a statement run inline, as SQLAlchemy does for its own (only where
    listeners are registered); returns the context to hand to after_cursor_execute, None when nobody
    listens."""
    if not (connection._has_events or connection.engine._has_events):
        return None
    if not connection.dispatch.before_cursor_execute and not connection.dispatch.after_cursor_execute:
        return None
    context = InlineExecution()
    connection.dispatch.before_cursor_execute(connection, cursor, sql, arguments, context, many)
    return context
