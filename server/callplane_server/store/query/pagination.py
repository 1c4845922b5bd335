"""Sort validation and keyset pagination with signed, opaque cursors.

A cursor names a boundary row by the values of every ORDER BY key (sort keys + unique tiebreak) and
asks for the rows strictly after it (`next`) or strictly before it (`prev`) in display order. Because
the boundary is values, not an offset, rows inserted or deleted between requests never make an
existing row appear twice or get skipped.

NULL ordering: NULL (and, for custom keys, values of another JSON type) is the smallest value, so ASC
puts it first and DESC last. Reversing every key (for `prev`) keeps that convention, so one predicate
builder serves both directions.

Cursor wire format: urlsafe base64 (no padding) of `compact JSON payload || HMAC-SHA256(payload)[:16]`.
The payload carries a fingerprint of entity + scope + filter + sort, so a cursor only works for the query
that produced it; anything that fails to verify is INVALID_CURSOR.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Select, and_, false, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.util import ClauseAdapter

from callplane_server.domain.records import PageRequest, SortInput
from callplane_server.errors import InvalidArgument, ViolationCollector
from callplane_server.store.query.entities import CUSTOM_PREFIX, EntitySpec, FieldKind
from callplane_server.store.query.filters import (
    canonical_filter,
    compile_filter,
    custom_path_problem,
    parse_custom_path,
)
from callplane_server.store.query.jsonsql import JsonScalar

SORT_REASON = "INVALID_SORT"
CURSOR_REASON = "INVALID_CURSOR"
MAX_LIMIT = 100
MAX_CURSOR_CHARS = 64 * 1024
# A page read by walking the sort index first looks at this many rows per row of the page (see fetch_page).
WALK_ROWS_PER_PAGE_ROW = 8
_MAC_BYTES = 16
_CURSOR_VERSION = 1

KeyKind = Literal["string", "time", "number", "boolean"]
Direction = Literal["next", "prev"]


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY key: the SQL expression, its direction and how its values travel in a cursor."""

    field: str
    expression: ColumnElement[Any] | QueryableAttribute[Any]
    direction: Literal["asc", "desc"]
    kind: KeyKind
    nullable: bool

    def _ascending(self, reverse: bool) -> bool:
        return (self.direction == "asc") != reverse

    def order_clause(self, *, reverse: bool = False) -> UnaryExpression[Any]:
        ascending = self._ascending(reverse)
        clause = self.expression.asc() if ascending else self.expression.desc()
        # Only nullable keys get an explicit NULLS clause: on a NOT NULL column it changes nothing, and
        # leaving it off lets PostgreSQL scan a plain index in either direction.
        if self.nullable:
            clause = clause.nulls_first() if ascending else clause.nulls_last()
        return clause

    def _bound(self, value: Any) -> ColumnElement[Any]:
        # An explicit bind with the key's type: SQLAlchemy refuses `<`/`>` against a bare True/False, and
        # the type makes times bind as naive UTC and booleans as 1/0 on SQLite.
        return literal(value, type_=self.expression.type)

    def after(self, value: Any, *, reverse: bool) -> ColumnElement[bool]:
        """Rows strictly after `value` in this key's (possibly reversed) order."""
        if self._ascending(reverse):  # NULLS FIRST
            return self.expression.is_not(None) if value is None else self.expression > self._bound(value)
        if value is None:  # NULLS LAST: nothing comes after NULL
            return false()
        before = self.expression < self._bound(value)
        return or_(before, self.expression.is_(None)) if self.nullable else before

    def equal(self, value: Any) -> ColumnElement[bool]:
        return self.expression.is_(None) if value is None else self.expression == self._bound(value)

    def encode(self, value: Any) -> Any:
        if value is None:
            return None
        if self.kind == "time":
            assert isinstance(value, datetime)
            return value.isoformat()
        if self.kind == "boolean":
            return bool(value)
        return value

    def decode(self, raw: Any) -> Any:
        """The SQL-ready value from a cursor; raises ValueError when it cannot have come from this key."""
        if raw is None:
            if not self.nullable:
                raise ValueError("null boundary for a non-null key")
            return None
        if self.kind == "time" and isinstance(raw, str):
            parsed = datetime.fromisoformat(raw)
            if parsed.tzinfo is None:
                raise ValueError("naive time")
            return parsed
        if self.kind == "string" and isinstance(raw, str):
            return raw
        if self.kind == "boolean" and isinstance(raw, bool):
            return raw
        if (
            self.kind == "number"
            and isinstance(raw, int | float)
            and not isinstance(raw, bool)
            and math.isfinite(raw)
        ):
            return raw
        raise ValueError(f"bad {self.kind} boundary")


