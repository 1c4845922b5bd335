"""Participant and session custom data, custom events and pins."""

from __future__ import annotations

from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.store import Store


class CallDataService:
    def __init__(self, store: Store, clock: Clock, limits: Limits) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
