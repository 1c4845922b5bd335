"""Webhook endpoints: who may manage them, what a valid one is, and their secrets, cursor and state."""

from __future__ import annotations

import base64
import binascii
import builtins
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TypeVar

from callplane_server.domain.webhooks import (
    DEFAULT_SECRET_OVERLAP,
    MAX_SECRET_OVERLAP,
    DeliveryPage,
    DeliveryQuery,
    WebhookRecord,
    WebhookState,
    check_description,
    check_filters,
)
from callplane_server.errors import FailedPrecondition, InvalidArgument, NotFound, ViolationCollector
from callplane_server.services.authz import load_caller, require_admin
from callplane_server.services.clock import Clock
from callplane_server.store import Store, Transaction
from callplane_server.webhooks.delivery import WebhookDispatcher
from callplane_server.webhooks.signing import SecretBox, new_secret
from callplane_server.webhooks.targets import PrivateTarget, check_url, refuse_private

T = TypeVar("T")

MAX_PAGE = 100
DEFAULT_PAGE = 25
MAX_REDELIVER_POSITIONS = 100


@dataclass(frozen=True)
class WebhookInput:
    url: str
    event_types: list[str]
    call_types: list[str]
    description: str
    enabled: bool


@dataclass(frozen=True)
class WebhookPatch:
    """Fields to change (None: keep)."""

    url: str | None = None
    event_types: list[str] | None = None
    call_types: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None


def webhook_not_found(webhook_id: str) -> NotFound:
    return NotFound(
        f"webhook {webhook_id!r} does not exist", reason="WEBHOOK_NOT_FOUND", metadata={"id": webhook_id}
    )


def encode_page_token(before_position: int | None) -> str:
    return "" if before_position is None else base64.urlsafe_b64encode(str(before_position).encode()).decode()


def decode_page_token(token: str) -> int | None:
    if not token:
        return None
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.for_field("next", "not a page token this server returned") from None


