"""The event log: appends events in the writing transaction and reads them back for streams.

Ordering: an event's per-call `seq` is taken by incrementing `calls.last_seq` (the row stays locked until
commit); its global `position` and each recipient's `user_seq` are taken at the very end of the
transaction from rows that also stay locked until commit. Numbers are therefore gap-free and in commit
order on every dialect, and a reader that has seen N can never later find a committed N-1."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, and_, bindparam, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from callplane.v1 import event_pb2
from callplane_server.domain.events import DomainEvent
from callplane_server.domain.records import CallRecord
from callplane_server.events.encoding import encode
from callplane_server.store.database import GROUP_SCOPE, GroupScope
from callplane_server.store.execution import Statements
from callplane_server.store.models import CallRow, CounterRow, EventRecipientRow, EventRow, UserRow

POSITION_COUNTER = "event_position"
NOTIFY_CHANNEL = "callplane_events"


@dataclass
class _Pending:
    call_cid: str
    call_type: str
    seq: int
    event: event_pb2.Event
    recipients: tuple[str, ...]
    at: datetime


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back: the message with seq, position and (for WatchUser) user_seq filled in."""

    position: int
    call_cid: str
    call_type: str
    seq: int
    type: str
    event: event_pb2.Event
    # Bytes of the stored payload: lets readers bound what they hold in memory.
    size: int = 0
    # Serialized stream messages carrying this event, by field tag: one event fanned out to many
    # subscribers is serialized once.
    frames: dict[bytes, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def addressed(self) -> bool:
        """A custom event sent to chosen users or roles: only its recipients may see it."""
        if self.type != "custom":
            return False
        custom = self.event.custom
        return bool(custom.to_user_ids or custom.to_roles)


def _decode(row: Any) -> StoredEvent:
    """An events row (ORM or Core) as read back."""
    event = event_pb2.Event.FromString(row.payload)
    event.position = row.position
    event.seq = row.seq
    return StoredEvent(row.position, row.call_cid, row.call_type, row.seq, row.type, event, len(row.payload))


def _within_budget(events: Iterable[StoredEvent], max_bytes: int | None) -> list[StoredEvent]:
    """Takes events until their payloads reach `max_bytes` (always at least one)."""
    taken: list[StoredEvent] = []
    total = 0
    for stored in events:
        taken.append(stored)
        total += stored.size
        if max_bytes is not None and total >= max_bytes:
            break
    return taken


_COUNTERS = cast(Table, CounterRow.__table__)
_EVENTS = cast(Table, EventRow.__table__)
_USERS = cast(Table, UserRow.__table__)
_RECIPIENTS = cast(Table, EventRecipientRow.__table__)
_TAKE_POSITIONS = (
    update(_COUNTERS)
    .where(_COUNTERS.c.name == POSITION_COUNTER)
    .values(value=_COUNTERS.c.value + bindparam("count"))
    .returning(_COUNTERS.c.value)
)
_TAKE_USER_SEQS = (
    update(_USERS)
    .where(_USERS.c.id == bindparam("user_id"))
    .values(last_event_seq=_USERS.c.last_event_seq + bindparam("count"))
    .returning(_USERS.c.last_event_seq)
)
_INSERT_EVENTS = _EVENTS.insert()
_LAST_POSITION = select(_COUNTERS.c.value).where(_COUNTERS.c.name == POSITION_COUNTER)
_EVENTS_AFTER = (
    select(_EVENTS)
    .where(_EVENTS.c.position > bindparam("after"))
    .order_by(_EVENTS.c.position)
    .limit(bindparam("limit"))
)
_INSERT_RECIPIENTS = _RECIPIENTS.insert()
_CALLS = cast(Table, CallRow.__table__)
# A call's last seq and its retained events' seq range, in one prebuilt statement (one row, also when
# the call row is gone).
_OF_CALL = _EVENTS.c.call_cid == bindparam("cid")
_CALL_SEQ_BOUNDS = select(
    select(_CALLS.c.last_seq).where(_CALLS.c.cid == bindparam("cid")).scalar_subquery().label("last"),
    select(func.min(_EVENTS.c.seq)).where(_OF_CALL).scalar_subquery().label("earliest"),
    select(func.max(_EVENTS.c.seq)).where(_OF_CALL).scalar_subquery().label("newest"),
)


@dataclass(frozen=True)
class Written:
    """Events a transaction wrote, as readers will read them back once it commits."""

    last_position: int
    events: list[StoredEvent]
    # position → [(user_id, user_seq)] of the events with recipients.
    recipients: dict[int, list[tuple[str, int]]]


async def write_events(session: AsyncSession, pending: Sequence[_Pending]) -> Written:
    """Numbers `pending` (global positions, recipients' user_seqs) and writes them. The counter rows stay
    locked until commit, so numbers are gap-free and in commit order."""
    connection = Statements(session)
    last = int((await connection.execute(_TAKE_POSITIONS, {"count": len(pending)})).scalar_one())
    first = last - len(pending) + 1
    rows = []
    stored: list[StoredEvent] = []
    recipients: dict[str, list[int]] = {}
    for offset, item in enumerate(pending):
        position = first + offset
        payload = item.event.SerializeToString()  # without its position: that is a column
        rows.append(
            {
                "position": position,
                "call_cid": item.call_cid,
                "call_type": item.call_type,
                "seq": item.seq,
                "type": item.event.type,
                "created_at": item.at,
                "payload": payload,
            }
        )
        item.event.position = position
        stored.append(
            StoredEvent(
                position, item.call_cid, item.call_type, item.seq, item.event.type, item.event, len(payload)
            )
        )
        for user_id in item.recipients:
            recipients.setdefault(user_id, []).append(position)
    await connection.execute(_INSERT_EVENTS, rows)
    delivered_to: dict[int, list[tuple[str, int]]] = {}
    # Sorted so concurrent writers lock user rows in the same order (no deadlocks).
    for user_id in sorted(recipients):
        positions = recipients[user_id]
        taken = await connection.execute(_TAKE_USER_SEQS, {"user_id": user_id, "count": len(positions)})
        user_last = taken.scalar_one_or_none()
        if user_last is None:  # the user no longer exists: nobody to deliver to
            continue
        user_first = int(user_last) - len(positions) + 1
        await connection.execute(
            _INSERT_RECIPIENTS,
            [
                {"user_id": user_id, "user_seq": user_first + index, "position": position}
                for index, position in enumerate(positions)
            ],
        )
        for index, position in enumerate(positions):
            delivered_to.setdefault(position, []).append((user_id, user_first + index))
    if session.get_bind().dialect.name == "postgresql":
        # A doorbell for other server processes; delivered on commit, never on rollback.
        await connection.execute(
            text("SELECT pg_notify(:channel, :position)"), {"channel": NOTIFY_CHANNEL, "position": str(last)}
        )
    return Written(last, stored, delivered_to)


class EventRepository:
    def __init__(self, session: AsyncSession, statements: Statements) -> None:
        self._session = session
        self._statements = statements
        self._pending: list[_Pending] = []

    # -- writing -----------------------------------------------------------------------------------

    def append(self, call: CallRecord, event: DomainEvent, at: datetime, recipients: tuple[str, ...]) -> None:
        """The sink of call aggregates: `event` already numbered (call.last_seq is its seq)."""
        message = encode(event, call.cid, call.last_seq, at)
        self._pending.append(_Pending(call.cid, call.type, call.last_seq, message, recipients, at))

    def pending_cids(self) -> frozenset[str]:
        """The calls this transaction changed so far (each change to a call emits an event)."""
        return frozenset(item.call_cid for item in self._pending)

    async def flush(self) -> Written | None:
        """Numbers and writes the pending events; called last, right before commit, so the counter row
        is locked for as short a time as possible. Returns what was written (None if nothing). In a
        group commit (SQLite) the events are handed to the group instead, which writes those of every
        write that succeeded in one go before it commits (`write_events`): None then."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        group: GroupScope | None = self._session.info.get(GROUP_SCOPE)
        if group is not None:
            group.defer(pending)
            return None
        return await write_events(self._session, pending)

    # -- reading ---------------------------------------------------------------------------------

    async def call_events_after(
        self, call_cid: str, after_seq: int, limit: int, *, max_bytes: int | None = None
    ) -> list[StoredEvent]:
        rows = await self._session.scalars(
            select(EventRow)
            .where(EventRow.call_cid == call_cid, EventRow.seq > after_seq)
            .order_by(EventRow.seq)
            .limit(limit)
        )
        return _within_budget((_decode(row) for row in rows), max_bytes)

    def unwritten_max_seq(self, call_cid: str) -> int:
        """Highest seq of the cid among events of this group commit (or transaction) not written yet:
        a call recreated after a hard delete in the same group goes on after them."""
        group: GroupScope | None = self._session.info.get(GROUP_SCOPE)
        unwritten: list[_Pending] = [*(group.deferred() if group is not None else ()), *self._pending]
        return max((item.seq for item in unwritten if item.call_cid == call_cid), default=0)

    async def call_seq_bounds(self, call_cid: str) -> tuple[int, int] | None:
        """(earliest retained seq, last seq) of a call; None if the call never existed. With nothing
        retained, earliest = last + 1."""
        bounds = (await self._statements.execute(_CALL_SEQ_BOUNDS, {"cid": call_cid})).one()
        last, earliest, newest = bounds.last, bounds.earliest, bounds.newest
        if last is None:
            if newest is None:
                return None
            last = newest  # a hard-deleted call: its retained events still count
        return (int(earliest) if earliest is not None else int(last) + 1, int(last))

    async def user_events_after(
        self, user_id: str, after_user_seq: int, limit: int, *, max_bytes: int | None = None
    ) -> list[StoredEvent]:
        rows = await self._session.execute(
            select(EventRow, EventRecipientRow.user_seq)
            .join(EventRecipientRow, EventRecipientRow.position == EventRow.position)
            .where(EventRecipientRow.user_id == user_id, EventRecipientRow.user_seq > after_user_seq)
            .order_by(EventRecipientRow.user_seq)
            .limit(limit)
        )
        events = []
        for row, user_seq in rows:
            stored = _decode(row)
            stored.event.user_seq = user_seq
            events.append(stored)
        return _within_budget(events, max_bytes)

    async def user_seq_bounds(self, user_id: str) -> tuple[int, int]:
        last = await self._session.scalar(select(UserRow.last_event_seq).where(UserRow.id == user_id))
        earliest = await self._session.scalar(
            select(func.min(EventRecipientRow.user_seq)).where(EventRecipientRow.user_id == user_id)
        )
        last = int(last or 0)
        return (int(earliest) if earliest is not None else last + 1, last)

    async def events_after_position(
        self,
        after_position: int,
        limit: int,
        *,
        call_types: Sequence[str] = (),
        call_cids: Sequence[str] = (),
        event_types: Sequence[str] = (),
        up_to: int | None = None,
        max_bytes: int | None = None,
    ) -> list[StoredEvent]:
        conditions = [EventRow.position > after_position]
        if up_to is not None:
            conditions.append(EventRow.position <= up_to)
        if call_types:
            conditions.append(EventRow.call_type.in_(call_types))
        if call_cids:
            conditions.append(EventRow.call_cid.in_(call_cids))
        if event_types:
            conditions.append(EventRow.type.in_(event_types))
        if len(conditions) == 1:  # the tailer's question, many times a second: a prebuilt statement
            found = await self._statements.execute(_EVENTS_AFTER, {"after": after_position, "limit": limit})
            return _within_budget((_decode(row) for row in found), max_bytes)
        rows = await self._session.scalars(
            select(EventRow).where(and_(*conditions)).order_by(EventRow.position).limit(limit)
        )
        return _within_budget((_decode(row) for row in rows), max_bytes)

    async def events_at(self, positions: Sequence[int]) -> list[StoredEvent]:
        """The retained events at these positions, in position order (compacted ones are missing)."""
        if not positions:
            return []
        rows = await self._session.scalars(
            select(EventRow).where(EventRow.position.in_(positions)).order_by(EventRow.position)
        )
        return [_decode(row) for row in rows]

    async def recipients_of(self, positions: Sequence[int]) -> dict[int, list[tuple[str, int]]]:
        """position → [(user_id, user_seq)] for the given events."""
        if not positions:
            return {}
        rows = await self._session.execute(
            select(EventRecipientRow.position, EventRecipientRow.user_id, EventRecipientRow.user_seq).where(
                EventRecipientRow.position.in_(positions)
            )
        )
        found: dict[int, list[tuple[str, int]]] = {}
        for position, user_id, user_seq in rows:
            found.setdefault(position, []).append((user_id, user_seq))
        return found

    async def last_position(self) -> int:
        """The last position handed out (committed: the counter row is locked until commit)."""
        return int((await self._statements.execute(_LAST_POSITION)).scalar() or 0)

    async def position_bounds(self) -> tuple[int, int]:
        """(earliest retained position, last position handed out)."""
        last = await self.last_position()
        earliest = await self._session.scalar(select(func.min(EventRow.position)))
        return (int(earliest) if earliest is not None else last + 1, last)

    async def compact(self, older_than: datetime, *, keep_after: int | None = None) -> int:
        """Deletes events (and their recipient rows) created before `older_than`, but none after
        position `keep_after`; returns how many."""
        newest_old = await self._session.scalar(
            select(func.max(EventRow.position)).where(EventRow.created_at < older_than)
        )
        if newest_old is not None and keep_after is not None:
            newest_old = min(newest_old, keep_after)
        if newest_old is None:
            return 0
        await self._session.execute(delete(EventRecipientRow).where(EventRecipientRow.position <= newest_old))
        # A DELETE's result is a CursorResult (with rowcount); Session.execute is typed to return Result.
        result = cast(
            "CursorResult[Any]",
            await self._session.execute(delete(EventRow).where(EventRow.position <= newest_old)),
        )
        return int(result.rowcount or 0)
