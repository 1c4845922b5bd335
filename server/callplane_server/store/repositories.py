"""Repositories: every SQL statement the services need, returning plain records."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Integer, Select, String, Table, any_, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.call import Call, EventSink
from callplane_server.domain.records import (
    CallRecord,
    CallTypeRecord,
    MemberRecord,
    Page,
    PageRequest,
    UserRecord,
)
from callplane_server.store.database import GROUP_SCOPE, GroupScope
from callplane_server.store.execution import Statements
from callplane_server.store.models import (
    CallMemberRow,
    CallRow,
    CallTypeRow,
    CounterRow,
    EventRecipientRow,
    EventRow,
    ServerSecretRow,
    UserRow,
    UserTeamRow,
)
from callplane_server.store.query import CALLS, MEMBERS, USERS, CursorSigner, fetch_page
from callplane_server.store.query.pagination import mentions_custom
from callplane_server.store.visibility import CallReader, calls_with_capability, users_visible_to

# The hot lookups, built once with bound parameters over Core columns: executing them skips statement
# construction, cache-key generation and ORM loading (which cost more than SQLite's own work).
_CALL = select(CallRow.__table__).where(CallRow.__table__.c.cid == bindparam("cid"))
_CALL_FOR_SHARE = _CALL.with_for_update(read=True)
_CALLS_BY_CID = select(CallRow.__table__).where(
    CallRow.__table__.c.cid.in_(bindparam("cids", expanding=True))
)
_CALLS = cast(Table, CallRow.__table__)
_CALL_COLUMNS = (
    "created_by_user_id",
    "team",
    "custom",
    "settings_override",
    "backstage",
    "ongoing",
    "member_count",
    "version",
    "created_at",
    "updated_at",
    "starts_at",
    "ended_at",
    "deleted_at",
    "current_session_id",
    "pins",
    "blocked_user_ids",
)
_TYPES = cast(Table, CallTypeRow.__table__)
# The call with its type's settings and grants, its row locked (FOR UPDATE OF calls on PostgreSQL;
# SQLite's writer holds the database lock anyway).
_OPEN_CALL = (
    select(_CALLS, _TYPES.c.settings.label("type_settings"), _TYPES.c.grants.label("type_grants"))
    .join(_TYPES, _TYPES.c.name == _CALLS.c.type)
    .where(_CALLS.c.cid == bindparam("cid"))
    .with_for_update(of=_CALLS)
)
_SAVE_CALL = (
    update(_CALLS)
    .where(_CALLS.c.cid == bindparam("key"))
    .values({column: bindparam(f"new_{column}") for column in (*_CALL_COLUMNS, "last_seq")})
)
_MEMBER_ROLE = select(CallMemberRow.__table__.c.role).where(
    CallMemberRow.__table__.c.call_cid == bindparam("cid"),
    CallMemberRow.__table__.c.user_id == bindparam("user_id"),
)
# A new call, its last_seq taken from the retained events of a hard-deleted call of the same cid.
_CREATE_CALL = (
    _CALLS.insert()
    .values(
        {
            **{name: bindparam(f"new_{name}") for name in ("cid", "type", "id", *_CALL_COLUMNS)},
            "last_seq": select(func.coalesce(func.max(EventRow.__table__.c.seq), 0))
            .where(EventRow.__table__.c.call_cid == bindparam("new_cid"))
            .scalar_subquery(),
        }
    )
    .returning(_CALLS.c.last_seq)
)
# Whether calls has an index on custom data (SQLite: a declared custom index; they are created at run time).
_CUSTOM_DATA_INDEX = text(
    "SELECT 1 AS found FROM sqlite_master "
    "WHERE type = 'index' AND tbl_name = 'calls' AND sql LIKE '%custom%' LIMIT 1"
).columns(found=Integer)
_CALL_TYPES = select(CallTypeRow.__table__).order_by(CallTypeRow.__table__.c.name)
_CALL_TYPE_BY_NAME = select(CallTypeRow.__table__).where(CallTypeRow.__table__.c.name == bindparam("name"))
_USERS_BY_ID = select(UserRow.__table__).where(UserRow.__table__.c.id.in_(bindparam("ids", expanding=True)))
_USER_IDS = select(UserRow.__table__.c.id).where(UserRow.__table__.c.id.in_(bindparam("ids", expanding=True)))
_USER_ID = select(UserRow.__table__.c.id).where(UserRow.__table__.c.id == bindparam("id"))
_TEAMS_OF_USERS = (
    select(UserTeamRow.__table__.c.user_id, UserTeamRow.__table__.c.team)
    .where(UserTeamRow.__table__.c.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(UserTeamRow.__table__.c.user_id, UserTeamRow.__table__.c.team)
)

#: The version of what a rendered call depends on besides the call itself (whose every change bumps its
#: last_seq): users (names, images, roles, teams) and call types (settings, grants). Every change to
#: them bumps it in the same transaction, so a cached call read at (last_seq, version) is current while
#: both still hold.
DIRECTORY_COUNTER = "directory"
_COUNTERS = cast(Table, CounterRow.__table__)
_DIRECTORY_VERSION = select(_COUNTERS.c.value).where(_COUNTERS.c.name == DIRECTORY_COUNTER)
_BUMP_DIRECTORY = (
    update(_COUNTERS).where(_COUNTERS.c.name == DIRECTORY_COUNTER).values(value=_COUNTERS.c.value + 1)
)
_FIRST_DIRECTORY_VERSION = _COUNTERS.insert().values(name=DIRECTORY_COUNTER, value=1)
#: Cached calls' freshness check, one statement for many calls, by dialect: (cid, last_seq, created_at,
#: the directory version) of each call that exists (see CallStamp). PostgreSQL takes the cids as one
#: array parameter, so the statement's text (and asyncpg's prepared statement) is the same whatever
#: their number.
_STAMPS = select(_CALLS.c.cid, _CALLS.c.last_seq, _CALLS.c.created_at, _DIRECTORY_VERSION.scalar_subquery())
CALL_STAMPS = {
    "postgresql": _STAMPS.where(_CALLS.c.cid == any_(bindparam("cids", type_=ARRAY(String)))),
    "sqlite": _STAMPS.where(_CALLS.c.cid.in_(bindparam("cids", expanding=True))),
}

_STAMPED_CALL = select(_CALLS, _DIRECTORY_VERSION.scalar_subquery().label("directory_version")).where(
    _CALLS.c.cid == bindparam("cid")
)


class Directory:
    """The directory version (DIRECTORY_COUNTER)."""

    def __init__(self, session: AsyncSession, statements: Statements) -> None:
        self._session = session
        self._statements = statements

    async def version(self) -> int:
        return int((await self._statements.execute(_DIRECTORY_VERSION)).scalar() or 0)

    async def changed(self) -> None:
        """A user or call type changed in this transaction."""
        bumped = await self._session.execute(_BUMP_DIRECTORY)
        if bumped.rowcount == 0:  # type: ignore[attr-defined]
            # The first change ever (two at once: one loses on the key and its transaction is retried).
            await self._session.execute(_FIRST_DIRECTORY_VERSION)


def _call_record(row: Any) -> CallRecord:
    return CallRecord(
        type=row.type,
        id=row.id,
        created_by_user_id=row.created_by_user_id,
        team=row.team,
        custom=dict(row.custom or {}),
        settings_override=dict(row.settings_override or {}),
        backstage=row.backstage,
        ongoing=row.ongoing,
        member_count=row.member_count,
        version=row.version,
        last_seq=row.last_seq,
        created_at=row.created_at,
        updated_at=row.updated_at,
        starts_at=row.starts_at,
        ended_at=row.ended_at,
        deleted_at=row.deleted_at,
        current_session_id=row.current_session_id,
        pins=list(row.pins or []),
        blocked_user_ids=list(row.blocked_user_ids or []),
    )


def _call_type_record(row: Any) -> CallTypeRecord:
    return CallTypeRecord(
        name=row.name,
        settings=dict(row.settings),
        grants={role: list(caps) for role, caps in row.grants.items()},
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class CallTypeRepository:
    def __init__(self, session: AsyncSession, statements: Statements, directory: Directory) -> None:
        self._session = session
        self._statements = statements
        self._directory = directory

    async def get(self, name: str) -> CallTypeRecord | None:
        row = (await self._statements.execute(_CALL_TYPE_BY_NAME, {"name": name})).first()
        return _call_type_record(row) if row else None

    async def list(self) -> list[CallTypeRecord]:
        return [_call_type_record(row) for row in await self._statements.execute(_CALL_TYPES)]

    async def insert(self, record: CallTypeRecord) -> None:
        self._session.add(
            CallTypeRow(
                name=record.name,
                settings=record.settings,
                grants=record.grants,
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
        )
        await self._session.flush()
        await self._directory.changed()

    async def update(self, record: CallTypeRecord) -> None:
        await self._session.execute(
            update(CallTypeRow)
            .where(CallTypeRow.name == record.name)
            .values(settings=record.settings, grants=record.grants, updated_at=record.updated_at)
        )
        await self._directory.changed()

    async def delete(self, name: str) -> None:
        await self._session.execute(delete(CallTypeRow).where(CallTypeRow.name == name))
        await self._directory.changed()

    async def count_calls(self, name: str) -> int:
        """Calls of the type, soft-deleted ones included (they still reference it)."""
        return int(await self._session.scalar(select(func.count()).where(CallRow.type == name)) or 0)


class UserRepository:
    def __init__(
        self, session: AsyncSession, signer: CursorSigner, statements: Statements, directory: Directory
    ) -> None:
        self._session = session
        self._signer = signer
        self._statements = statements
        self._directory = directory

    async def get_many(self, user_ids: Iterable[str]) -> dict[str, UserRecord]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        rows = (await self._statements.execute(_USERS_BY_ID, {"ids": ids})).all()
        teams = await self._teams_of(ids)
        return {row.id: self._record(row, teams.get(row.id, [])) for row in rows}

    async def existing_ids(self, user_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return set()
        if len(ids) == 1:  # the common question (does this user exist?): a prebuilt statement
            return set((await self._statements.execute(_USER_ID, {"id": ids[0]})).scalars())
        return set((await self._statements.execute(_USER_IDS, {"ids": ids})).scalars())

    async def _teams_of(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        rows = await self._statements.execute(_TEAMS_OF_USERS, {"ids": list(user_ids)})
        teams: dict[str, list[str]] = {}
        for row in rows:
            teams.setdefault(row.user_id, []).append(row.team)
        return teams

    @staticmethod
    def _record(row: Any, teams: list[str]) -> UserRecord:
        return UserRecord(
            id=row.id,
            name=row.name,
            image=row.image,
            role=row.role,
            teams=teams,
            custom=dict(row.custom or {}),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    async def save(self, records: Sequence[UserRecord]) -> None:
        """Inserts new users and overwrites existing ones (teams replaced)."""
        existing = {
            row.id: row
            for row in await self._session.scalars(
                select(UserRow).where(UserRow.id.in_([r.id for r in records])).with_for_update()
            )
        }
        for record in records:
            row = existing.get(record.id)
            if row is None:
                self._session.add(
                    UserRow(
                        id=record.id,
                        name=record.name,
                        image=record.image,
                        role=record.role,
                        custom=record.custom,
                        created_at=record.created_at,
                        updated_at=record.updated_at,
                    )
                )
            else:
                row.name, row.image, row.role = record.name, record.image, record.role
                # assignment: UserRecord.updated_at is Optional, but the records saved are stamped with now.
                row.custom, row.updated_at = record.custom, record.updated_at  # type: ignore[assignment]
        await self._session.flush()
        ids = [r.id for r in records]
        await self._session.execute(delete(UserTeamRow).where(UserTeamRow.user_id.in_(ids)))
        team_rows = [UserTeamRow(user_id=r.id, team=team) for r in records for team in dict.fromkeys(r.teams)]
        self._session.add_all(team_rows)
        await self._session.flush()
        await self._directory.changed()

    async def delete(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """Deletes users and their memberships; returns cid → removed member ids for changed calls."""
        memberships = await self._session.execute(
            select(CallMemberRow.call_cid, CallMemberRow.user_id)
            .where(CallMemberRow.user_id.in_(user_ids))
            .order_by(CallMemberRow.call_cid, CallMemberRow.user_id)
        )
        cids: dict[str, list[str]] = {}
        for cid, user_id in memberships:
            cids.setdefault(cid, []).append(user_id)
        await self._session.execute(delete(CallMemberRow).where(CallMemberRow.user_id.in_(user_ids)))
        await self._session.execute(delete(UserTeamRow).where(UserTeamRow.user_id.in_(user_ids)))
        # The user's inbox (WatchUser) goes with the user: a user created later under the same id starts
        # a new one at user_seq 1 and never reads what was addressed to its predecessor.
        await self._session.execute(delete(EventRecipientRow).where(EventRecipientRow.user_id.in_(user_ids)))
        await self._session.execute(delete(UserRow).where(UserRow.id.in_(user_ids)))
        await self._directory.changed()
        return cids

    async def query(
        self, page: PageRequest, *, visible_to_teams: Sequence[str] | None = None
    ) -> Page[UserRecord]:
        """`visible_to_teams` (a user token's teams) keeps only users sharing one of them (with no teams:
        only users without a team); None shows everyone."""
        base = select(UserRow)
        if visible_to_teams is not None:
            base = base.where(users_visible_to(visible_to_teams))
        rows, next_cursor, prev_cursor = await fetch_page(self._session, base, USERS, page, self._signer)
        teams = await self._teams_of([row.id for row in rows])
        return Page([self._record(row, teams.get(row.id, [])) for row in rows], next_cursor, prev_cursor)


class CallRepository:
    """Calls. In a write transaction, `open` and `create` hand out the call aggregate and keep it (one per
    call: an identity map), and `flush` writes back each one that changed, once."""

    def __init__(
        self,
        session: AsyncSession,
        signer: CursorSigner,
        statements: Statements,
        sink: EventSink | None = None,
        unwritten_seq: Callable[[str], int] = lambda _cid: 0,
    ) -> None:
        self._session = session
        self._signer = signer
        self._statements = statements
        # The highest seq of a cid among events recorded but not written yet (see EventRepository).
        self._unwritten_seq = unwritten_seq
        self._sink = sink
        self._open: dict[str, Call] = {}

    def _aggregate(
        self, record: CallRecord, settings: dict[str, Any], grants: dict[str, list[str]], now: datetime
    ) -> Call:
        """The aggregate of `record` with its type's settings and grants, kept for this transaction."""
        if self._sink is None:  # pragma: no cover - read transactions hand out no aggregates
            raise RuntimeError("calls are opened for change only in write transactions")
        call = Call(
            record,
            type_settings=dict(settings),
            grants={role: list(capabilities) for role, capabilities in grants.items()},
            now=now,
            sink=self._sink,
        )
        self._open[record.cid] = call
        return call

    async def open(self, cid: str, now: datetime) -> Call | None:
        """The call (soft-deleted too) for change, its row locked until commit (which serializes the
        writers of one call, and so its event seq, on PostgreSQL), with its type's settings and grants:
        one statement. Opening an open call again hands out the same aggregate."""
        call = self._open.get(cid)
        if call is not None:
            call.now = now
            return call
        row = (await self._statements.execute(_OPEN_CALL, {"cid": cid})).first()
        if row is None:
            return None
        call = self._aggregate(_call_record(row), row.type_settings, row.type_grants, now)
        group: GroupScope | None = self._session.info.get(GROUP_SCOPE)
        known = group.recall(("call", cid)) if group is not None else None
        if known is not None and known[0] == call.record:
            # An earlier write of this group commit left the call in this very state (every change bumps
            # last_seq) and knew its first members.
            call.members, call.members_limit = known[1], known[2]
        return call

    @property
    def opened_any(self) -> bool:
        return bool(self._open)

    def opened(self, cid: str) -> Call | None:
        """The call's aggregate if this transaction opened it."""
        return self._open.get(cid)

    async def create(self, record: CallRecord, call_type: CallTypeRecord, now: datetime) -> Call:
        """Inserts a new call and hands out its aggregate. Its event seqs go on after those a hard-deleted
        call of the same cid left in the log (`record.last_seq` is set from them)."""
        values = {"cid": record.cid, "type": record.type, "id": record.id, **_call_columns(record)}
        inserted = await self._statements.execute(_CREATE_CALL, {f"new_{k}": v for k, v in values.items()})
        record.last_seq = max(int(inserted.scalar_one()), self._unwritten_seq(record.cid))
        call = self._aggregate(record, call_type.settings, call_type.grants, now)
        call.created = True
        return call

    async def flush(self) -> frozenset[str]:
        """Writes back every opened call that changed (with its new last_seq); returns their cids."""
        group: GroupScope | None = self._session.info.get(GROUP_SCOPE)
        if group is not None:
            for call in self._open.values():
                if call.members is not None and not call.gone:
                    group.remember(
                        ("call", call.cid), (replace(call.record), call.members, call.members_limit)
                    )
        changed = [call for call in self._open.values() if call.changed]
        for call in changed:
            if not call.gone:
                values = {**_call_columns(call.record), "last_seq": call.record.last_seq}
                await self._statements.execute(
                    _SAVE_CALL, {"key": call.cid, **{f"new_{name}": value for name, value in values.items()}}
                )
            call.changed = False
        return frozenset(call.cid for call in changed)

    async def get(self, cid: str, *, for_share: bool = False) -> CallRecord | None:
        """The call (soft-deleted too), to read (changes open it: `open`). `for_share` waits for in-flight
        writers of the call and keeps new ones out, so several reads see one consistent state (every
        change of a call's state locks its row). A call this transaction opened is its aggregate's record,
        pending changes included."""
        opened = self._open.get(cid)
        if opened is not None:
            return None if opened.gone else opened.record
        statement = _CALL_FOR_SHARE if for_share else _CALL
        row = (await self._statements.execute(statement, {"cid": cid})).first()
        return _call_record(row) if row else None

    async def get_stamped(self, cid: str) -> tuple[CallRecord | None, int]:
        """The call (soft-deleted too) and the directory version, read in one statement (one snapshot):
        what a cached call's stamp is made of (see CALL_STAMPS)."""
        row = (await self._statements.execute(_STAMPED_CALL, {"cid": cid})).first()
        return (_call_record(row), int(row.directory_version or 0)) if row else (None, 0)

    async def hard_delete(self, cid: str) -> None:
        opened = self._open.get(cid)
        if opened is not None:
            opened.gone = True
        await self._session.execute(delete(CallMemberRow).where(CallMemberRow.call_cid == cid))
        await self._session.execute(delete(CallRow).where(CallRow.cid == cid))

    async def query_stamps(
        self, page: PageRequest, *, reader: CallReader | None = None
    ) -> Page[tuple[str, int, datetime]]:
        """Live calls, with `reader` (a user token) only those it may read (read-call), as (cid, last_seq,
        created_at) of each: what a cache holding some of them needs to know which it holds (`get_many`
        reads the others)."""
        base = select(_CALLS.c.cid, _CALLS.c.last_seq, _CALLS.c.created_at).where(
            _CALLS.c.deleted_at.is_(None)
        )
        if reader is not None:
            base = base.where(calls_with_capability(reader, "read-call"))
        rows, next_cursor, prev_cursor = await fetch_page(
            self._session,
            base,
            CALLS,
            page,
            self._signer,
            whole_rows=True,
            walk_first=await self._walk_first(page),
        )
        return Page([(row.cid, row.last_seq, row.created_at) for row in rows], next_cursor, prev_cursor)

    async def get_many(self, cids: Sequence[str]) -> dict[str, CallRecord]:
        """The calls that exist among `cids` (soft-deleted too), by cid."""
        if not cids:
            return {}
        rows = await self._statements.execute(_CALLS_BY_CID, {"cids": list(cids)})
        return {row.cid: _call_record(row) for row in rows}

    async def _walk_first(self, page: PageRequest) -> tuple[str, ...]:
        """The sorts whose index QueryCalls walks first (see fetch_page): on SQLite, when the page filters on
        custom data and an index on custom data exists, which SQLite's planner would pick to fetch every
        match, then sort them all, however many. PostgreSQL has statistics on indexed expressions and walks
        the sort index by itself when the filter is broad."""
        if self._session.get_bind().dialect.name != "sqlite" or not mentions_custom(page.filter_conditions):
            return ()
        if (await self._statements.execute(_CUSTOM_DATA_INDEX)).first() is None:
            return ()
        return ("created_at", "updated_at")  # ix_calls_created_at_cid, ix_calls_updated_at_cid