@dataclass(frozen=True)
class ResolvedSort:
    keys: tuple[SortKey, ...]  # including the tiebreak
    normalized: tuple[tuple[str, str, str | None], ...]  # the requested keys, for the fingerprint


_KIND_OF: dict[FieldKind, KeyKind] = {
    FieldKind.STRING: "string",
    FieldKind.TIME: "time",
    FieldKind.BOOL: "boolean",
}


def resolve_sort(entity: EntitySpec, sort: Sequence[SortInput]) -> ResolvedSort:
    """Validates `sort` (INVALID_SORT, paths `sort[i].field` ...) and adds the tiebreak."""
    errors = ViolationCollector()
    if len(sort) > entity.max_sort_keys:
        errors.add("sort", f"at most {entity.max_sort_keys} sort fields are allowed for {entity.name}")
    requested = tuple(sort) or entity.default_sort
    keys: list[SortKey] = []
    normalized: list[tuple[str, str, str | None]] = []
    seen: set[str] = set()
    for i, item in enumerate(requested):
        path = f"sort[{i}]"
        if item.direction not in ("asc", "desc"):
            errors.add(f"{path}.direction", "must be asc or desc")
        if item.field in seen:
            errors.add(f"{path}.field", f"{item.field} is already a sort field")
        seen.add(item.field)
        if item.field.startswith(CUSTOM_PREFIX):
            segments = parse_custom_path(item.field)
            if segments is None:
                errors.add(f"{path}.field", custom_path_problem())
            elif item.type not in ("string", "number", "boolean"):
                errors.add(f"{path}.type", "sorting on custom data needs type string, number or boolean")
            else:
                expression = JsonScalar(entity.custom, segments, item.type)
                keys.append(SortKey(item.field, expression, item.direction, item.type, nullable=True))
                normalized.append((item.field, item.direction, item.type))
        elif item.field in entity.sort_fields:
            # `type` only matters for custom data; a built-in field's column type decides.
            field = entity.sort_fields[item.field]
            keys.append(
                SortKey(item.field, field.column, item.direction, _KIND_OF[field.kind], field.nullable)
            )
            normalized.append((item.field, item.direction, None))
        else:
            known = ", ".join([*entity.sort_fields, "custom.<path>"])
            errors.add(f"{path}.field", f"cannot sort {entity.name} by {item.field!r} (sortable: {known})")
    errors.raise_if_any("invalid sort", reason=SORT_REASON)
    if entity.tiebreak not in seen:
        tiebreak = entity.tiebreak_field
        keys.append(SortKey(entity.tiebreak, tiebreak.column, "asc", _KIND_OF[tiebreak.kind], False))
    return ResolvedSort(tuple(keys), tuple(normalized))


def keyset_condition(
    keys: Sequence[SortKey], values: Sequence[Any], *, reverse: bool, inclusive: bool = False
) -> ColumnElement[bool]:
    """Rows lexicographically after `values` (or equal to them, if `inclusive`) in key order, reversed
    for `prev` pages: k0 after v0, OR k0 = v0 AND k1 after v1, OR ..."""
    alternatives: list[ColumnElement[bool]] = []
    prefix: list[ColumnElement[bool]] = []
    for key, value in zip(keys, values, strict=True):
        alternatives.append(and_(*prefix, key.after(value, reverse=reverse)))
        prefix.append(key.equal(value))
    if inclusive:
        alternatives.append(and_(*prefix))
    return or_(*alternatives)


