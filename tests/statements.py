"""Counting the SQL one RPC executes on an in-process server (Django's assertNumQueries, for gRPC).

How a statement is attributed to an RPC, and why background work cannot pollute the count:

- The test sends the RPC with a `x-callplane-statement-probe: <tag>` metadata entry. While recording,
  `Authenticator.authenticate` (which the API layer calls once per RPC, in the RPC's own task, before the
  servicer runs) is wrapped so that it also sets a test-only context variable to that tag. Everything the
  RPC runs inherits it: its own task, the greenlets SQLAlchemy's asyncio layer runs the sync engine in
  (they take the calling task's context), and the task in which SQLite's group commit runs each unit of
  work (started with the submitter's context). Background work runs in contexts the server creates fresh
  (timers, lease renewal, the event tailer and its polling, compaction, the group-commit drainer): it
  never carries a tag, so whatever it executes, whenever it runs, is not counted.
- A `before_cursor_execute` listener on every engine of the store (`write_engine` and `read_engine`,
  through `.sync_engine`) records each statement with the tag of the context it runs in. Everything that
  reaches a cursor is recorded: ORM and Core statements, `exec_driver_sql`, SAVEPOINT / RELEASE, and
  SQLite's `BEGIN IMMEDIATE`, which a `begin` listener issues with exec_driver_sql.
- Transaction control that never reaches a cursor is taken from the engine's `begin`, `commit` and
  `rollback` events: SQLite's COMMIT (sqlite3's `connection.commit()`), and asyncpg's BEGIN and COMMIT
  (asyncpg's transaction object). Entries are grouped per DBAPI connection into transactions (begin to
  commit/rollback) and attributed when the transaction ends: a statement to its context's tag; a
  SAVEPOINT and the RELEASE / ROLLBACK TO that ends it to the tag of the first tagged statement inside it
  (SQLite's group commit opens and releases each unit's savepoint from its drainer task); an untagged
  BEGIN / COMMIT / ROLLBACK to every tag in the transaction (the group commit's BEGIN IMMEDIATE and
  COMMIT, run by the drainer, are shared by the units of one group, and each of them pays for them).
  Every RPC gets a tag (probed or not), so the group's other units are never counted for the probed one.
- Connection checkouts are counted too (the pool's `checkout` event, in the caller's context). On
  PostgreSQL the write engine has `pool_pre_ping`, and SQLAlchemy's asyncpg ping outside a transaction is
  BEGIN; `;`; ROLLBACK: three round trips per checkout that no cursor event shows.

So the numbers are exact for one RPC, whatever runs beside it, as long as the server keeps running RPCs
in the context `Authenticator.authenticate` sets up (the principal lives there too). Caches make counts
depend on what ran before (the call cache, the compiled statement cache, asyncpg's prepared statements):
tests warm up with the same kind of request first and measure the steady state.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine

from callplane_server.api import errors as api_errors
from callplane_server.store import Store

T = TypeVar("T")

PROBE_HEADER = "x-callplane-statement-probe"
_probe: contextvars.ContextVar[str | None] = contextvars.ContextVar("callplane_statement_probe", default=None)

_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|END)\b", re.IGNORECASE)


def is_transaction_control(text: str) -> bool:
    return bool(_CONTROL.match(text))


@dataclass
class _Entry:
    text: str
    tag: str | None
    engine: str
    control: bool
    synthetic: bool = False  # recorded from an engine event, not a cursor


@dataclass
class _Transaction:
    entries: list[_Entry] = field(default_factory=list)


@dataclass
class Trace:
    """What one RPC executed, in order."""

    statements: list[str] = field(default_factory=list)
    transaction_control: list[str] = field(default_factory=list)
    checkouts: int = 0
    #: Whether the RPC carrying this trace's probe reached the server's authentication (so a count of
    #: zero means "executed nothing", not "the probe got lost").
    reached: bool = False
    #: Everything, in order, as (engine, text): statements and transaction control interleaved.
    log: list[tuple[str, str]] = field(default_factory=list)

    @property
    def counts(self) -> tuple[int, int, int]:
        return len(self.statements), len(self.transaction_control), self.checkouts

    def describe(self, width: int = 160) -> str:
        lines = [
            f"{len(self.statements)} statements, {len(self.transaction_control)} transaction control, "
            f"{self.checkouts} connection checkouts:"
        ]
        lines += [
            f"  {index:2d}. {engine}: {shape(text, width)}"
            for index, (engine, text) in enumerate(self.log, 1)
        ]
        return "\n".join(lines)


def abbreviate(text: str, width: int = 160) -> str:
    """One line, `width` characters at most."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


_PG_CAST = re.compile(r"::(?:TIMESTAMP WITH(?:OUT)? TIME ZONE|[A-Z]+(?:\(\d+\))?)")
_PG_PARAMETER = re.compile(r"\$\d+")
_SELECT_LIST = re.compile(r"SELECT (.+?) FROM")
_SET_LIST = re.compile(r"^UPDATE (\S+) SET (.+?) WHERE")
_INSERT_LISTS = re.compile(r"^INSERT INTO (\S+) \((.+?)\) VALUES \((.+?)\)")


