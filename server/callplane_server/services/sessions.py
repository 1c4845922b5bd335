"""Sessions and participants: joins, leaves, leases, inactivity and max-duration timers, backstage."""

from __future__ import annotations

from datetime import timedelta

from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.services.timers import TimerRunner
from callplane_server.store import Store


class SessionService:
    """Also the Presence of WatchCall streams opened with a participant_session_id."""

    def __init__(
        self, store: Store, clock: Clock, limits: Limits, timers: TimerRunner, *, lease_ttl: timedelta
    ) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self._timers = timers
        self._lease_ttl = lease_ttl

    async def stream_opened(self, call_type: str, call_id: str, participant_session_id: str) -> None:
        return None

    async def stream_closed(self, call_type: str, call_id: str, participant_session_id: str) -> None:
        return None