class CursorSigner:
    """Signs and verifies cursor payloads with HMAC-SHA256. Every server sharing a database must use the
    same secret, or cursors from one process fail on another."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("cursor secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def sign(self, payload: dict[str, Any]) -> str:
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        return base64.urlsafe_b64encode(raw + self._mac(raw)).rstrip(b"=").decode("ascii")

    def verify(self, token: str) -> dict[str, Any] | None:
        """The payload, or None if the token is garbled or was not signed with this secret."""
        if len(token) > MAX_CURSOR_CHARS:
            return None
        try:
            blob = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return None
        raw, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
        if len(blob) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(raw)):
            return None
        try:
            payload = json.loads(raw)
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None


def mentions_custom(conditions: Any) -> bool:
    """Whether a filter names a custom-data field anywhere."""
    if isinstance(conditions, dict):
        return any(
            (isinstance(key, str) and key.startswith(CUSTOM_PREFIX)) or mentions_custom(value)
            for key, value in conditions.items()
        )
    if isinstance(conditions, list):
        return any(mentions_custom(item) for item in conditions)
    return False


def query_fingerprint(
    entity: EntitySpec, scope: str, conditions: dict[str, Any] | None, sort: ResolvedSort
) -> str:
    text = json.dumps(
        [entity.name, scope, canonical_filter(conditions), [list(key) for key in sort.normalized]],
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Boundary:
    values: list[Any]
    inclusive: bool


def _decode_cursor(
    signer: CursorSigner, token: str, direction: Direction, fingerprint: str, keys: Sequence[SortKey]
) -> _Boundary:
    def invalid(description: str) -> InvalidArgument:
        return InvalidArgument.for_field(direction, description, reason=CURSOR_REASON)

    payload = signer.verify(token)
    if payload is None:
        raise invalid("not a cursor issued by this server")
    if payload.get("v") != _CURSOR_VERSION or payload.get("d") != direction:
        raise invalid(f"not a {direction} cursor")
    if payload.get("f") != fingerprint:
        raise invalid("the cursor belongs to a query with a different filter, sort or scope")
    raw_values = payload.get("k")
    if not isinstance(raw_values, list) or len(raw_values) != len(keys):
        raise invalid("malformed cursor")
    try:
        values = [key.decode(raw) for key, raw in zip(keys, raw_values, strict=True)]
    except ValueError:
        raise invalid("malformed cursor") from None
    return _Boundary(values, bool(payload.get("i", False)))


def _encode_cursor(
    signer: CursorSigner,
    direction: Direction,
    fingerprint: str,
    keys: Sequence[SortKey],
    values: Sequence[Any],
    *,
    inclusive: bool = False,
) -> str:
    encoded = [key.encode(value) for key, value in zip(keys, values, strict=True)]
    payload: dict[str, Any] = {"v": _CURSOR_VERSION, "d": direction, "f": fingerprint, "k": encoded}
    if inclusive:
        payload["i"] = True
    return signer.sign(payload)


class _WindowOutcomes:
    """Whether the sort-index window (see fetch_page) held a page, by query shape (fields, operators and
    sort, not values), as MongoDB's plan cache keeps the winning plan per shape: a shape whose window
    came up short (a selective filter, which the planner serves well from its indexes) skips it for the
    next RETRY_AFTER pages, then tries it again (the data, or the values asked for, may have changed)."""

    RETRY_AFTER = 64
    MAX_SHAPES = 1024

    def __init__(self) -> None:
        self._skips: dict[str, int] = {}

    def worth_trying(self, shape: str) -> bool:
        left = self._skips.get(shape, 0)
        if left <= 0:
            return True
        self._skips[shape] = left - 1
        return False

    def record(self, shape: str, *, found: bool) -> None:
        if found:
            self._skips.pop(shape, None)
            return
        if len(self._skips) >= self.MAX_SHAPES:
            self._skips.clear()
        self._skips[shape] = self.RETRY_AFTER


_WINDOWS = _WindowOutcomes()


def _query_shape(entity: EntitySpec, scope: str, conditions: Any, sort: ResolvedSort) -> str:
    """The page's query without its values (see _WindowOutcomes)."""
    shape = [entity.name, scope, _without_values(conditions), [list(key) for key in sort.normalized]]
    return json.dumps(shape, sort_keys=True, separators=(",", ":"))


def _without_values(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_values(item) for key, item in value.items()}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):  # $and / $or / $nor
        return [_without_values(item) for item in value]
    return type(value).__name__


