"""Sessions and participants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BindParameter, Table, and_, bindparam, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import (
    Page,
    PageRequest,
    ParticipantRecord,
    SessionRecord,
    UserRecord,
)
from callplane_server.store.models import (
    CallMemberRow,
    CallSessionRow,
    ParticipantRow,
    PermissionOverrideRow,
    TimerRow,
    UserRow,
    UserTeamRow,
)
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

# The hot statements, built once over Core columns with bound parameters: executing them skips statement
# construction, cache-key generation, the ORM's unit of work and its bulk-update path.
_SESSIONS = cast(Table, CallSessionRow.__table__)
_TIMERS = cast(Table, TimerRow.__table__)
#: The timer kind of participant leases (services/session_rules.LEASE_TIMER).
LEASE_TIMER_KIND = "participant_lease"
#: Pairs per hold statement (well under SQLite's 32,766 bound parameters).
_HOLD_BATCH = 500
_PEOPLE = cast(Table, ParticipantRow.__table__)
_SESSION = select(_SESSIONS).where(_SESSIONS.c.id == bindparam("id"))
_INSERT_SESSION = _SESSIONS.insert()
_SAVE_SESSION = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id == bindparam("key"))
    .values({name: bindparam(f"new_{name}") for name in _SESSION_FIELDS})
)
_JOIN_ORDER = (_PEOPLE.c.joined_at, _PEOPLE.c.participant_session_id)
_LIVE = _PEOPLE.c.left_at.is_(None)
_PARTICIPANT = select(_PEOPLE).where(
    _PEOPLE.c.session_id == bindparam("session_id"),
    _PEOPLE.c.participant_session_id == bindparam("participant_session_id"),
)
_LIVE_PARTICIPANTS = (
    select(_PEOPLE).where(_PEOPLE.c.session_id == bindparam("session_id"), _LIVE).order_by(*_JOIN_ORDER)
)
# The live participants and the one named (live or not), in join order.
_LIVE_AND_ONE = (
    select(_PEOPLE)
    .where(
        _PEOPLE.c.session_id == bindparam("session_id"),
        or_(_LIVE, _PEOPLE.c.participant_session_id == bindparam("participant_session_id")),
    )
    .order_by(*_JOIN_ORDER)
)
# The same with the session row in front of each (one row of NULL participant columns when none).
_SESSION_AND_PEOPLE = (
    select(_SESSIONS, *(column.label(f"p_{column.name}") for column in _PEOPLE.columns))
    .outerjoin(
        _PEOPLE,
        and_(
            _PEOPLE.c.session_id == _SESSIONS.c.id,
            or_(_LIVE, _PEOPLE.c.participant_session_id == bindparam("participant_session_id")),
        ),
    )
    .where(_SESSIONS.c.id == bindparam("session_id"))
    .order_by(*_JOIN_ORDER)
)
_LATEST_PARTICIPANT = (
    select(_PEOPLE)
    .where(
        _PEOPLE.c.call_cid == bindparam("call_cid"),
        _PEOPLE.c.participant_session_id == bindparam("participant_session_id"),
    )
    .order_by(_PEOPLE.c.joined_at.desc())
    .limit(1)
)
_INSERT_PARTICIPANT = _PEOPLE.insert()
_SAVE_PARTICIPANT = (
    update(_PEOPLE)
    .where(
        _PEOPLE.c.session_id == bindparam("key_session_id"),
        _PEOPLE.c.participant_session_id == bindparam("key_participant_session_id"),
    )
    .values({name: bindparam(f"new_{name}") for name in _PARTICIPANT_FIELDS})
)
# held_by is not among _PARTICIPANT_FIELDS: saving a participant read before a replica took hold of it
# must not undo the hold (replicas take hold without the call's lock); only these statements change it.
_UNHOLD = (
    update(_PEOPLE)
    .where(
        _PEOPLE.c.session_id == bindparam("key_session_id"),
        _PEOPLE.c.participant_session_id == bindparam("key_participant_session_id"),
    )
    .values(held_by=None)
)


def _joiner_statement() -> Any:
    users = cast(Table, UserRow.__table__)
    teams = cast(Table, UserTeamRow.__table__)
    members = cast(Table, CallMemberRow.__table__)
    overrides = cast(Table, PermissionOverrideRow.__table__)
    cid: BindParameter[str] = bindparam("cid")
    user_id: BindParameter[str] = bindparam("user_id")
    of_user = (overrides.c.call_cid == cid) & (overrides.c.user_id == users.c.id)
    return (
        select(
            users.c.id,
            users.c.name,
            users.c.image,
            users.c.role,
            users.c.custom,
            users.c.created_at,
            users.c.updated_at,
            teams.c.team,
            select(members.c.role)
            .where(members.c.call_cid == cid, members.c.user_id == users.c.id)
            .scalar_subquery()
            .label("member_role"),
            select(overrides.c.granted).where(of_user).scalar_subquery().label("granted"),
            select(overrides.c.revoked).where(of_user).scalar_subquery().label("revoked"),
        )
        .outerjoin(teams, teams.c.user_id == users.c.id)
        .where(users.c.id == user_id)
        .order_by(teams.c.team)
    )


_JOINER = _joiner_statement()


@dataclass
class Joiner:
    """A user about to join a call, with their standing in it: member role (None: not a member) and
    per-user (granted, revoked) capability overrides."""

    user: UserRecord
    member_role: str | None
    overrides: tuple[list[str], list[str]]


def session_record(row: Any) -> SessionRecord:
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


def participant_record(row: Any) -> ParticipantRecord:
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
        held_by=row.held_by,
    )


class _Prefixed:
    """A joined row's participant columns (labelled `p_<name>`) under their own names."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: Any) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        return self._mapping[f"p_{name}"]


