"""Idempotency keys: `(call_cid, request_id)` → the first result of a request, written in the same
transaction as the change it made. A concurrent retry that races the first attempt loses on the primary
key; the store retries its whole transaction, which then finds the winner's row."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.models import IdempotencyKeyRow


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, call_cid: str, request_id: str) -> dict[str, Any] | None:
        """The stored result of an earlier request with this key, or None."""
        result = await self._session.scalar(
            select(IdempotencyKeyRow.result).where(
                IdempotencyKeyRow.call_cid == call_cid, IdempotencyKeyRow.request_id == request_id
            )
        )
        return dict(result) if result is not None else None

    async def insert(
        self, call_cid: str, request_id: str, result: dict[str, Any], created_at: datetime
    ) -> None:
        """Records the key; a concurrent insert of the same key raises a unique violation (retryable)."""
        await self._session.execute(
            insert(IdempotencyKeyRow).values(
                call_cid=call_cid, request_id=request_id, result=result, created_at=created_at
            )
        )

    async def forget_call(self, call_cid: str) -> None:
        """Drops a call's keys (for a hard delete: a recreated call starts with none)."""
        await self._session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.call_cid == call_cid))

    async def compact(self, older_than: datetime) -> int:
        """Drops keys created before `older_than`; returns how many."""
        # A DELETE's result is a CursorResult (with rowcount); Session.execute is typed to return Result.
        result = cast(
            "CursorResult[Any]",
            await self._session.execute(
                delete(IdempotencyKeyRow).where(IdempotencyKeyRow.created_at < older_than)
            ),
        )
        return int(result.rowcount or 0)