class WebhookService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        box: SecretBox,
        dispatcher: WebhookDispatcher | None,
        *,
        allow_private: bool = False,
    ) -> None:
        self._store = store
        self._clock = clock
        self._box = box
        self._dispatcher = dispatcher
        self._allow_private = allow_private

    async def _check_target(self, url: str, field: str, problems: ViolationCollector) -> None:
        host = check_url(url, field, problems)
        if host is None or self._allow_private:
            return
        try:
            await refuse_private(host)
        except PrivateTarget as refusal:
            problems.add(field, f"{refusal}: webhooks go to public addresses only (--webhook-allow-private)")

    def _changed(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.refresh()

    async def create(self, spec: WebhookInput) -> tuple[WebhookRecord, str]:
        problems = ViolationCollector()
        await self._check_target(spec.url, "url", problems)
        check_filters(spec.event_types, spec.call_types, "", problems)
        check_description(spec.description, "description", problems)
        problems.raise_if_any()
        secret = new_secret()
        now = self._clock()
        webhook_id = f"wh_{uuid.uuid4().hex}"
        record = WebhookRecord(
            id=webhook_id,
            url=spec.url,
            description=spec.description,
            event_types=list(spec.event_types),
            call_types=list(spec.call_types),
            enabled=spec.enabled,
            state=WebhookState.ACTIVE,
            delivered_position=0,
            created_at=now,
            updated_at=now,
            sealed_secret=self._box.seal(webhook_id, secret),
        )

        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "CreateWebhook")
            # Starts from now: the events committed before it are not its business.
            record.delivered_position = await tx.events.last_position()
            await tx.webhooks.insert(record)
            return record

        return await self._write(work), secret

    async def get(self, webhook_id: str) -> WebhookRecord:
        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "GetWebhook")
            return await _existing(tx, webhook_id)

        return await self._store.read(work)

    async def list(self) -> builtins.list[WebhookRecord]:
        async def work(tx: Transaction) -> list[WebhookRecord]:
            require_admin(await load_caller(tx), "ListWebhooks")
            return await tx.webhooks.all()

        return await self._store.read(work)

    async def update(self, webhook_id: str, patch: WebhookPatch) -> WebhookRecord:
        problems = ViolationCollector()
        if patch.url is not None:
            await self._check_target(patch.url, "url", problems)
        check_filters(patch.event_types or [], patch.call_types or [], ".values", problems)
        if patch.description is not None:
            check_description(patch.description, "description", problems)
        problems.raise_if_any()

        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "UpdateWebhook")
            record = await _existing(tx, webhook_id, for_update=True)
            if patch.url is not None:
                record.url = patch.url
            if patch.event_types is not None:
                record.event_types = list(patch.event_types)
            if patch.call_types is not None:
                record.call_types = list(patch.call_types)
            if patch.description is not None:
                record.description = patch.description
            if patch.enabled is not None:
                record.enabled = patch.enabled
            record.updated_at = self._clock()
            await tx.webhooks.update(record)
            return record

        return await self._write(work)

    async def delete(self, webhook_id: str) -> None:
        async def work(tx: Transaction) -> None:
            require_admin(await load_caller(tx), "DeleteWebhook")
            if not await tx.webhooks.delete(webhook_id):
                raise webhook_not_found(webhook_id)

        await self._write(work)

    async def rotate_secret(self, webhook_id: str, overlap: timedelta | None) -> tuple[WebhookRecord, str]:
        overlap = DEFAULT_SECRET_OVERLAP if overlap is None else overlap
        if not timedelta(0) <= overlap <= MAX_SECRET_OVERLAP:
            raise InvalidArgument.for_field(
                "overlap", f"must be between 0 and {MAX_SECRET_OVERLAP.days} days, got {overlap}"
            )
        secret = new_secret()

        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "RotateWebhookSecret")
            record = await _existing(tx, webhook_id, for_update=True)
            now = self._clock()
            if overlap > timedelta(0):
                record.sealed_previous_secret = record.sealed_secret
                record.previous_secret_expires_at = now + overlap
            else:
                record.sealed_previous_secret = None
                record.previous_secret_expires_at = None
            record.sealed_secret = self._box.seal(webhook_id, secret)
            record.updated_at = now
            await tx.webhooks.update(record)
            return record

        return await self._write(work), secret

    async def resume(self, webhook_id: str) -> WebhookRecord:
        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "ResumeWebhook")
            record = await _existing(tx, webhook_id, for_update=True)
            if record.state is not WebhookState.FAILING:
                raise FailedPrecondition(
                    f"webhook {webhook_id!r} is not FAILING",
                    reason="WEBHOOK_NOT_FAILING",
                    metadata={"id": webhook_id, "state": record.state.value},
                )
            now = self._clock()
            await tx.webhooks.retry_failed(webhook_id, now)
            record.state = WebhookState.ACTIVE
            record.failing_since = None
            record.updated_at = now
            await tx.webhooks.update(record, moves_progress=True)
            return record

        return await self._write(work)

    async def deliveries(self, query: DeliveryQuery) -> DeliveryPage:
        problems = ViolationCollector()
        if query.limit < 0 or query.limit > MAX_PAGE:
            problems.add("limit", f"must be 0..{MAX_PAGE}, got {query.limit}")
        problems.raise_if_any()
        if query.limit == 0:
            query = replace(query, limit=DEFAULT_PAGE)

        async def work(tx: Transaction) -> DeliveryPage:
            require_admin(await load_caller(tx), "ListWebhookDeliveries")
            await _existing(tx, query.webhook_id)
            return await tx.webhooks.deliveries(query)

        return await self._store.read(work)

    async def redeliver_after(self, webhook_id: str, after_position: int) -> WebhookRecord:
        async def work(tx: Transaction) -> WebhookRecord:
            require_admin(await load_caller(tx), "RedeliverWebhook")
            record = await _existing(tx, webhook_id, for_update=True)
            earliest, last = await tx.events.position_bounds()
            if after_position > last:
                raise InvalidArgument.for_field(
                    "after_position",
                    f"position {after_position} is after the last event ({last})",
                    reason="POSITION_IN_FUTURE",
                )
            if after_position < earliest - 1:
                raise FailedPrecondition(
                    f"events after position {after_position} are no longer retained "
                    f"(the earliest is {earliest})",
                    reason="EVENTS_COMPACTED",
                    metadata={"earliest_position": earliest},
                )
            now = self._clock()
            await tx.webhooks.requeue_after(webhook_id, after_position, now)
            record.delivered_position = min(record.delivered_position, after_position)
            record.updated_at = now
            await tx.webhooks.update(record, moves_progress=True)
            return record

        return await self._write(work)

    async def redeliver(self, webhook_id: str, positions: Sequence[int]) -> tuple[WebhookRecord, int]:
        if not positions or len(positions) > MAX_REDELIVER_POSITIONS:
            raise InvalidArgument.for_field(
                "positions.positions", f"give 1..{MAX_REDELIVER_POSITIONS} positions, got {len(positions)}"
            )
        wanted = sorted(set(positions))

        async def work(tx: Transaction) -> tuple[WebhookRecord, int]:
            require_admin(await load_caller(tx), "RedeliverWebhook")
            record = await _existing(tx, webhook_id, for_update=True)
            found = {d.position for d in await tx.webhooks.deliveries_at(webhook_id, wanted)}
            missing = [p for p in wanted if p not in found]
            if missing:
                raise NotFound(
                    f"webhook {webhook_id!r} has no delivery of position(s) "
                    f"{', '.join(map(str, missing[:10]))}",
                    reason="WEBHOOK_DELIVERY_NOT_FOUND",
                    metadata={"id": webhook_id, "positions": ",".join(map(str, missing))},
                )
            now = self._clock()
            await tx.webhooks.requeue(webhook_id, wanted, now)
            record.updated_at = now
            await tx.webhooks.update(record, moves_progress=True)
            return record, len(wanted)

        return await self._write(work)

    async def _write(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """Every change to endpoints: it touches no call (the call cache stays), and the delivering
        workers look at it at once."""
        result = await self._store.write(work, touches_calls=False)
        self._changed()
        return result


async def _existing(tx: Transaction, webhook_id: str, *, for_update: bool = False) -> WebhookRecord:
    record = await tx.webhooks.get(webhook_id, for_update=for_update)
    if record is None:
        raise webhook_not_found(webhook_id)
    return record
