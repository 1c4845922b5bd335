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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from sqlalchemy.engine import Dialect

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


def _create_statement(index: CustomIndex, dialect: Dialect) -> str:
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
    return f"CREATE INDEX IF NOT EXISTS {index.name} ON calls ({', '.join(columns)})"


async def ensure_custom_indexes(database: Database, indexes: Sequence[CustomIndex]) -> None:
    """Creates the declared indexes that do not exist yet (undeclaring one does not drop it)."""
    if indexes:
        dialect = database.write_engine.dialect
        await database.run_ddl([_create_statement(index, dialect) for index in indexes])
