"""Dialect-specific SQL for reading typed values out of JSON documents (the `custom` columns).

The filter and sort compilers are dialect-neutral; they build these elements and SQLAlchemy renders them
per dialect through `@compiles`. Every element takes the document column and a path of object keys; the
path is always a bound parameter (never spliced into the SQL text), and the only literals rendered are
the fixed JSON type names below.

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

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Boolean, Float, String, Text, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

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


class JsonPathType(TypeDecorator[Sequence[str]]):
    """A JSON path bound as a parameter: `$."a"."b"` on SQLite, `text[]` `{a,b}` on PostgreSQL.

    Segments are validated by the filter compiler (`[A-Za-z0-9_-]+`), so the SQLite double quotes cannot
    be escaped out of; and the value is a bind parameter in any case."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(Text()))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Sequence[str] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return list(value)
        return "$" + "".join(f'."{segment}"' for segment in value)


def json_path(segments: Sequence[str]) -> BindParameter[Sequence[str]]:
    """An anonymous bind parameter holding a path of object keys."""
    return bindparam(None, tuple(segments), type_=JsonPathType(), unique=True)


def _clause(doc: Any) -> ColumnElement[Any]:
    # Accept ORM attributes (CallRow.custom) as well as Core columns.
    element = doc.__clause_element__() if hasattr(doc, "__clause_element__") else doc
    assert isinstance(element, ColumnElement)
    return element


class _JsonElement(ColumnElement[Any]):
    """Base: a document column, a bound path and a kind that is part of the statement cache key."""

    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 - SQLAlchemy's declared structure, read by the cache-key logic
        ("doc", InternalTraversal.dp_clauseelement),
        ("path", InternalTraversal.dp_clauseelement),
        ("kind", InternalTraversal.dp_string),
    ]

    def __init__(self, doc: Any, segments: Sequence[str], kind: str) -> None:
        self.doc = _clause(doc)
        self.path = json_path(segments)
        self.kind = kind

    @property
    def _from_objects(self) -> list[Any]:  # type: ignore[override]
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
    return compiler.process(element.doc, **kw), compiler.process(element.path, **kw)


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
    doc = compiler.process(element.doc, **kw)
    path = f"CAST({compiler.process(element.path, **kw)} AS TEXT[])"
    return doc, path


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
