"""Sessions and participants."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import Page, PageRequest, ParticipantRecord, SessionRecord
from callplane_server.store.models import CallSessionRow, ParticipantRow
from callplane_server.store.query import CursorSigner, fetch_page
from callplane_server.store.query.entities import PARTICIPANTS, SESSIONS

_SESSION_FIELDS = (
    "call_cid",
    "started_at",
    "ended_at",
    "end_reason",
    "timer_ends_at",
    "custom",
    "custom_version",
    "accepted_by",
    "rejected_by",
    "missed_by",
)
_PARTICIPANT_FIELDS = (
    "call_cid",
    "user_id",
    "role",
    "custom",
    "custom_version",
    "published_tracks",
    "joined_at",
    "left_at",
    "left_reason",
    "lease_expires_at",
)


def session_record(row: CallSessionRow) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        call_cid=row.call_cid,
        started_at=row.started_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
        timer_ends_at=row.timer_ends_at,
        custom=dict(row.custom or {}),
        custom_version=row.custom_version,
        accepted_by=list(row.accepted_by or []),
        rejected_by=dict(row.rejected_by or {}),
        missed_by=list(row.missed_by or []),
    )


def participant_record(row: ParticipantRow) -> ParticipantRecord:
    return ParticipantRecord(
        session_id=row.session_id,
        participant_session_id=row.participant_session_id,
        call_cid=row.call_cid,
        user_id=row.user_id,
        role=row.role,
        custom=dict(row.custom or {}),
        custom_version=row.custom_version,
        published_tracks=list(row.published_tracks or []),
        joined_at=row.joined_at,
        left_at=row.left_at,
        left_reason=row.left_reason,
        lease_expires_at=row.lease_expires_at,
    )


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self._session.get(CallSessionRow, session_id)
        return session_record(row) if row else None

    async def insert(self, record: SessionRecord) -> None:
        self._session.add(CallSessionRow(id=record.id, **{f: getattr(record, f) for f in _SESSION_FIELDS}))
        await self._session.flush()

    async def save(self, record: SessionRecord) -> None:
        await self._session.execute(
            update(CallSessionRow)
            .where(CallSessionRow.id == record.id)
            .values(**{f: getattr(record, f) for f in _SESSION_FIELDS})
        )

    async def live_participants(self, session_id: str) -> list[ParticipantRecord]:
        rows = await self._session.scalars(
            select(ParticipantRow)
            .where(ParticipantRow.session_id == session_id, ParticipantRow.left_at.is_(None))
            .order_by(ParticipantRow.joined_at, ParticipantRow.participant_session_id)
        )
        return [participant_record(row) for row in rows]

    async def participants(self, session_ids: Sequence[str]) -> dict[str, list[ParticipantRecord]]:
        """Everyone who took part in each session (history), in join order."""
        found: dict[str, list[ParticipantRecord]] = {session_id: [] for session_id in session_ids}
        if not session_ids:
            return found
        rows = await self._session.scalars(
            select(ParticipantRow)
            .where(ParticipantRow.session_id.in_(session_ids))
            .order_by(ParticipantRow.joined_at, ParticipantRow.participant_session_id)
        )
        for row in rows:
            found[row.session_id].append(participant_record(row))
        return found

    async def get_participant(self, session_id: str, participant_session_id: str) -> ParticipantRecord | None:
        row = await self._session.get(ParticipantRow, (session_id, participant_session_id))
        return participant_record(row) if row else None

    async def insert_participant(self, record: ParticipantRecord) -> None:
        self._session.add(
            ParticipantRow(
                session_id=record.session_id,
                participant_session_id=record.participant_session_id,
                **{f: getattr(record, f) for f in _PARTICIPANT_FIELDS},
            )
        )
        await self._session.flush()

    async def save_participant(self, record: ParticipantRecord) -> None:
        await self._session.execute(
            update(ParticipantRow)
            .where(
                ParticipantRow.session_id == record.session_id,
                ParticipantRow.participant_session_id == record.participant_session_id,
            )
            .values(**{f: getattr(record, f) for f in _PARTICIPANT_FIELDS})
        )

    async def find_participant(self, call_cid: str, participant_session_id: str) -> ParticipantRecord | None:
        """The latest participant of the call with this connection id, in any session."""
        row = await self._session.scalar(
            select(ParticipantRow)
            .where(
                ParticipantRow.call_cid == call_cid,
                ParticipantRow.participant_session_id == participant_session_id,
            )
            .order_by(ParticipantRow.joined_at.desc())
            .limit(1)
        )
        return participant_record(row) if row else None

    async def live_counts_by_role(self, session_id: str) -> dict[str, int]:
        rows = await self._session.execute(
            select(ParticipantRow.role, func.count())
            .where(ParticipantRow.session_id == session_id, ParticipantRow.left_at.is_(None))
            .group_by(ParticipantRow.role)
        )
        return {role: int(count) for role, count in rows.all()}

    async def query_live_participants(
        self, session_id: str, page: PageRequest, signer: CursorSigner
    ) -> Page[ParticipantRecord]:
        base = select(ParticipantRow).where(
            ParticipantRow.session_id == session_id, ParticipantRow.left_at.is_(None)
        )
        rows, next_cursor, prev_cursor = await fetch_page(
            self._session, base, PARTICIPANTS, page, signer, scope=session_id
        )
        return Page([participant_record(row) for row in rows], next_cursor, prev_cursor)

    async def query_sessions(
        self, call_cid: str, page: PageRequest, signer: CursorSigner
    ) -> Page[SessionRecord]:
        base = select(CallSessionRow).where(CallSessionRow.call_cid == call_cid)
        rows, next_cursor, prev_cursor = await fetch_page(
            self._session, base, SESSIONS, page, signer, scope=call_cid
        )
        return Page([session_record(row) for row in rows], next_cursor, prev_cursor)

    async def delete_for_call(self, call_cid: str) -> None:
        """Drops a hard-deleted call's sessions and participants."""
        await self._session.execute(delete(ParticipantRow).where(ParticipantRow.call_cid == call_cid))
        await self._session.execute(delete(CallSessionRow).where(CallSessionRow.call_cid == call_cid))
