"""Webhook endpoints, their leases and the delivery log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Table, and_, case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.webhooks import (
    DeliveryPage,
    DeliveryQuery,
    DeliveryRecord,
    DeliveryStatus,
    WebhookRecord,
    WebhookState,
)
from callplane_server.store.models import WebhookDeliveryRow, WebhookRow

_WEBHOOKS = cast(Table, WebhookRow.__table__)
_DELIVERIES = cast(Table, WebhookDeliveryRow.__table__)


@dataclass(frozen=True)
class Lease:
    """An endpoint this replica holds: what it last knew of it."""

    webhook_id: str
    version: int
    epoch: int


@dataclass
class Progress:
    """Where a claimed endpoint's delivery stands, as a worker resumes it."""

    webhook: WebhookRecord
    # Deliveries of events after the cursor (their retry state, or SUCCEEDED: not to be sent again).
    ahead: list[DeliveryRecord]
    # PENDING deliveries at or before the cursor: single events queued again by RedeliverWebhook.
    requeued: list[DeliveryRecord]


def _webhook(row: Any) -> WebhookRecord:
    return WebhookRecord(
        id=row.id,
        url=row.url,
        description=row.description,
        event_types=list(row.event_types),
        call_types=list(row.call_types),
        enabled=row.enabled,
        state=WebhookState(row.state),
        delivered_position=int(row.delivered_position),
        created_at=row.created_at,
        updated_at=row.updated_at,
        sealed_secret=row.secret,
        sealed_previous_secret=row.previous_secret,
        previous_secret_expires_at=row.previous_secret_expires_at,
        failing_since=row.failing_since,
        last_error=row.last_error,
        version=row.version,
    )


def _delivery(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        webhook_id=row.webhook_id,
        position=int(row.position),
        call_cid=row.call_cid,
        seq=int(row.seq),
        event_type=row.event_type,
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_latency=None if row.last_latency_ms is None else timedelta(milliseconds=row.last_latency_ms),
        last_error=row.last_error,
        first_attempt_at=row.first_attempt_at,
        last_attempt_at=row.last_attempt_at,
        next_attempt_at=row.next_attempt_at,
    )


def _delivery_values(record: DeliveryRecord) -> dict[str, Any]:
    return {
        "webhook_id": record.webhook_id,
        "position": record.position,
        "call_cid": record.call_cid,
        "seq": record.seq,
        "event_type": record.event_type,
        "status": record.status.value,
        "attempts": record.attempts,
        "last_status_code": record.last_status_code,
        "last_latency_ms": None
        if record.last_latency is None
        else record.last_latency.total_seconds() * 1000,
        "last_error": record.last_error,
        "first_attempt_at": record.first_attempt_at,
        "last_attempt_at": record.last_attempt_at,
        "next_attempt_at": record.next_attempt_at,
    }


_UPDATED_BY_RECORD = (
    "status",
    "attempts",
    "last_status_code",
    "last_latency_ms",
    "last_error",
    "first_attempt_at",
    "last_attempt_at",
    "next_attempt_at",
)


class WebhookRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    # -- endpoints (the API) ---------------------------------------------------------------------

    async def insert(self, record: WebhookRecord) -> None:
        await self._session.execute(
            _WEBHOOKS.insert().values(
                id=record.id,
                url=record.url,
                description=record.description,
                event_types=record.event_types,
                call_types=record.call_types,
                enabled=record.enabled,
                state=record.state.value,
                delivered_position=record.delivered_position,
                secret=record.sealed_secret,
                previous_secret=record.sealed_previous_secret,
                previous_secret_expires_at=record.previous_secret_expires_at,
                failing_since=record.failing_since,
                last_error=record.last_error,
                version=1,
                epoch=1,
                created_at=record.created_at,
                updated_at=record.updated_at,
            )
        )

    async def get(self, webhook_id: str, *, for_update: bool = False) -> WebhookRecord | None:
        statement = select(_WEBHOOKS).where(_WEBHOOKS.c.id == webhook_id)
        if for_update:
            statement = statement.with_for_update()
        row = (await self._session.execute(statement)).first()
        return None if row is None else _webhook(row)

    async def all(self) -> list[WebhookRecord]:
        rows = await self._session.execute(select(_WEBHOOKS).order_by(_WEBHOOKS.c.created_at, _WEBHOOKS.c.id))
        return [_webhook(row) for row in rows]

    async def update(self, record: WebhookRecord, *, moves_progress: bool = False) -> None:
        """Writes back an API change; `moves_progress`: it moved the cursor or the retry state, so the
        delivering worker's own writes from before it are refused (new epoch)."""
        values: dict[str, Any] = {
            "url": record.url,
            "description": record.description,
            "event_types": record.event_types,
            "call_types": record.call_types,
            "enabled": record.enabled,
            "state": record.state.value,
            "delivered_position": record.delivered_position,
            "secret": record.sealed_secret,
            "previous_secret": record.sealed_previous_secret,
            "previous_secret_expires_at": record.previous_secret_expires_at,
            "failing_since": record.failing_since,
            "last_error": record.last_error,
            "updated_at": record.updated_at,
            "version": _WEBHOOKS.c.version + 1,
        }
        if moves_progress:
            values["epoch"] = _WEBHOOKS.c.epoch + 1
        await self._session.execute(update(_WEBHOOKS).where(_WEBHOOKS.c.id == record.id).values(**values))

    async def delete(self, webhook_id: str) -> bool:
        await self._session.execute(delete(_DELIVERIES).where(_DELIVERIES.c.webhook_id == webhook_id))
        result = cast(
            "CursorResult[Any]",
            await self._session.execute(delete(_WEBHOOKS).where(_WEBHOOKS.c.id == webhook_id)),
        )
        return bool(result.rowcount)

    async def oldest_held_position(self) -> int | None:
        """The lowest cursor of the enabled endpoints: events after it must be kept for them."""
        return cast(
            "int | None",
            await self._session.scalar(
                select(func.min(_WEBHOOKS.c.delivered_position)).where(_WEBHOOKS.c.enabled.is_(True))
            ),
        )

    # -- the delivery log (the API) --------------------------------------------------------------

    async def deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        conditions = [_DELIVERIES.c.webhook_id == query.webhook_id]
        if query.status is not None:
            conditions.append(_DELIVERIES.c.status == query.status.value)
        if query.call_cid:
            conditions.append(_DELIVERIES.c.call_cid == query.call_cid)
        if query.event_type:
            conditions.append(_DELIVERIES.c.event_type == query.event_type)
        if query.before_position is not None:
            conditions.append(_DELIVERIES.c.position < query.before_position)
        rows = list(
            await self._session.execute(
                select(_DELIVERIES)
                .where(and_(*conditions))
                .order_by(_DELIVERIES.c.position.desc())
                .limit(query.limit + 1)
            )
        )
        page = DeliveryPage([_delivery(row) for row in rows[: query.limit]])
        if len(rows) > query.limit:
            page.next_before = page.deliveries[-1].position
        return page

    async def deliveries_at(self, webhook_id: str, positions: Sequence[int]) -> list[DeliveryRecord]:
        rows = await self._session.execute(
            select(_DELIVERIES).where(
                _DELIVERIES.c.webhook_id == webhook_id, _DELIVERIES.c.position.in_(positions)
            )
        )
        return [_delivery(row) for row in rows]

    async def requeue(self, webhook_id: str, positions: Sequence[int], now: datetime) -> None:
        """Marks deliveries to be sent again now, with a new retry period."""
        await self._session.execute(
            update(_DELIVERIES)
            .where(_DELIVERIES.c.webhook_id == webhook_id, _DELIVERIES.c.position.in_(positions))
            .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now, first_attempt_at=None)
        )

    async def requeue_after(self, webhook_id: str, after_position: int, now: datetime) -> None:
        """Every delivery after `after_position` is to be made again (the cursor moves back to it)."""
        await self._session.execute(
            update(_DELIVERIES)
            .where(_DELIVERIES.c.webhook_id == webhook_id, _DELIVERIES.c.position > after_position)
            .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now, first_attempt_at=None)
        )

    async def retry_failed(self, webhook_id: str, now: datetime) -> None:
        """The deliveries given up on are retried now, with a new retry period (ResumeWebhook)."""
        await self._session.execute(
            update(_DELIVERIES)
            .where(
                _DELIVERIES.c.webhook_id == webhook_id,
                _DELIVERIES.c.status == DeliveryStatus.FAILED.value,
            )
            .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now, first_attempt_at=None)
        )

    async def compact_deliveries(self, older_than: datetime) -> None:
        """Drops log entries of deliveries finished before `older_than` (kept as long as events are)."""
        await self._session.execute(
            delete(_DELIVERIES).where(
                _DELIVERIES.c.status == DeliveryStatus.SUCCEEDED.value,
                _DELIVERIES.c.last_attempt_at < older_than,
            )
        )

    # -- leases and progress (the delivering replica) --------------------------------------------

    async def hold(self, me: str, now: float, until: float, *, claim: bool) -> list[Lease]:
        """Renews this replica's leases and (with `claim`) takes every deliverable endpoint nobody holds
        or whose holder's lease ran out; returns what this replica now holds."""
        await self._session.execute(
            update(_WEBHOOKS).where(_WEBHOOKS.c.claimed_by == me).values(claimed_until=until)
        )
        if claim:
            await self._session.execute(
                update(_WEBHOOKS)
                .where(
                    _WEBHOOKS.c.enabled.is_(True),
                    _WEBHOOKS.c.state == WebhookState.ACTIVE.value,
                    or_(_WEBHOOKS.c.claimed_by.is_(None), _WEBHOOKS.c.claimed_until < now),
                )
                .values(claimed_by=me, claimed_until=until)
            )
        rows = await self._session.execute(
            select(_WEBHOOKS.c.id, _WEBHOOKS.c.version, _WEBHOOKS.c.epoch).where(
                _WEBHOOKS.c.claimed_by == me,
                _WEBHOOKS.c.enabled.is_(True),
                _WEBHOOKS.c.state == WebhookState.ACTIVE.value,
            )
        )
        return [Lease(row.id, row.version, row.epoch) for row in rows]

    async def unclaimed(self, me: str, now: float) -> tuple[list[Lease], bool]:
        """What this replica holds, and whether a deliverable endpoint waits to be claimed (a read: an
        SQLite database's only process renews nothing, and writes only to claim)."""
        rows = await self._session.execute(
            select(
                _WEBHOOKS.c.id,
                _WEBHOOKS.c.version,
                _WEBHOOKS.c.epoch,
                _WEBHOOKS.c.claimed_by,
                _WEBHOOKS.c.claimed_until,
            ).where(_WEBHOOKS.c.enabled.is_(True), _WEBHOOKS.c.state == WebhookState.ACTIVE.value)
        )
        mine: list[Lease] = []
        waiting = False
        for row in rows:
            if row.claimed_by == me:
                mine.append(Lease(row.id, row.version, row.epoch))
            elif row.claimed_by is None or (row.claimed_until or 0.0) < now:
                waiting = True
        return mine, waiting

    async def release(self, me: str, webhook_ids: Sequence[str] | None = None) -> None:
        """Gives up leases (all of this replica's when `webhook_ids` is None; every replica's when `me`
        is empty: an SQLite database's only process starting again)."""
        conditions = []
        if me:
            conditions.append(_WEBHOOKS.c.claimed_by == me)
        if webhook_ids is not None:
            conditions.append(_WEBHOOKS.c.id.in_(webhook_ids))
        await self._session.execute(
            update(_WEBHOOKS).where(and_(True, *conditions)).values(claimed_by=None, claimed_until=None)
        )

    async def progress(self, webhook_id: str) -> Progress | None:
        webhook = await self.get(webhook_id)
        if webhook is None:
            return None
        rows = await self._session.execute(
            select(_DELIVERIES).where(
                _DELIVERIES.c.webhook_id == webhook_id,
                or_(
                    _DELIVERIES.c.position > webhook.delivered_position,
                    _DELIVERIES.c.status == DeliveryStatus.PENDING.value,
                ),
            )
        )
        ahead: list[DeliveryRecord] = []
        requeued: list[DeliveryRecord] = []
        for row in rows:
            record = _delivery(row)
            (ahead if record.position > webhook.delivered_position else requeued).append(record)
        return Progress(webhook, ahead, requeued)

    async def record(
        self,
        me: str,
        webhook_id: str,
        epoch: int,
        deliveries: Sequence[DeliveryRecord],
        delivered_position: int | None,
        *,
        failing: tuple[datetime, str] | None = None,
        last_error: str | None = None,
    ) -> bool:
        """Writes a worker's results: delivery log entries, the cursor moved forward, the endpoint
        FAILING. Refused (False, nothing written) unless this replica still holds the endpoint in the
        same epoch: a replica that lost its lease, or whose endpoint was redelivered or resumed, must
        not write over what came after."""
        values: dict[str, Any] = {}
        if delivered_position is not None:
            # Only forward (GREATEST on PostgreSQL, max() on SQLite: spelled as a CASE for both).
            values["delivered_position"] = case(
                (_WEBHOOKS.c.delivered_position < delivered_position, delivered_position),
                else_=_WEBHOOKS.c.delivered_position,
            )
        if failing is not None:
            values.update(state=WebhookState.FAILING.value, failing_since=failing[0], last_error=failing[1])
        elif last_error is not None:
            values["last_error"] = last_error
        if not values:
            values["epoch"] = _WEBHOOKS.c.epoch  # a no-op update that still checks the fence
        fenced = cast(
            "CursorResult[Any]",
            await self._session.execute(
                update(_WEBHOOKS)
                .where(_WEBHOOKS.c.id == webhook_id, _WEBHOOKS.c.claimed_by == me, _WEBHOOKS.c.epoch == epoch)
                .values(**values)
            ),
        )
        if not fenced.rowcount:
            return False
        if deliveries:
            await self._upsert([_delivery_values(record) for record in deliveries])
        return True

    async def _upsert(self, rows: list[dict[str, Any]]) -> None:
        # One prebuilt statement per dialect, executed with many parameter sets: compiled once and cached
        # (a multi-row VALUES built per call has no cache key and was compiled on every flush).
        await self._session.execute(_UPSERTS[self._session.get_bind().dialect.name], rows)


def _upsert_statement(insert: Any) -> Any:
    statement = insert(_DELIVERIES)
    return statement.on_conflict_do_update(
        index_elements=[_DELIVERIES.c.webhook_id, _DELIVERIES.c.position],
        set_={name: statement.excluded[name] for name in _UPDATED_BY_RECORD},
    )


_UPSERTS = {"postgresql": _upsert_statement(postgresql.insert), "sqlite": _upsert_statement(sqlite.insert)}