async def fetch_page(
    session: AsyncSession,
    base: Select[Any],
    entity: EntitySpec,
    page: PageRequest,
    signer: CursorSigner,
    *,
    scope: str = "",
    whole_rows: bool = False,
    walk_first: Sequence[str] = (),
) -> tuple[list[Any], str, str]:
    """One page of `base` (a `select(Model)` with the caller's own WHERE), filtered, sorted and cut at
    the cursor: returns (ORM objects in display order, next cursor or "", prev cursor or "").

    `base` must select exactly the entity's model, unaliased (the array filters correlate on it), and must
    not eager-load collections with joins. `scope` (e.g. the call cid for members) is bound into cursors.
    With `whole_rows`, `base` selects columns of the model's table instead (`select(Model.__table__)` or
    some of its columns, skipping ORM loading) and the items are the result rows, whose columns read like
    the model's attributes.

    `walk_first` (with `whole_rows`): sort fields with an index in exactly the keyset order. When the page
    is sorted by one of them and filters on custom data, the page is first looked for among the next
    WALK_ROWS_PER_PAGE_ROW x (limit + 1) rows of that index: a broad filter (say a fifth of the rows) finds
    its page there, reading a bounded number of rows whatever index the planner would have chosen (SQLite
    picks an index on the filtered custom field, then sorts every match). Only when the window holds less
    than a page (a selective filter) does the query run as is, for the planner to serve from its indexes.
    """
    if not 1 <= page.limit <= MAX_LIMIT:
        raise InvalidArgument.for_field("limit", f"must be between 1 and {MAX_LIMIT}")
    if page.next and page.prev:
        raise InvalidArgument.for_field("prev", "set next or prev, not both", reason=CURSOR_REASON)
    sort = resolve_sort(entity, page.sort)
    condition = compile_filter(entity, page.filter_conditions)
    keys = sort.keys
    fingerprint = query_fingerprint(entity, scope, page.filter_conditions, sort)

    direction: Direction | None = "next" if page.next else "prev" if page.prev else None
    boundary: _Boundary | None = None
    if direction is not None:
        boundary = _decode_cursor(signer, page.next or page.prev, direction, fingerprint, keys)
    # A prev page is read in reversed order from the boundary, then flipped back for display.
    backwards = direction == "prev"

    statement = base.where(condition)
    keyset = (
        None
        if boundary is None
        else keyset_condition(keys, boundary.values, reverse=backwards, inclusive=boundary.inclusive)
    )
    order = [key.order_clause(reverse=backwards) for key in keys]

    def ordered(query: Select[Any]) -> Select[Any]:
        return (
            query.add_columns(*(key.expression.label(f"cp_sort_{i}") for i, key in enumerate(keys)))
            .order_by(*order)
            .limit(page.limit + 1)  # one extra row tells whether another page exists
        )

    # Whole rows are read through the transaction's connection: Core execution, without the ORM session's
    # per-statement work (its compile state and result set-up), which cost more than SQLite's own.
    execute = (await session.connection()).execute if whole_rows else session.execute
    rows: list[Any] = []
    walked = whole_rows and keys[0].field in walk_first and mentions_custom(page.filter_conditions)
    shape = ""
    if walked:
        shape = _query_shape(entity, scope, page.filter_conditions, sort)
        walked = _WINDOWS.worth_trying(shape)
    if walked:
        # The window: the next rows in sort order, by the sort index alone. The page's own conditions
        # apply to the window's rows (the adapter moves every reference to the table onto the window).
        window = select(entity.model.__table__)
        if keyset is not None:
            window = window.where(keyset)
        window_rows = window.order_by(*order).limit(WALK_ROWS_PER_PAGE_ROW * (page.limit + 1))
        within = ClauseAdapter(window_rows.subquery("cp_window")).traverse(ordered(statement))
        rows = list((await execute(within)).all())
        _WINDOWS.record(shape, found=len(rows) > page.limit)
    if not walked or len(rows) <= page.limit:  # else the window held a page and one more row
        rows = list((await execute(ordered(statement if keyset is None else statement.where(keyset)))).all())
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    if backwards:
        rows.reverse()
    items = rows if whole_rows else [row[0] for row in rows]
    # Boundary values come from SQL (not the Python objects) so they match what the keyset compares.
    first = list(rows[0][-len(keys) :]) if rows else None  # the cp_sort_* columns, added last
    last = list(rows[-1][-len(keys) :]) if rows else None

    def cursor(towards: Direction, values: Sequence[Any]) -> str:
        return _encode_cursor(signer, towards, fingerprint, keys, values)

    def around_boundary(towards: Direction) -> str:
        # An empty page after a cursor (its rows were deleted meanwhile): the way back is everything on
        # the other side of the same boundary, with the boundary row itself included iff it was excluded.
        assert boundary is not None
        return _encode_cursor(
            signer, towards, fingerprint, keys, boundary.values, inclusive=not boundary.inclusive
        )

    next_cursor = prev_cursor = ""
    if not backwards:
        if more and last is not None:
            next_cursor = cursor("next", last)
        if boundary is not None:
            prev_cursor = cursor("prev", first) if first is not None else around_boundary("prev")
    else:
        if more and first is not None:
            prev_cursor = cursor("prev", first)
        next_cursor = cursor("next", last) if last is not None else around_boundary("next")
    return items, next_cursor, prev_cursor