def shape(text: str, width: int = 160) -> str:
    """A statement's shape, short enough to read in a list: the same for both dialects (PostgreSQL's
    casts and $n placeholders become ?), long column lists cut to their first entry and a count."""
    flat = _PG_PARAMETER.sub("?", _PG_CAST.sub("", " ".join(text.split())))

    def columns(match: re.Match[str]) -> str:
        names = match.group(1).split(", ")
        return match.group(0) if len(names) <= 2 else f"SELECT {names[0]}, …{len(names) - 1} more FROM"

    flat = _SELECT_LIST.sub(columns, flat)
    if update := _SET_LIST.match(flat):
        assignments = update.group(2).split(", ")
        if len(assignments) > 2:
            cut = f"UPDATE {update.group(1)} SET {assignments[0]}, …{len(assignments) - 1} more WHERE"
            flat = cut + flat[update.end() :]
    if insert := _INSERT_LISTS.match(flat):
        count = len(insert.group(2).split(", "))
        flat = f"INSERT INTO {insert.group(1)} ({count} columns) VALUES (…)" + flat[insert.end() :]
    return abbreviate(flat, width)


class StatementRecorder:
    """Records the statements of probed RPCs on a running server's store (see the module docstring).

    with StatementRecorder(store) as recorder:
        trace = await recorder.measure(lambda metadata: stub.UpdateCall(request, metadata=metadata))
    """

    def __init__(self, store: Store) -> None:
        # Named in the traces by role: SQLite has a writer and a pool of readers (which also run the call
        # cache's checks), PostgreSQL one pool for both, an autocommit pool for the checks ("probe") and a
        # connection for the server's own upkeep.
        self._engines: dict[str, Engine] = {}
        seen: set[int] = set()
        for role, engine in store.database.engines.items():
            if id(engine) not in seen:
                seen.add(id(engine))
                self._engines["db" if role == "write" and engine is store.database.read_engine else role] = (
                    engine.sync_engine
                )
        self._open: dict[int, _Transaction] = {}
        self._traces: dict[str, Trace] = {}
        self._listeners: list[tuple[Any, str, Callable[..., None]]] = []
        self._original_authenticate: Callable[..., None] | None = None
        self._tags = itertools.count(1)

    # -- installation -----------------------------------------------------------------------------------

    def __enter__(self) -> StatementRecorder:
        for name, engine in self._engines.items():
            # PostgreSQL's autocommit pool ("probe"): SQLAlchemy still fires begin/commit events there,
            # but asyncpg sends no BEGIN or COMMIT in autocommit mode; each statement stands alone.
            standalone = name == "probe"
            self._listen(engine, "before_cursor_execute", self._on_execute(name, standalone=standalone))
            self._listen(engine, "checkout", self._on_checkout)
            if standalone:
                continue
            self._listen(engine, "begin", self._on_begin(name))
            self._listen(engine, "commit", self._on_end(name, "COMMIT"))
            self._listen(engine, "rollback", self._on_end(name, "ROLLBACK"))
        original = api_errors.Authenticator.authenticate
        self._original_authenticate = original

        def authenticate(authenticator: Any, method: str, context: Any) -> None:
            original(authenticator, method, context)
            # Every RPC gets a tag (so untagged work is the server's own), probed ones the probe's.
            _probe.set(f"{method}#{next(self._tags)}")
            for key, value in context.invocation_metadata() or ():
                if key == PROBE_HEADER:
                    _probe.set(value)
                    trace = self._traces.get(value)
                    if trace is not None:
                        trace.reached = True

        api_errors.Authenticator.authenticate = authenticate  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._original_authenticate is not None:
            api_errors.Authenticator.authenticate = self._original_authenticate  # type: ignore[method-assign]
            self._original_authenticate = None
        for target, name, listener in self._listeners:
            event.remove(target, name, listener)
        self._listeners.clear()

    def _listen(self, target: Any, name: str, listener: Callable[..., None], **options: Any) -> None:
        event.listen(target, name, listener, **options)
        self._listeners.append((target, name, listener))

    # -- measuring --------------------------------------------------------------------------------------

    @contextmanager
    def probe(self) -> Iterator[tuple[list[tuple[str, str]], Trace]]:
        """(metadata to send with the RPC, the trace it fills)."""
        tag = f"probe-{next(self._tags)}-{uuid.uuid4().hex[:6]}"
        trace = self._traces[tag] = Trace()
        try:
            yield [(PROBE_HEADER, tag)], trace
        finally:
            self._traces.pop(tag, None)

    async def measure(self, rpc: Callable[[list[tuple[str, str]]], Awaitable[T]]) -> tuple[T, Trace]:
        """Runs `rpc(metadata)` and returns its result with what it executed. The RPC's transactions have
        all ended when its answer arrives (a write is acknowledged after its commit)."""
        with self.probe() as (metadata, trace):
            result = await rpc(metadata)
        return result, trace

    # -- listeners --------------------------------------------------------------------------------------

    def _transaction(self, connection: Any) -> _Transaction:
        key = id(connection.connection.dbapi_connection)
        current = self._open.get(key)
        if current is None:
            current = self._open[key] = _Transaction()
        return current

    def _on_begin(self, engine: str) -> Callable[..., None]:
        def listener(connection: Any) -> None:
            key = id(connection.connection.dbapi_connection)
            current = self._open.get(key)
            if current is not None and [entry.synthetic for entry in current.entries] == [False]:
                return  # SQLite: a `begin` listener before this one already ran its BEGIN through a cursor
            self._settle(self._open.pop(key, None))  # a transaction left open without an event
            # asyncpg's BEGIN never reaches a cursor; SQLite's may follow (then it replaces this entry).
            self._open[key] = _Transaction([_Entry("BEGIN", _probe.get(), engine, True, synthetic=True)])

        return listener

    def _on_execute(self, engine: str, *, standalone: bool = False) -> Callable[..., None]:
        def listener(
            connection: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
        ) -> None:
            key = id(connection.connection.dbapi_connection)
            control = is_transaction_control(statement)
            text = f"{statement} [executemany × {len(parameters)}]" if executemany else statement
            entry = _Entry(text, _probe.get(), engine, control)
            if standalone:
                self._settle(_Transaction([entry]))
                return
            if control and statement.lstrip().upper().startswith("BEGIN"):
                current = self._open.get(key)
                if current is not None and [e.synthetic for e in current.entries] == [True]:
                    current.entries[0] = _Entry(statement, current.entries[0].tag, engine, True)
                    return
                self._settle(self._open.pop(key, None))
                self._open[key] = _Transaction([entry])
                return
            self._transaction(connection).entries.append(entry)

        return listener

    def _on_end(self, engine: str, text: str) -> Callable[..., None]:
        def listener(connection: Any) -> None:
            key = id(connection.connection.dbapi_connection)
            transaction = self._open.pop(key, None) or _Transaction()
            transaction.entries.append(_Entry(text, _probe.get(), engine, True, synthetic=True))
            self._settle(transaction)

        return listener

    def _on_checkout(self, _dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        trace = self._traces.get(_probe.get() or "")
        if trace is not None:
            trace.checkouts += 1

    def _settle(self, transaction: _Transaction | None) -> None:
        if transaction is None:
            return
        entries = transaction.entries
        owners = _owners(entries)
        for tag in {owner for owner in owners if owner is not None}:
            trace = self._traces.get(tag)
            if trace is None:
                continue
            for entry, owner in zip(entries, owners, strict=True):
                shared = owner is None and (
                    (entry.control and _SAVEPOINT.match(entry.text) is None)
                    or (not entry.control and _GROUP_EVENT_WRITE.match(entry.text) is not None)
                )
                if owner == tag or shared:
                    (trace.transaction_control if entry.control else trace.statements).append(entry.text)
                    trace.log.append((entry.engine, entry.text))


# SQLite's group commit writes the events of all its units at once, from its untagged drainer task, before
# its COMMIT: like BEGIN and COMMIT, every unit of the group pays for those statements.
_GROUP_EVENT_WRITE = re.compile(
    r"^\s*(UPDATE counters\b|INSERT INTO events\b|INSERT INTO event_recipients\b"
    r"|UPDATE users SET last_event_seq)",
    re.I,
)
_SAVEPOINT = re.compile(
    r"^\s*(?:SAVEPOINT|RELEASE SAVEPOINT|RELEASE|ROLLBACK TO SAVEPOINT|ROLLBACK TO)\s+(\S+)", re.I
)


def _owners(entries: list[_Entry]) -> list[str | None]:
    """Whose each entry of one transaction is: a statement its context's tag; a SAVEPOINT, and the RELEASE
    or ROLLBACK TO that ends it, the tag of the first tagged statement inside it (SQLite's group commit
    opens and releases each unit's savepoint from its untagged drainer task); BEGIN, COMMIT and ROLLBACK
    nobody's in particular (None: the transaction's, shared by every tag in it)."""
    owners: list[str | None] = [entry.tag for entry in entries]
    savepoint_owner: dict[str, str | None] = {}
    for index, entry in enumerate(entries):
        match = _SAVEPOINT.match(entry.text) if entry.control else None
        if match is None:
            continue
        name = match.group(1)
        if entry.text.lstrip().upper().startswith("SAVEPOINT"):
            owner = entry.tag
            for later in entries[index + 1 :]:
                if owner is not None:
                    break
                ends = _SAVEPOINT.match(later.text) if later.control else None
                if ends is not None and ends.group(1) == name:
                    break
                owner = later.tag
            savepoint_owner[name] = owner
        owners[index] = savepoint_owner.get(name, entry.tag)
    return owners
