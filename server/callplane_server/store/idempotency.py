"""Idempotency keys: `(call_cid, request_id)` → the first result of a request, written in the same
transaction as the change it made. A concurrent retry that races the first attempt loses on the primary
key; the store retries its whole transaction, which then finds the winner's row."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.execution import Statements
from callplane_server.store.models import IdempotencyKeyRow

_KEYS = cast(Table, IdempotencyKeyRow.__table__)
_RESULT = select(_KEYS.c.result).where(
    _KEYS.c.call_cid == bindparam("cid"), _KEYS.c.request_id == bindparam("request_id")
)
_INSERT = _KEYS.insert()


class IdempotencyRepository:
    def __init__(self, session: AsyncSession, statements: Statements) -> None:
        self._session = session
        self._statements = statements

    async def get(self, call_cid: str, request_id: str) -> dict[str, Any] | None:
        """The stored result of an earlier request with this key, or None."""
        found = await self._statements.execute(_RESULT, {"cid": call_cid, "request_id": request_id})
        result = found.scalar()
        return dict(result) if result is not None else None

    async def insert(
        self, call_cid: str, request_id: str, result: dict[str, Any], created_at: datetime
    ) -> None:
        """Records the key; a concurrent insert of the same key raises a unique violation (retryable)."""
        await self._statements.execute(
            _INSERT,
            {"call_cid": call_cid, "request_id": request_id, "result": result, "created_at": created_at},
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
