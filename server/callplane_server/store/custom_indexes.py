"""Declared indexes on call custom data, so QueryCalls can filter and sort on custom fields without
reading every call.

As in MongoDB or Firestore, the operator declares the compound indexes the application's queries need
(`--custom-index region:string,priority:number:desc`); each is an expression index on the same typed
expressions the filter and sort compilers emit (`JsonScalar`, with the path as a literal), followed by
`cid`, the sort's tie-breaker, so a query whose equality filters, range filter and sort follow the index
reads only the rows it returns. Kinds must match how the fields are queried: a `number` index serves
`{"custom.priority": {"$gte": 5}}` and a numeric sort, a `string` index string equality.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from sqlalchemy import text
from sqlalchemy.engine import Dialect

from callplane_server.domain.records import SortInput
from callplane_server.store.database import Database
from callplane_server.store.models import CallRow
from callplane_server.store.query.entities import CUSTOM_PREFIX
from callplane_server.store.query.filters import MAX_PATH_DEPTH, parse_custom_path
from callplane_server.store.query.jsonsql import JsonScalar, ScalarKind

_KINDS = get_args(ScalarKind)


@dataclass(frozen=True)
class IndexedField:
    path: tuple[str, ...]
    kind: ScalarKind
    descending: bool = False

    def __str__(self) -> str:
        return f"{'.'.join(self.path)}:{self.kind}" + (":desc" if self.descending else "")


@dataclass(frozen=True)
class CustomIndex:
    fields: tuple[IndexedField, ...]

    def __str__(self) -> str:
        return ",".join(str(field) for field in self.fields)

    @property
    def name(self) -> str:
        # Stable across restarts and processes, and within PostgreSQL's 63-character limit.
        return "ix_calls_custom_" + hashlib.sha256(str(self).encode()).hexdigest()[:16]


def parse_custom_index(spec: str) -> CustomIndex:
    """`region:string,priority:number:desc`: fields in index order, each `path:kind[:asc|desc]`, the
    path in custom data with or without `custom.`. Raises ValueError saying what is wrong."""
    fields: list[IndexedField] = []
    for part in spec.split(","):
        pieces = part.strip().split(":")
        if len(pieces) not in (2, 3) or not pieces[0]:
            raise ValueError(f"custom index {spec!r}: {part.strip()!r} is not path:kind[:asc|desc]")
        path_text, kind = pieces[0], pieces[1]
        order = pieces[2] if len(pieces) == 3 else "asc"
        if kind not in _KINDS:
            raise ValueError(f"custom index {spec!r}: kind {kind!r} is not one of {', '.join(_KINDS)}")
        if order not in ("asc", "desc"):
            raise ValueError(f"custom index {spec!r}: order {order!r} is not asc or desc")
        # The same paths a query may name (keys and depth), so every declared index can be used.
        segments = parse_custom_path(
            path_text if path_text.startswith(CUSTOM_PREFIX) else CUSTOM_PREFIX + path_text
        )
        if segments is None:
            raise ValueError(
                f"custom index {spec!r}: {path_text!r} is not a path of at most {MAX_PATH_DEPTH} "
                "[A-Za-z0-9_-]+ keys"
            )
        # arg-type: kind is a str, checked against _KINDS above.
        fields.append(IndexedField(tuple(segments), kind, order == "desc"))  # type: ignore[arg-type]
    return CustomIndex(tuple(fields))


def create_statement(index: CustomIndex, dialect: Dialect, *, concurrently: bool = False) -> str:
    custom = CallRow.__table__.c.custom
    columns = []
    for field in index.fields:
        expression = str(
            JsonScalar(custom, field.path, field.kind).compile(
                dialect=dialect,
                compile_kwargs={"include_table": False},  # an index expression names bare columns
            )
        )
        order = "DESC" if field.descending else "ASC"
        if dialect.name == "postgresql":
            # The compilers sort NULL as the smallest value (SQLite's own order); PostgreSQL's default
            # puts NULL last ascending, so say it, or the index order would not match the query's.
            order += " NULLS LAST" if field.descending else " NULLS FIRST"
        columns.append(f"({expression}) {order}")
    columns.append("cid")
    how = "CONCURRENTLY " if concurrently else ""
    return f"CREATE INDEX {how}IF NOT EXISTS {index.name} ON calls ({', '.join(columns)})"


#: PostgreSQL gathers statistics on an index's expressions only when the table is analyzed. Until then
#: (autovacuum's next analyze) its planner guesses how many calls match a custom field, and may fetch and
#: sort every match through the new index where walking the sort index would stop after a few rows.
ANALYZE_CALLS = "ANALYZE calls"


async def ensure_custom_indexes(database: Database, indexes: Sequence[CustomIndex]) -> None:
    """Creates the declared indexes that do not exist yet (undeclaring one does not drop it)."""
    if not indexes:
        return
    dialect = database.write_engine.dialect
    statements = [create_statement(index, dialect) for index in indexes]
    if database.dialect == "postgresql":
        async with database.write_engine.connect() as connection:
            missing = [
                index
                for index in indexes
                if await connection.scalar(text("SELECT to_regclass(:name)"), {"name": index.name}) is None
            ]
            await connection.rollback()
        if missing:
            statements.append(ANALYZE_CALLS)
    await database.run_ddl(statements)


# --- which declared index serves a query ------------------------------------------------------------
#
# As Firestore and MongoDB rule it: an index serves a conjunction of custom-data conditions when its
# leading fields are exactly the fields compared for equality (`$eq`, a bare value, `$in`), in any order,
# of the kind of the compared values; a range (`$gt`...) or a sort on a custom field may then follow.
# A query with no custom equality needs an index whose first field is one of its range or sort fields.
# Conditions an index never helps with (`$ne`, `$nin`, `$exists`, `$contains`, `$q`, `$autocomplete`,
# null, anything under `$nor`) are applied to the rows the index finds and require nothing. Each branch
# of an `$or` is a conjunction of its own (both databases union one index scan per branch).

Field = tuple[tuple[str, ...], ScalarKind]
_RANGE_OPERATORS = ("$gt", "$gte", "$lt", "$lte")
_MAX_BRANCHES = 32


@dataclass(frozen=True)
class Conjunction:
    """The indexable custom-data conditions of one branch of a query, and its custom sort."""

    equalities: frozenset[Field]
    ranges: frozenset[Field]
    sorts: tuple[IndexedField, ...]

    @property
    def needs_index(self) -> bool:
        return bool(self.equalities or self.ranges or self.sorts)

    def served_by(self, index: CustomIndex) -> bool:
        leading = index.fields[: len(self.equalities)]
        if len(leading) < len(self.equalities):
            return False
        if {(field.path, field.kind) for field in leading} != self.equalities:
            return False
        if self.equalities:
            return True
        if len(index.fields) <= len(self.equalities):
            return False
        first = index.fields[0]
        return (first.path, first.kind) in self.ranges or any(
            (first.path, first.kind) == (sort.path, sort.kind) for sort in self.sorts
        )

    def suggestion(self) -> CustomIndex:
        """The index to declare for this conjunction: its equality fields (by path), then its first range
        field, or else its first custom sort."""
        fields = [IndexedField(path, kind) for path, kind in sorted(self.equalities)]
        tail = [IndexedField(path, kind) for path, kind in sorted(self.ranges)][:1]
        if not tail and self.sorts:
            tail = [self.sorts[0]]
        return CustomIndex(tuple(fields + tail))


@dataclass(frozen=True)
class QueryShape:
    """The conjunctions of a QueryCalls request (one unless it has `$or`), without its values."""

    branches: tuple[Conjunction, ...]

    def unserved(self, indexes: Iterable[CustomIndex]) -> Conjunction | None:
        """The first branch that needs an index none of `indexes` serves, or None."""
        candidates = list(indexes)
        for branch in self.branches:
            if branch.needs_index and not any(branch.served_by(index) for index in candidates):
                return branch
        return None


def _scalar_kind(value: Any) -> ScalarKind | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    return None


class _Unanalyzable(Exception):
    """Malformed or too branchy: the filter compiler judges it (or it runs unchecked)."""


def _conditions(field: str, value: Any) -> tuple[list[Field], list[Field]]:
    path = parse_custom_path(field)
    if path is None:
        raise _Unanalyzable
    segments = tuple(path)
    operations = list(value.items()) if isinstance(value, dict) else [("$eq", value)]
    equalities: list[Field] = []
    ranges: list[Field] = []
    for op, operand in operations:
        if op == "$eq" and (kind := _scalar_kind(operand)) is not None:
            equalities.append((segments, kind))
        elif op == "$in" and isinstance(operand, list) and operand:
            kinds = {_scalar_kind(item) for item in operand}
            if len(kinds) == 1 and None not in kinds:
                equalities.append((segments, kinds.pop()))  # type: ignore[arg-type]
        elif op in _RANGE_OPERATORS and (kind := _scalar_kind(operand)) in ("string", "number"):
            ranges.append((segments, kind))
    return equalities, ranges


def _branches(conditions: Any) -> list[tuple[set[Field], set[Field]]]:
    """Disjunctive form of the indexable conditions: one (equalities, ranges) pair per branch."""
    if not isinstance(conditions, dict):
        raise _Unanalyzable
    branches: list[tuple[set[Field], set[Field]]] = [(set(), set())]
    for key, value in conditions.items():
        if key == "$and" and isinstance(value, list):
            parts = [_branches(item) for item in value]
        elif key == "$or" and isinstance(value, list) and value:
            parts = [[branch for item in value for branch in _branches(item)]]
        elif key.startswith(CUSTOM_PREFIX):
            equalities, ranges = _conditions(key, value)
            parts = [[(set(equalities), set(ranges))]]
        else:
            continue  # built-in fields, $nor, or what the compiler will refuse
        for alternatives in parts:
            branches = [
                (eq | other_eq, rng | other_rng)
                for eq, rng in branches
                for other_eq, other_rng in alternatives
            ]
            if len(branches) > _MAX_BRANCHES:
                raise _Unanalyzable
    return branches


def query_shape(filter_conditions: dict[str, Any] | None, sort: Sequence[SortInput]) -> QueryShape | None:
    """The shape of a QueryCalls request as far as custom-data indexes go; None when it cannot say
    (a malformed request, or an `$or` of more than a few dozen branches)."""
    sorts: list[IndexedField] = []
    for item in sort:
        if item.field.startswith(CUSTOM_PREFIX) and item.type is not None:
            path = parse_custom_path(item.field)
            if path is None:
                return None
            sorts.append(IndexedField(tuple(path), item.type, item.direction == "desc"))
    try:
        branches = _branches(filter_conditions or {})
    except (_Unanalyzable, RecursionError):
        return None
    return QueryShape(
        tuple(
            Conjunction(
                frozenset(equalities),
                frozenset(field for field in ranges if field not in equalities),
                tuple(sorts),
            )
            for equalities, ranges in branches
        )
    )
