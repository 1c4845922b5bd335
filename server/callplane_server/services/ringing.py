"""Ringing: RingCall, AcceptCall, RejectCall and the server-side ring timers."""

from __future__ import annotations

from callplane_server.services.clock import Clock
from callplane_server.services.timers import TimerRunner
from callplane_server.store import Store


class RingingService:
    def __init__(self, store: Store, clock: Clock, timers: TimerRunner) -> None:
        self._store = store
        self._clock = clock
        self._timers = timers