def _call_columns(record: CallRecord) -> dict[str, Any]:
    return {
        "created_by_user_id": record.created_by_user_id,
        "team": record.team,
        "custom": record.custom,
        "settings_override": record.settings_override,
        "backstage": record.backstage,
        "ongoing": record.ongoing,
        "member_count": record.member_count,
        "version": record.version,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "starts_at": record.starts_at,
        "ended_at": record.ended_at,
        "deleted_at": record.deleted_at,
        "current_session_id": record.current_session_id,
        "pins": record.pins,
        "blocked_user_ids": record.blocked_user_ids,
    }


def _first_members_statement() -> Select[Any]:
    # Built once: Core columns, no ORM entity per call, so executing it skips compilation entirely.
    members = CallMemberRow.__table__
    position = (
        func.row_number()
        .over(partition_by=members.c.call_cid, order_by=(members.c.created_at, members.c.user_id))
        .label("position")
    )
    ranked = select(members, position).where(members.c.call_cid.in_(bindparam("cids", expanding=True)))
    ranked_rows = ranked.subquery()
    return (
        select(*(ranked_rows.c[column.name] for column in members.columns))
        .where(ranked_rows.c.position <= bindparam("limit"))
        .order_by(ranked_rows.c.call_cid, ranked_rows.c.created_at, ranked_rows.c.user_id)
    )


