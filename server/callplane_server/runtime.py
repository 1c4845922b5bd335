"""The event loop every Callplane process runs on: uvloop where installed (its I/O and call scheduling
are markedly cheaper than the default loop's), asyncio's own otherwise or when asked for."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOP_ENV = "CALLPLANE_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop unless CALLPLANE_EVENT_LOOP=asyncio (None: asyncio's default)."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop has no Windows build
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
