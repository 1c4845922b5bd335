"""Durable timers: rows with a due time, deleted in the transaction that applies their effect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import TimerRecord
from callplane_server.store.models import TimerRow


def _record(row: TimerRow) -> TimerRecord:
    return TimerRecord(row.id, row.kind, row.call_cid, row.key, row.due_at, dict(row.payload or {}))


class TimerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

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
        row = await self._session.scalar(
            select(TimerRow).where(TimerRow.kind == kind, TimerRow.call_cid == call_cid, TimerRow.key == key)
        )
        if row is None:
            self._session.add(
                TimerRow(kind=kind, call_cid=call_cid, key=key, due_at=due_at, payload=payload or {})
            )
        else:
            row.due_at = due_at
            row.payload = payload or {}
        await self._session.flush()

    async def cancel(self, kind: str, call_cid: str, *, key: str | None = None) -> None:
        """Removes the timer (every key of the kind for the call when key is None)."""
        statement = delete(TimerRow).where(TimerRow.kind == kind, TimerRow.call_cid == call_cid)
        if key is not None:
            statement = statement.where(TimerRow.key == key)
        await self._session.execute(statement)

    async def get(self, kind: str, call_cid: str, key: str = "") -> TimerRecord | None:
        row = await self._session.scalar(
            select(TimerRow).where(TimerRow.kind == kind, TimerRow.call_cid == call_cid, TimerRow.key == key)
        )
        return _record(row) if row else None

    async def due(self, now: datetime, limit: int) -> list[TimerRecord]:
        """Due timers, earliest first (unlocked: the runner claims each one in its own transaction)."""
        rows = await self._session.scalars(
            select(TimerRow).where(TimerRow.due_at <= now).order_by(TimerRow.due_at, TimerRow.id).limit(limit)
        )
        return [_record(row) for row in rows]

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
