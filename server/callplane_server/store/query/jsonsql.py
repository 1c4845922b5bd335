"""Dialect-specific SQL for reading typed values out of JSON documents (the `custom` columns).

The filter and sort compilers are dialect-neutral; they build these elements and SQLAlchemy renders them
per dialect through `@compiles`. Every element takes the document column and a path of object keys. The
path is rendered into the SQL text as a literal, so that a query can use an expression index on the same
path (`custom_indexes.py`; neither SQLite nor PostgreSQL matches an index expression against a bound
parameter). That is safe because every segment must match `[A-Za-z0-9_-]+` (checked here, whoever
builds the element), so a path can hold no quote; values are always bound parameters.

Semantics shared by both dialects:
- `JsonTypeIs(doc, path, kind)`: whether the value at the path exists and has the JSON type `kind`.
- `JsonScalar(doc, path, kind)`: the value at the path as an SQL string / float / boolean when it has that
  JSON type, else NULL (missing, JSON null, or another type). The type test guards the cast inside a CASE
  because PostgreSQL does not promise to short-circuit AND, so `typeof = 'number' AND (x)::float8 > 1`
  could still cast a string and fail.
- `JsonArrayContains(doc, path, kind, value)`: whether the value at the path is an array holding the scalar.
The two predicates are never NULL, so they negate cleanly.

Caveat: a path segment made of digits indexes into an array on PostgreSQL (`#>` semantics) but names an
object key on SQLite. Custom data is keyed by names in practice, so we accept the difference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Boolean, Float, String, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal

ScalarKind = Literal["string", "number", "boolean"]
TypeKind = Literal["string", "number", "boolean", "null", "array", "present"]

# json_type() names on SQLite / jsonb_typeof() names on PostgreSQL for each JSON kind.
_SQLITE_TYPES: dict[str, tuple[str, ...]] = {
    "string": ("text",),
    "number": ("integer", "real"),
    "boolean": ("true", "false"),
    "null": ("null",),
    "array": ("array",),
}
_PG_TYPES: dict[str, str] = {
    "string": "string",
    "number": "number",
    "boolean": "boolean",
    "null": "null",
    "array": "array",
}
_SCALAR_TYPES: dict[str, TypeEngine[Any]] = {"string": String(), "number": Float(), "boolean": Boolean()}
_PG_CASTS: dict[str, str] = {"string": "TEXT", "number": "FLOAT8", "boolean": "BOOLEAN"}


PATH_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def checked_segments(segments: Sequence[str]) -> tuple[str, ...]:
    """The path (empty: the document itself), after checking that it can be rendered as a literal (see
    the module docstring)."""
    path = tuple(segments)
    if not all(isinstance(s, str) and PATH_SEGMENT.fullmatch(s) for s in path):
        raise ValueError(f"not a JSON path of [A-Za-z0-9_-]+ keys: {path!r}")
    return path


def _sqlite_path(segments: Sequence[str]) -> str:
    return "'$" + "".join(f'."{segment}"' for segment in segments) + "'"


def _pg_path(segments: Sequence[str]) -> str:
    return "CAST('{" + ",".join(segments) + "}' AS TEXT[])"


def _clause(doc: Any) -> ColumnElement[Any]:
    # Accept ORM attributes (CallRow.custom) as well as Core columns.
    element = doc.__clause_element__() if hasattr(doc, "__clause_element__") else doc
    assert isinstance(element, ColumnElement)
    return element


class _JsonElement(ColumnElement[Any]):
    """Base: a document column, a literal path and a kind; path and kind are part of the statement
    cache key (the path is in the SQL text)."""

    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 - SQLAlchemy's declared structure, read by the cache-key logic
        ("doc", InternalTraversal.dp_clauseelement),
        ("segments", InternalTraversal.dp_string_list),
        ("kind", InternalTraversal.dp_string),
    ]

    def __init__(self, doc: Any, segments: Sequence[str], kind: str) -> None:
        self.doc = _clause(doc)
        self.segments = checked_segments(segments)
        self.kind = kind

    @property
    def _from_objects(self) -> list[Any]:
        return self.doc._from_objects


class JsonTypeIs(_JsonElement):
    """True iff the value at the path exists and is of `kind` (`present`: exists, JSON null included)."""

    __visit_name__ = "json_type_is"
    inherit_cache = True
    type = Boolean()

    def __init__(self, doc: Any, segments: Sequence[str], kind: TypeKind) -> None:
        super().__init__(doc, segments, kind)


class JsonScalar(_JsonElement):
    """The value at the path as an SQL scalar when its JSON type is `kind`, else NULL."""

    __visit_name__ = "json_scalar"
    inherit_cache = True

    def __init__(self, doc: Any, segments: Sequence[str], kind: ScalarKind) -> None:
        super().__init__(doc, segments, kind)
        self.type = _SCALAR_TYPES[kind]


class JsonArrayContains(_JsonElement):
    """True iff the value at the path is an array with an element equal to `value` (of JSON type `kind`)."""

    __visit_name__ = "json_array_contains"
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012
        *_JsonElement._traverse_internals,
        ("value", InternalTraversal.dp_clauseelement),
    ]
    type = Boolean()

    def __init__(
        self, doc: Any, segments: Sequence[str], kind: ScalarKind, value: str | float | bool
    ) -> None:
        super().__init__(doc, segments, kind)
        self.value = bindparam(None, value, type_=_SCALAR_TYPES[kind], unique=True)


# --- SQLite -------------------------------------------------------------------------------------------


def _sqlite_parts(element: _JsonElement, compiler: SQLCompiler, kw: dict[str, Any]) -> tuple[str, str]:
    return compiler.process(element.doc, **kw), _sqlite_path(element.segments)


def _sqlite_type_test(doc: str, path: str, kind: str) -> str:
    json_type = f"json_type({doc}, {path})"
    if kind == "present":
        return f"({json_type} IS NOT NULL)"
    names = ", ".join(f"'{name}'" for name in _SQLITE_TYPES[kind])
    # COALESCE keeps the test two-valued (false, not NULL, for a missing path) so NOT works as expected.
    return f"(COALESCE({json_type}, '') IN ({names}))"


@compiles(JsonTypeIs)
@compiles(JsonTypeIs, "sqlite")
def _sqlite_type_is(element: JsonTypeIs, compiler: SQLCompiler, **kw: Any) -> str:
    doc, path = _sqlite_parts(element, compiler, kw)
    return _sqlite_type_test(doc, path, element.kind)


@compiles(JsonScalar)
@compiles(JsonScalar, "sqlite")
def _sqlite_scalar(element: JsonScalar, compiler: SQLCompiler, **kw: Any) -> str:
    # json_extract yields TEXT for strings, INTEGER/REAL for numbers and 1/0 for booleans, which compare
    # correctly with the bound Python values (the Boolean type binds 1/0).
    doc, path = _sqlite_parts(element, compiler, kw)
    return f"(CASE WHEN {_sqlite_type_test(doc, path, element.kind)} THEN json_extract({doc}, {path}) END)"


@compiles(JsonArrayContains)
@compiles(JsonArrayContains, "sqlite")
def _sqlite_array_contains(element: JsonArrayContains, compiler: SQLCompiler, **kw: Any) -> str:
    # json_each also walks objects, hence the explicit array test.
    doc, path = _sqlite_parts(element, compiler, kw)
    value = compiler.process(element.value, **kw)
    names = ", ".join(f"'{name}'" for name in _SQLITE_TYPES[element.kind])
    return (
        f"({_sqlite_type_test(doc, path, 'array')} AND EXISTS (SELECT 1 FROM json_each({doc}, {path}) "
        f"AS cp_elem WHERE cp_elem.type IN ({names}) AND cp_elem.value = {value}))"
    )


# --- PostgreSQL (JSONB documents) ---------------------------------------------------------------------


def _pg_parts(element: _JsonElement, compiler: SQLCompiler, kw: dict[str, Any]) -> tuple[str, str]:
    return compiler.process(element.doc, **kw), _pg_path(element.segments)


def _pg_type_test(doc: str, path: str, kind: str) -> str:
    if kind == "present":
        # `#>` yields SQL NULL for a missing key and the JSON value `null` for a present null.
        return f"(({doc} #> {path}) IS NOT NULL)"
    return f"(COALESCE(jsonb_typeof({doc} #> {path}), '') = '{_PG_TYPES[kind]}')"


@compiles(JsonTypeIs, "postgresql")
def _pg_type_is(element: JsonTypeIs, compiler: SQLCompiler, **kw: Any) -> str:
    doc, path = _pg_parts(element, compiler, kw)
    return _pg_type_test(doc, path, element.kind)


@compiles(JsonScalar, "postgresql")
def _pg_scalar(element: JsonScalar, compiler: SQLCompiler, **kw: Any) -> str:
    doc, path = _pg_parts(element, compiler, kw)
    text = f"({doc} #>> {path})"
    value = text if element.kind == "string" else f"CAST({text} AS {_PG_CASTS[element.kind]})"
    return f"(CASE WHEN {_pg_type_test(doc, path, element.kind)} THEN {value} END)"


@compiles(JsonArrayContains, "postgresql")
def _pg_array_contains(element: JsonArrayContains, compiler: SQLCompiler, **kw: Any) -> str:
    # jsonb containment: an array contains [x] iff one element equals x (numbers compare by value);
    # a scalar or object never contains an array, so no separate type test is needed.
    doc, path = _pg_parts(element, compiler, kw)
    value = f"CAST({compiler.process(element.value, **kw)} AS {_PG_CASTS[element.kind]})"
    return f"COALESCE(({doc} #> {path}) @> jsonb_build_array({value}), false)"
