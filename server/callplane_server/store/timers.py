"""Durable timers: rows with a due time, deleted in the transaction that applies their effect."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import TimerRecord
from callplane_server.store.models import TimerRow

# The hot statements, built once over Core columns with bound parameters (no ORM unit of work, no
# statement construction or cache-key generation per call).
_TIMERS = cast(Table, TimerRow.__table__)
_ONE = (_TIMERS.c.kind == bindparam("kind")) & (_TIMERS.c.call_cid == bindparam("call_cid"))
_CANCEL_KIND = delete(_TIMERS).where(_ONE)
_CANCEL_KEY = delete(_TIMERS).where(_ONE, _TIMERS.c.key == bindparam("key"))
_GET = select(_TIMERS).where(_ONE, _TIMERS.c.key == bindparam("key"))


def _schedule(insert: Any) -> Any:
    """Sets (or moves) the timer of (kind, call_cid, key) in one statement: an upsert on its unique key
    (the row keeps its id when moved)."""
    statement = insert(_TIMERS)
    return statement.on_conflict_do_update(
        index_elements=[_TIMERS.c.kind, _TIMERS.c.call_cid, _TIMERS.c.key],
        set_={"due_at": statement.excluded.due_at, "payload": statement.excluded.payload},
    )


_SCHEDULE = {"sqlite": _schedule(sqlite.insert), "postgresql": _schedule(postgresql.insert)}


def _record(row: Any) -> TimerRecord:
    return TimerRecord(row.id, row.kind, row.call_cid, row.key, row.due_at, dict(row.payload or {}))


class TimerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._schedule: Any = None

    async def schedule(
        self,
        kind: str,
        call_cid: str,
        due_at: datetime,
        *,
        key: str = "",
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Sets (or moves) the one timer of this kind for this call and key."""
        if self._schedule is None:
            self._schedule = _SCHEDULE[self._session.get_bind().dialect.name]
        await self._session.execute(
            self._schedule,
            {"kind": kind, "call_cid": call_cid, "key": key, "due_at": due_at, "payload": payload or {}},
        )

    async def schedule_many(self, kind: str, timers: list[tuple[str, str, datetime, dict[str, Any]]]) -> None:
        """Sets (or moves) many timers of one kind: (call_cid, key, due_at, payload) each."""
        if not timers:
            return
        if self._schedule is None:
            self._schedule = _SCHEDULE[self._session.get_bind().dialect.name]
        await self._session.execute(
            self._schedule,
            [
                {"kind": kind, "call_cid": call_cid, "key": key, "due_at": due_at, "payload": payload}
                for call_cid, key, due_at, payload in timers
            ],
        )

    async def cancel(self, kind: str, call_cid: str, *, key: str | None = None) -> None:
        """Removes the timer (every key of the kind for the call when key is None)."""
        if key is None:
            await self._session.execute(_CANCEL_KIND, {"kind": kind, "call_cid": call_cid})
        else:
            await self._session.execute(_CANCEL_KEY, {"kind": kind, "call_cid": call_cid, "key": key})

    async def get(self, kind: str, call_cid: str, key: str = "") -> TimerRecord | None:
        row = (await self._session.execute(_GET, {"kind": kind, "call_cid": call_cid, "key": key})).first()
        return _record(row) if row else None

    async def due(self, now: datetime, limit: int) -> list[TimerRecord]:
        """Due timers, earliest first (unlocked: the runner claims each one in its own transaction)."""
        rows = await self._session.scalars(
            select(TimerRow).where(TimerRow.due_at <= now).order_by(TimerRow.due_at, TimerRow.id).limit(limit)
        )
        return [_record(row) for row in rows]

    async def backlog(self, now: datetime) -> tuple[int, datetime | None]:
        """How many timers are due by `now` and not fired yet, and the earliest one's due time."""
        row = (
            await self._session.execute(
                select(func.count(), func.min(_TIMERS.c.due_at)).where(_TIMERS.c.due_at <= now)
            )
        ).one()
        earliest = row[1]
        if isinstance(earliest, str):  # SQLite hands an aggregate of a DateTime column back as text
            earliest = datetime.fromisoformat(earliest)
        if earliest is not None and earliest.tzinfo is None:
            earliest = earliest.replace(tzinfo=UTC)
        return int(row[0]), earliest

    async def claim(self, timer_id: int, now: datetime) -> TimerRecord | None:
        """Locks and deletes the timer if it is still due; None if another process fired it or it was
        moved or cancelled. SKIP LOCKED keeps replicas from waiting on each other's timers."""
        row = await self._session.scalar(
            select(TimerRow)
            .where(TimerRow.id == timer_id, TimerRow.due_at <= now)
            .with_for_update(skip_locked=True)
        )
        if row is None:
            return None
        record = _record(row)
        await self._session.execute(delete(TimerRow).where(TimerRow.id == timer_id))
        return record

    async def pending(self, call_cid: str) -> list[TimerRecord]:
        rows = await self._session.scalars(
            select(TimerRow).where(TimerRow.call_cid == call_cid).order_by(TimerRow.due_at, TimerRow.id)
        )
        return [_record(row) for row in rows]
