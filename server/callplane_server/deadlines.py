"""The deadline of the RPC being served. Set once per RPC by the API layer; the store reads it so a write
whose caller has given up is rolled back instead of committed (see Database.run)."""

from __future__ import annotations

import time
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("callplane_deadline", default=None)


def set_deadline(seconds_remaining: float | None) -> None:
    """Records the RPC's deadline, `seconds_remaining` from now (None: the caller set no deadline)."""
    _deadline.set(None if seconds_remaining is None else time.monotonic() + seconds_remaining)


def current_deadline() -> float | None:
    """The deadline on the time.monotonic() clock; None outside an RPC or when the caller set none."""
    return _deadline.get()


def passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