def _live_and_one(
    people: list[ParticipantRecord], participant_session_id: str
) -> tuple[list[ParticipantRecord], ParticipantRecord | None]:
    one = next((p for p in people if p.participant_session_id == participant_session_id), None)
    return [p for p in people if p.left_at is None], one


def _participant_values(record: ParticipantRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in _PARTICIPANT_FIELDS}


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def present_count(self) -> int:
        """Participants present now, in every call (joined and not left)."""
        return int(
            await self._session.scalar(
                select(func.count()).select_from(ParticipantRow).where(ParticipantRow.left_at.is_(None))
            )
            or 0
        )

    async def get(self, session_id: str) -> SessionRecord | None:
        row = (await self._session.execute(_SESSION, {"id": session_id})).first()
        return session_record(row) if row else None

    async def insert(self, record: SessionRecord) -> None:
        await self._session.execute(
            _INSERT_SESSION, {"id": record.id, **{f: getattr(record, f) for f in _SESSION_FIELDS}}
        )

    async def save(self, record: SessionRecord) -> None:
        await self._session.execute(
            _SAVE_SESSION, {"key": record.id, **{f"new_{f}": getattr(record, f) for f in _SESSION_FIELDS}}
        )

    async def live_participants(self, session_id: str) -> list[ParticipantRecord]:
        rows = await self._session.execute(_LIVE_PARTICIPANTS, {"session_id": session_id})
        return [participant_record(row) for row in rows]

    async def live_and_one(
        self, session_id: str, participant_session_id: str
    ) -> tuple[list[ParticipantRecord], ParticipantRecord | None]:
        """The session's live participants (join order) and the participant with this id in it, live or
        not (the same record when live), in one query."""
        rows = await self._session.execute(
            _LIVE_AND_ONE, {"session_id": session_id, "participant_session_id": participant_session_id}
        )
        return _live_and_one([participant_record(row) for row in rows], participant_session_id)

    async def with_participants(
        self, session_id: str, participant_session_id: str
    ) -> tuple[SessionRecord | None, list[ParticipantRecord], ParticipantRecord | None]:
        """The session, its live participants and the participant with this id in it (as live_and_one),
        in one query."""
        rows = (
            await self._session.execute(
                _SESSION_AND_PEOPLE,
                {"session_id": session_id, "participant_session_id": participant_session_id},
            )
        ).all()
        if not rows:
            return None, [], None
        people = [participant_record(_Prefixed(row._mapping)) for row in rows if row.p_session_id is not None]
        return (session_record(rows[0]), *_live_and_one(people, participant_session_id))

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
        row = (
            await self._session.execute(
                _PARTICIPANT, {"session_id": session_id, "participant_session_id": participant_session_id}
            )
        ).first()
        return participant_record(row) if row else None

    async def take_hold(self, held: Sequence[tuple[str, str]], holder: str) -> set[tuple[str, str]]:
        """Marks the live participants among `held` ((call cid, participant_session_id) pairs) as held by
        the replica `holder`: their own leases and lease timers go (the replica's lease covers them), in
        two statements per batch whatever their number. Returns the pairs that were live."""
        taken: set[tuple[str, str]] = set()
        for start in range(0, len(held), _HOLD_BATCH):
            batch = held[start : start + _HOLD_BATCH]
            # Timers first, the order of the timer runner (claim the timer, then change the participant),
            # so that a lease expiring meanwhile on another replica waits for this rather than deadlocks.
            await self._session.execute(
                delete(_TIMERS).where(
                    _TIMERS.c.kind == LEASE_TIMER_KIND, tuple_(_TIMERS.c.call_cid, _TIMERS.c.key).in_(batch)
                )
            )
            rows = await self._session.execute(
                update(_PEOPLE)
                .where(_LIVE, tuple_(_PEOPLE.c.call_cid, _PEOPLE.c.participant_session_id).in_(batch))
                .values(held_by=holder, lease_expires_at=None)
                .returning(_PEOPLE.c.call_cid, _PEOPLE.c.participant_session_id)
            )
            taken.update((row.call_cid, row.participant_session_id) for row in rows)
        return taken

    async def release_held(self, holder: str, lease_expires_at: datetime) -> list[ParticipantRecord]:
        """The live participants the replica `holder` held get a lease of their own again, ending at
        `lease_expires_at` (their lease timers are the caller's to set); returns them."""
        rows = await self._session.execute(
            update(_PEOPLE)
            .where(_LIVE, _PEOPLE.c.held_by == holder)
            .values(held_by=None, lease_expires_at=lease_expires_at)
            .returning(*_PEOPLE.columns)
        )
        return [participant_record(row) for row in rows]

    async def unhold(self, participant: ParticipantRecord) -> None:
        """The participant is no longer held by a replica (its lease is its own again)."""
        await self._session.execute(
            _UNHOLD,
            {
                "key_session_id": participant.session_id,
                "key_participant_session_id": participant.participant_session_id,
            },
        )
        participant.held_by = None

    async def insert_participant(self, record: ParticipantRecord) -> None:
        await self._session.execute(
            _INSERT_PARTICIPANT,
            {
                "session_id": record.session_id,
                "participant_session_id": record.participant_session_id,
                **_participant_values(record),
            },
        )

    async def save_participant(self, record: ParticipantRecord) -> None:
        await self._session.execute(
            _SAVE_PARTICIPANT,
            {
                "key_session_id": record.session_id,
                "key_participant_session_id": record.participant_session_id,
                **{f"new_{name}": value for name, value in _participant_values(record).items()},
            },
        )

    async def joiner(self, cid: str, user_id: str) -> Joiner | None:
        """The user with their member role and capability overrides in the call, in one query; None when
        the user does not exist."""
        rows = (await self._session.execute(_JOINER, {"cid": cid, "user_id": user_id})).all()
        if not rows:
            return None
        row = rows[0]
        user = UserRecord(
            id=row.id,
            name=row.name,
            image=row.image,
            role=row.role,
            teams=[r.team for r in rows if r.team is not None],
            custom=dict(row.custom or {}),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        overrides = (list(row.granted or []), list(row.revoked or []))
        return Joiner(user, row.member_role, overrides)

    async def find_participant(self, call_cid: str, participant_session_id: str) -> ParticipantRecord | None:
        """The latest participant of the call with this connection id, in any session."""
        row = (
            await self._session.execute(
                _LATEST_PARTICIPANT, {"call_cid": call_cid, "participant_session_id": participant_session_id}
            )
        ).first()
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
