"""Compiles Mongo-style `filter_conditions` into one SQLAlchemy boolean expression.

Input is the raw dict from the request's Struct (numbers arrive as floats). Every problem becomes a
FieldViolation whose path starts at the request root (`filter_conditions.$or[1].id.$in`), reason
`INVALID_FILTER`; as many as can be found in one pass are reported together.

Null semantics follow MongoDB: `$ne` / `$nin` also match rows where the value is NULL / missing (or, in
custom data, of another JSON type); `$eq` / `$gt` / `$in` ... never match them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, and_, false, not_, or_, true
from sqlalchemy.orm import QueryableAttribute

from callplane_server.errors import ViolationCollector
from callplane_server.store.query.entities import (
    CUSTOM_PREFIX,
    ArrayField,
    EntitySpec,
    FieldKind,
    JsonArrayField,
    ScalarField,
)
from callplane_server.store.query.jsonsql import (
    PATH_SEGMENT,
    JsonArrayContains,
    JsonScalar,
    JsonTypeIs,
    ScalarKind,
)

REASON = "INVALID_FILTER"
ROOT = "filter_conditions"

MAX_DEPTH = 10  # nested $and/$or/$nor levels
MAX_CONDITIONS = 200  # operator applications in one filter
MAX_LIST = 100  # elements of one $in / $nin list
MAX_STRING = 1024  # characters of one string operand
MAX_PATH_DEPTH = 10  # segments of a custom.<path>

COMBINATORS = ("$and", "$or", "$nor")
_COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_TEXT = ("$autocomplete", "$q")
OPERATORS = frozenset((*_COMPARISONS, *_TEXT, "$contains"))
_ALLOWED: dict[str, frozenset[str]] = {
    FieldKind.STRING: frozenset((*_COMPARISONS, *_TEXT)),
    FieldKind.TIME: frozenset(_COMPARISONS),
    FieldKind.BOOL: frozenset(("$eq", "$ne")),
    "array": frozenset(("$eq", "$contains", "$ne", "$in", "$nin", "$exists")),
    "custom": OPERATORS,
}
_KIND_NAMES = {FieldKind.STRING: "a string", FieldKind.TIME: "a timestamp", FieldKind.BOOL: "a boolean"}


class _Invalid(Exception):
    """An operand problem, already recorded; aborts compiling that one condition."""


def compile_filter(entity: EntitySpec, conditions: dict[str, Any] | None) -> ColumnElement[bool]:
    """The WHERE expression for `conditions` on `entity`; raises InvalidArgument (INVALID_FILTER)."""
    compiler = _FilterCompiler(entity)
    expression = compiler.compile_object(conditions if conditions is not None else {}, ROOT, 0)
    if compiler.count > MAX_CONDITIONS:
        compiler.errors.add(ROOT, f"at most {MAX_CONDITIONS} conditions are allowed, got {compiler.count}")
    compiler.errors.raise_if_any("invalid filter_conditions", reason=REASON)
    return expression


def canonical_filter(conditions: dict[str, Any] | None) -> str:
    """Stable text of a filter for cursor fingerprints: sorted keys, every number as a float (Struct
    numbers are doubles, so 1 and 1.0 are the same filter)."""

    def normalize(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: normalize(item) for key, item in value.items()}
        if isinstance(value, list):
            return [normalize(item) for item in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    return json.dumps(normalize(conditions or {}), sort_keys=True, separators=(",", ":"), allow_nan=False)


def parse_custom_path(field: str) -> list[str] | None:
    """Segments of `custom.<a.b.c>`, or None when the path is malformed."""
    segments = field[len(CUSTOM_PREFIX) :].split(".")
    if len(segments) > MAX_PATH_DEPTH or not all(PATH_SEGMENT.fullmatch(segment) for segment in segments):
        return None
    return segments


def custom_path_problem() -> str:
    return (
        f"custom paths are custom.<key>[.<key>...] with at most {MAX_PATH_DEPTH} keys of letters, digits, "
        "'_' or '-'"
    )


def escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# An SQL expression, or a mapped attribute standing for its column.
_Expression = ColumnElement[Any] | QueryableAttribute[Any]


def _autocomplete(expression: _Expression, prefix: str) -> ColumnElement[bool]:
    # Word prefix: the whole value or any space-separated word in it starts with `prefix`.
    escaped = escape_like(prefix)
    return or_(
        expression.ilike(f"{escaped}%", escape="\\"),
        expression.ilike(f"% {escaped}%", escape="\\"),
    )


def _text_search(expression: _Expression, query: str) -> ColumnElement[bool]:
    return and_(*(expression.ilike(f"%{escape_like(term)}%", escape="\\") for term in query.split()))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar_kind(value: Any) -> ScalarKind | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if _is_number(value):
        return "number"
    return None


def _compare(expression: _Expression, op: str, operand: object, *, nullable: bool) -> ColumnElement[bool]:
    """A comparison with Mongo null semantics; `operand` is already validated (a list for $in/$nin)."""
    if op == "$eq":
        return expression.is_(None) if operand is None else expression == operand
    if op == "$ne":
        if operand is None:
            return expression.is_not(None)
        return or_(expression != operand, expression.is_(None)) if nullable else expression != operand
    if op == "$in":
        return expression.in_(cast("list[Any]", operand)) if operand else false()
    if op == "$nin":
        if not operand:
            return true()
        values = cast("list[Any]", operand)
        return or_(expression.not_in(values), expression.is_(None)) if nullable else expression.not_in(values)
    if op == "$gt":
        return expression > operand
    if op == "$gte":
        return expression >= operand
    if op == "$lt":
        return expression < operand
    if op == "$lte":
        return expression <= operand
    raise AssertionError(op)


class _FilterCompiler:
    def __init__(self, entity: EntitySpec) -> None:
        self.entity = entity
        self.errors = ViolationCollector()
        self.count = 0

    # --- structure ---------------------------------------------------------------------------------

    def compile_object(self, obj: Any, path: str, depth: int) -> ColumnElement[bool]:
        if not isinstance(obj, dict):
            self.errors.add(path, "must be an object of field conditions")
            return true()
        parts: list[ColumnElement[bool]] = []
        for key, value in obj.items():
            key_path = f"{path}.{key}"
            if key in COMBINATORS:
                parts.append(self._combinator(key, value, key_path, depth))
            elif key.startswith("$"):
                self.errors.add(key_path, f"unknown combinator {key}; use one of {', '.join(COMBINATORS)}")
            elif key.startswith(CUSTOM_PREFIX):
                segments = parse_custom_path(key)
                if segments is None:
                    self.errors.add(key_path, custom_path_problem())
                else:
                    parts.append(self._field(key, value, key_path, custom=segments))
            elif key in self.entity.filter_fields:
                parts.append(self._field(key, value, key_path))
            elif key == "custom":
                self.errors.add(key_path, "filter on custom data by path, e.g. custom.color")
            else:
                known = ", ".join([*self.entity.filter_fields, "custom.<path>"])
                self.errors.add(key_path, f"unknown filter field {key!r} (filterable: {known})")
        return and_(*parts) if parts else true()

    def _combinator(self, key: str, value: Any, path: str, depth: int) -> ColumnElement[bool]:
        if depth >= MAX_DEPTH:
            self.errors.add(path, f"filters may nest at most {MAX_DEPTH} levels of {', '.join(COMBINATORS)}")
            return true()
        if not isinstance(value, list) or not value:
            self.errors.add(path, f"{key} takes a non-empty list of filter objects")
            return true()
        subs = [self.compile_object(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        if key == "$and":
            return and_(*subs)
        if key == "$or":
            return or_(*subs)
        # Comparisons with NULL are NULL, and NOT NULL is still NULL: "IS NOT TRUE" makes $nor match rows
        # where a condition is unknown (missing value), as MongoDB does.
        return or_(*subs).is_not(true())

    def _field(
        self, name: str, value: Any, path: str, *, custom: list[str] | None = None
    ) -> ColumnElement[bool]:
        field = None if custom is not None else self.entity.filter_fields[name]
        if isinstance(value, dict):
            if not value:
                self.errors.add(path, "an operator object needs at least one operator")
                return true()
            operations = list(value.items())
            op_paths = [f"{path}.{op}" for op, _ in operations]
        else:
            # A bare value is shorthand for $eq; the violation path stays at the field.
            operations = [("$eq", value)]
            op_paths = [path]
        is_array = isinstance(field, ArrayField | JsonArrayField)
        # union-attr: past the custom and array cases, field is a ScalarField (never None).
        allowed = _ALLOWED["custom" if custom is not None else "array" if is_array else field.kind]  # type: ignore[union-attr]
        parts: list[ColumnElement[bool]] = []
        for (op, operand), op_path in zip(operations, op_paths, strict=True):
            self.count += 1
            if op not in OPERATORS:
                self.errors.add(
                    op_path, f"unknown operator {op!r}; use one of {', '.join(sorted(OPERATORS))}"
                )
                continue
            if op not in allowed:
                self.errors.add(
                    op_path, f"{op} is not supported on {name}; use one of {', '.join(sorted(allowed))}"
                )
                continue
            try:
                if custom is not None:
                    parts.append(self._custom(custom, op, operand, op_path))
                elif isinstance(field, ArrayField):
                    parts.append(self._array(field, op, operand, op_path))
                elif isinstance(field, JsonArrayField):
                    parts.append(self._json_array(field, op, operand, op_path))
                else:
                    assert isinstance(field, ScalarField)
                    parts.append(self._scalar(field, op, operand, op_path))
            except _Invalid:
                continue
        return and_(*parts) if parts else true()

    # --- operands ----------------------------------------------------------------------------------

    def _fail(self, path: str, description: str) -> _Invalid:
        self.errors.add(path, description)
        return _Invalid()

    def _list(self, operand: Any, path: str, element: Callable[[Any, str], Any]) -> list[Any]:
        if not isinstance(operand, list):
            raise self._fail(path, "must be a list")
        if len(operand) > MAX_LIST:
            raise self._fail(path, f"at most {MAX_LIST} values are allowed")
        values: list[Any] = []
        failed = False
        for i, item in enumerate(operand):
            try:
                values.append(element(item, f"{path}[{i}]"))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid()
        return values

    def _bool(self, operand: Any, path: str) -> bool:
        if not isinstance(operand, bool):
            raise self._fail(path, "must be true or false")
        return operand

    def _string(self, operand: Any, path: str) -> str:
        if not isinstance(operand, str):
            raise self._fail(path, "must be a string")
        if len(operand) > MAX_STRING:
            raise self._fail(path, f"must be at most {MAX_STRING} characters")
        return operand

    def _search_text(self, operand: Any, path: str) -> str:
        text = self._string(operand, path)
        if not text.strip():
            raise self._fail(path, "must contain at least one non-space character")
        return text

    def _time(self, operand: Any, path: str) -> datetime:
        if not isinstance(operand, str):
            raise self._fail(path, "must be an RFC 3339 timestamp string, e.g. 2024-05-01T12:00:00Z")
        try:
            parsed = datetime.fromisoformat(operand)
        except ValueError:
            raise self._fail(path, f"{operand!r} is not an RFC 3339 timestamp") from None
        if parsed.tzinfo is None:
            raise self._fail(path, f"{operand!r} needs a time zone offset or Z")
        return parsed

    def _custom_scalar(self, operand: Any, path: str) -> str | float | bool:
        kind = _scalar_kind(operand)
        if kind is None:
            raise self._fail(path, "must be a string, number or boolean")
        if kind == "string":
            return self._string(operand, path)
        if kind == "number":
            if not math.isfinite(operand):
                raise self._fail(path, "must be a finite number")
            # Struct numbers are doubles anyway; a float also binds as FLOAT8 on PostgreSQL (an int would
            # bind as INTEGER and overflow above 2^31).
            return float(operand)
        return operand  # type: ignore[no-any-return]  # the bool that _scalar_kind found

    # --- per field kind ----------------------------------------------------------------------------

    def _scalar(self, field: ScalarField, op: str, operand: Any, path: str) -> ColumnElement[bool]:
        column = field.column
        if op == "$exists":
            return column.is_not(None) if self._bool(operand, path) else column.is_(None)
        if op in _TEXT:
            text = self._search_text(operand, path)
            return _autocomplete(column, text) if op == "$autocomplete" else _text_search(column, text)
        parse = {FieldKind.STRING: self._string, FieldKind.TIME: self._time, FieldKind.BOOL: self._bool}[
            field.kind
        ]
        if op in ("$in", "$nin"):
            return _compare(column, op, self._list(operand, path, parse), nullable=field.nullable)
        if operand is None and op in ("$eq", "$ne"):
            if not field.nullable:
                raise self._fail(path, "this field is never null; use a value")
            return _compare(column, op, None, nullable=True)
        if operand is None:
            raise self._fail(path, f"must be {_KIND_NAMES[field.kind]}")
        return _compare(column, op, parse(operand, path), nullable=field.nullable)

    def _array(self, field: ArrayField, op: str, operand: Any, path: str) -> ColumnElement[bool]:
        element = field.element
        if op == "$exists":
            return field.exists() if self._bool(operand, path) else ~field.exists()
        if op in ("$in", "$nin"):
            values = self._list(operand, path, self._string)
            if not values:
                return false() if op == "$in" else true()
            contains_any = field.exists(element.in_(values))
            return contains_any if op == "$in" else ~contains_any
        if isinstance(operand, list):
            raise self._fail(path, "must be a single element; use $in / $nin to test several")
        contains = field.exists(element == self._string(operand, path))
        return ~contains if op == "$ne" else contains

    def _json_array(self, field: JsonArrayField, op: str, operand: Any, path: str) -> ColumnElement[bool]:
        def element(item: Any, item_path: str) -> str:
            if item not in field.values:
                raise self._fail(item_path, f"must be one of {', '.join(field.values)}")
            return item  # type: ignore[no-any-return]  # one of field.values, all str

        def contains_any(values: Sequence[str]) -> ColumnElement[bool]:
            tests = [JsonArrayContains(field.column, (), "string", value) for value in values]
            return or_(*tests) if tests else false()

        if op == "$exists":
            # Present means a non-empty array: it holds at least one of the known values.
            present = contains_any(field.values)
            return present if self._bool(operand, path) else not_(present)
        if op in ("$in", "$nin"):
            hit = contains_any(self._list(operand, path, element))
            return hit if op == "$in" else not_(hit)
        if isinstance(operand, list):
            raise self._fail(path, "must be a single element; use $in / $nin to test several")
        hit = contains_any([element(operand, path)])
        return not_(hit) if op == "$ne" else hit

    def _custom(self, segments: Sequence[str], op: str, operand: Any, path: str) -> ColumnElement[bool]:
        doc = self.entity.custom
        if op == "$exists":
            present = JsonTypeIs(doc, segments, "present")
            return present if self._bool(operand, path) else not_(present)
        if op in _TEXT:
            text = self._search_text(operand, path)
            scalar = JsonScalar(doc, segments, "string")
            return _autocomplete(scalar, text) if op == "$autocomplete" else _text_search(scalar, text)
        if op == "$contains":
            item = self._custom_scalar(operand, path)
            kind = _scalar_kind(item)
            assert kind is not None
            return JsonArrayContains(doc, segments, kind, item)
        if op in ("$in", "$nin"):
            values = self._list(operand, path, self._custom_scalar)
            kinds = {_scalar_kind(value) for value in values}
            if len(kinds) > 1:
                raise self._fail(path, "values must all be strings, all numbers or all booleans")
            if not values:
                return false() if op == "$in" else true()
            # arg-type: kinds holds no None, as every value came through _custom_scalar.
            return _compare(JsonScalar(doc, segments, kinds.pop()), op, values, nullable=True)  # type: ignore[arg-type]
        if operand is None:
            if op not in ("$eq", "$ne"):
                raise self._fail(path, "must be a string or number")
            # JSON null and a missing key are both "null"; $ne: null means present with a non-null value.
            is_null = or_(not_(JsonTypeIs(doc, segments, "present")), JsonTypeIs(doc, segments, "null"))
            return is_null if op == "$eq" else not_(is_null)
        if isinstance(operand, dict | list):
            raise self._fail(path, "must be a string, number, boolean or null")
        value = self._custom_scalar(operand, path)
        kind = _scalar_kind(value)
        assert kind is not None
        if kind == "boolean" and op not in ("$eq", "$ne"):
            raise self._fail(path, f"{op} needs a string or number")
        return _compare(JsonScalar(doc, segments, kind), op, value, nullable=True)