_FIRST_MEMBERS = _first_members_statement()
_INSERT_MEMBERS = cast(Table, CallMemberRow.__table__).insert()


class MemberRepository:
    def __init__(
        self, session: AsyncSession, signer: CursorSigner, users: UserRepository, statements: Statements
    ) -> None:
        self._session = session
        self._statements = statements
        self._signer = signer
        self._users = users

    async def _records(self, rows: Sequence[Any]) -> list[MemberRecord]:
        """Member records of call_members rows (ORM rows or Core rows: the same attributes)."""
        users = await self._users.get_many(row.user_id for row in rows)
        return [
            MemberRecord(
                call_cid=row.call_cid,
                user_id=row.user_id,
                role=row.role,
                custom=dict(row.custom or {}),
                created_at=row.created_at,
                updated_at=row.updated_at,
                user=users.get(row.user_id),
            )
            for row in rows
        ]

    async def get_many(self, cid: str, user_ids: Sequence[str]) -> dict[str, MemberRecord]:
        if not user_ids:
            return {}
        rows = (
            await self._session.scalars(
                select(CallMemberRow).where(
                    CallMemberRow.call_cid == cid, CallMemberRow.user_id.in_(user_ids)
                )
            )
        ).all()
        return {record.user_id: record for record in await self._records(rows)}

    async def first(self, cids: Sequence[str], limit: int) -> dict[str, list[MemberRecord]]:
        """The oldest `limit` members of each call, in one query (window function)."""
        if not cids or limit <= 0:
            return {cid: [] for cid in cids}
        rows = (await self._statements.execute(_FIRST_MEMBERS, {"cids": list(cids), "limit": limit})).all()
        grouped: dict[str, list[MemberRecord]] = {cid: [] for cid in cids}
        for record in await self._records(rows):
            grouped[record.call_cid].append(record)
        return grouped

    async def role_of(self, cid: str, user_id: str) -> str | None:
        """The user's member role in the call; None when not a member."""
        role: str | None = (
            await self._statements.execute(_MEMBER_ROLE, {"cid": cid, "user_id": user_id})
        ).scalar()
        return role

    async def roles_of(self, user_id: str, cids: Sequence[str]) -> dict[str, str]:
        """cid → the user's member role, for the calls among `cids` the user is a member of."""
        if not cids:
            return {}
        rows = await self._session.execute(
            select(CallMemberRow.call_cid, CallMemberRow.role).where(
                CallMemberRow.user_id == user_id, CallMemberRow.call_cid.in_(cids)
            )
        )
        return {cid: role for cid, role in rows}

    async def insert_new(self, records: Sequence[MemberRecord]) -> None:
        """Members of a call that has none yet (one multi-row statement)."""
        if records:
            await self._statements.execute(
                _INSERT_MEMBERS,
                [
                    {
                        "call_cid": r.call_cid,
                        "user_id": r.user_id,
                        "role": r.role,
                        "custom": r.custom,
                        "created_at": r.created_at,
                        "updated_at": r.updated_at,
                    }
                    for r in records
                ],
            )

    async def upsert(self, records: Sequence[MemberRecord]) -> None:
        if not records:
            return
        cid = records[0].call_cid
        existing = {
            row.user_id: row
            for row in await self._session.scalars(
                select(CallMemberRow).where(
                    CallMemberRow.call_cid == cid, CallMemberRow.user_id.in_([r.user_id for r in records])
                )
            )
        }
        for record in records:
            row = existing.get(record.user_id)
            if row is None:
                self._session.add(
                    CallMemberRow(
                        call_cid=record.call_cid,
                        user_id=record.user_id,
                        role=record.role,
                        custom=record.custom,
                        created_at=record.created_at,
                        updated_at=record.updated_at,
                    )
                )
            else:
                row.role, row.custom, row.updated_at = record.role, record.custom, record.updated_at
        await self._session.flush()

    async def remove(self, cid: str, user_ids: Sequence[str]) -> list[str]:
        if not user_ids:
            return []
        present = list(
            await self._session.scalars(
                select(CallMemberRow.user_id).where(
                    CallMemberRow.call_cid == cid, CallMemberRow.user_id.in_(user_ids)
                )
            )
        )
        if present:
            await self._session.execute(
                delete(CallMemberRow).where(CallMemberRow.call_cid == cid, CallMemberRow.user_id.in_(present))
            )
        return [user_id for user_id in user_ids if user_id in set(present)]

    async def query(self, cid: str, page: PageRequest) -> Page[MemberRecord]:
        base = select(CallMemberRow).where(CallMemberRow.call_cid == cid)
        rows, next_cursor, prev_cursor = await fetch_page(
            self._session, base, MEMBERS, page, self._signer, scope=cid
        )
        return Page(await self._records(rows), next_cursor, prev_cursor)


class SecretRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get_or_create(self, name: str) -> str:
        """A random secret stored once per database, so every server process agrees on it."""
        value = await self._session.scalar(select(ServerSecretRow.value).where(ServerSecretRow.name == name))
        if value is None:
            value = secrets.token_urlsafe(48)
            self._session.add(ServerSecretRow(name=name, value=value))
            await self._session.flush()
        return value
