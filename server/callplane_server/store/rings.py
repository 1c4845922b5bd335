"""Ring state: one row per callee and call (ringing, then one outcome), and the member list ringing
defaults to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.models import CallMemberRow, RingRow

RINGING = "ringing"
ACCEPTED = "accepted"
REJECTED = "rejected"


@dataclass
class RingRecord:
    call_cid: str
    user_id: str
    caller_user_id: str
    status: str
    rung_at: datetime
    reason: str = ""
    video: bool = False
    missed_notified: bool = False
    answered_at: datetime | None = None


_FIELDS = ("caller_user_id", "status", "reason", "video", "missed_notified", "rung_at", "answered_at")


def _record(row: RingRow) -> RingRecord:
    return RingRecord(
        call_cid=row.call_cid,
        user_id=row.user_id,
        caller_user_id=row.caller_user_id,
        status=row.status,
        rung_at=row.rung_at,
        reason=row.reason,
        video=row.video,
        missed_notified=row.missed_notified,
        answered_at=row.answered_at,
    )


class RingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, call_cid: str, user_id: str) -> RingRecord | None:
        row = await self._session.get(RingRow, (call_cid, user_id))
        return _record(row) if row else None

    async def for_call(self, call_cid: str, *, status: str | None = None) -> list[RingRecord]:
        """The call's ring rows (only those in `status` when given), by user id."""
        statement = select(RingRow).where(RingRow.call_cid == call_cid)
        if status is not None:
            statement = statement.where(RingRow.status == status)
        rows = await self._session.scalars(statement.order_by(RingRow.user_id))
        return [_record(row) for row in rows]

    async def put(self, record: RingRecord) -> None:
        """Inserts the row, or resets the existing one to `record` (re-ringing a callee)."""
        row = await self._session.get(RingRow, (record.call_cid, record.user_id))
        if row is None:
            self._session.add(
                RingRow(
                    call_cid=record.call_cid,
                    user_id=record.user_id,
                    **{f: getattr(record, f) for f in _FIELDS},
                )
            )
        else:
            for name in _FIELDS:
                setattr(row, name, getattr(record, name))
        await self._session.flush()

    async def save(self, record: RingRecord) -> None:
        """Writes a changed record back (through the ORM row, so later reads in the same transaction
        see it)."""
        await self.put(record)

    async def member_ids(self, call_cid: str) -> list[str]:
        """Every member of the call, oldest first."""
        rows = await self._session.scalars(
            select(CallMemberRow.user_id)
            .where(CallMemberRow.call_cid == call_cid)
            .order_by(CallMemberRow.created_at, CallMemberRow.user_id)
        )
        return list(rows)

    async def members_among(self, call_cid: str, user_ids: Sequence[str]) -> set[str]:
        """Which of `user_ids` are members of the call."""
        if not user_ids:
            return set()
        rows = await self._session.scalars(
            select(CallMemberRow.user_id).where(
                CallMemberRow.call_cid == call_cid, CallMemberRow.user_id.in_(list(user_ids))
            )
        )
        return set(rows)
