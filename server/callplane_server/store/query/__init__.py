"""The store's one query compiler: Mongo-style filters and sorts to SQL, keyset pages, signed cursors."""

from callplane_server.store.query.entities import (
    CALLS,
    MEMBERS,
    USERS,
    ArrayField,
    EntitySpec,
    FieldKind,
    ScalarField,
)
from callplane_server.store.query.filters import canonical_filter, compile_filter
from callplane_server.store.query.pagination import (
    MAX_LIMIT,
    CursorSigner,
    ResolvedSort,
    SortKey,
    fetch_page,
    keyset_condition,
    resolve_sort,
)

__all__ = [
    "CALLS",
    "MAX_LIMIT",
    "MEMBERS",
    "USERS",
    "ArrayField",
    "CursorSigner",
    "EntitySpec",
    "FieldKind",
    "ResolvedSort",
    "ScalarField",
    "SortKey",
    "canonical_filter",
    "compile_filter",
    "fetch_page",
    "keyset_condition",
    "resolve_sort",
]
