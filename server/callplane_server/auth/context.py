"""Who is acting: the principal of the RPC being served, or the authority background work gave itself.

It fails closed. The API layer sets the principal once per RPC, before the servicer runs; background
work (timers, lease renewal, compaction) says explicitly whom it acts for, with `acting_as` or a task
started in `authority_context(...)`. Nothing has a default: code that asks who is acting where nobody
was set is refused (PERMISSION_DENIED, reason NO_PRINCIPAL) and logged as the server bug it is, instead of
running with the server's full authority.

asyncio tasks copy the context of the code that creates them, so a task started while serving an RPC
would act as that RPC's caller for as long as it lives: background tasks are started in a fresh
`authority_context`, never in the context they happen to be created from."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from callplane_server.auth.tokens import Principal
from callplane_server.errors import PermissionDenied

log = logging.getLogger(__name__)

# No default: see the module docstring. None means "explicitly nobody" (e.g. health checks).
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("callplane_principal")


class NoPrincipal(PermissionDenied):
    """Something asked who is acting where no principal was established: a server bug, refused."""

    default_reason = "NO_PRINCIPAL"


def current_principal() -> Principal:
    principal = _current.get(None)
    if principal is None:
        # A code path reached a rule without anyone having said whom it acts for. Fail closed, and make
        # the bug visible with where it happened.
        log.error("server bug: the acting principal was read where none was set; refusing", stack_info=True)
        raise NoPrincipal("no authenticated principal for this request; refused")
    return principal


def set_principal(principal: Principal | None) -> None:
    """The API layer: once per RPC, in the RPC's own task (None: the RPC acts for nobody)."""
    _current.set(principal)


@contextmanager
def acting_as(principal: Principal | None) -> Iterator[None]:
    """Runs the block with `principal`'s authority, then restores what was there (nothing, usually)."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)


def authority_context(principal: Principal | None) -> contextvars.Context:
    """A fresh context for a background task (`asyncio.create_task(..., context=...)`): it inherits
    nothing from the code that starts it and holds only `principal` (None: no authority at all, for
    work that must never ask who is acting)."""
    context = contextvars.Context()
    context.run(_current.set, principal)
    return context
