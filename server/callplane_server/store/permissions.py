"""Per-user capability overrides in a call."""

from __future__ import annotations

from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.execution import Statements
from callplane_server.store.models import PermissionOverrideRow

_OVERRIDES = PermissionOverrideRow.__table__
_OVERRIDE = select(_OVERRIDES.c.granted, _OVERRIDES.c.revoked).where(
    _OVERRIDES.c.call_cid == bindparam("cid"), _OVERRIDES.c.user_id == bindparam("user_id")
)


class PermissionRepository:
    def __init__(self, session: AsyncSession, statements: Statements) -> None:
        self._session = session
        self._statements = statements

    async def get(self, call_cid: str, user_id: str) -> tuple[list[str], list[str]]:
        """(granted, revoked) for the user in the call."""
        row = (await self._statements.execute(_OVERRIDE, {"cid": call_cid, "user_id": user_id})).first()
        return (list(row.granted), list(row.revoked)) if row else ([], [])

    async def for_user(self, user_id: str, call_cids: list[str]) -> dict[str, tuple[list[str], list[str]]]:
        """cid → (granted, revoked) for the user, over many calls at once."""
        if not call_cids:
            return {}
        rows = await self._session.scalars(
            select(PermissionOverrideRow).where(
                PermissionOverrideRow.user_id == user_id, PermissionOverrideRow.call_cid.in_(call_cids)
            )
        )
        return {row.call_cid: (list(row.granted), list(row.revoked)) for row in rows}

    async def save(self, call_cid: str, user_id: str, granted: list[str], revoked: list[str]) -> None:
        row = await self._session.get(PermissionOverrideRow, (call_cid, user_id))
        if row is None:
            self._session.add(
                PermissionOverrideRow(call_cid=call_cid, user_id=user_id, granted=granted, revoked=revoked)
            )
        else:
            row.granted, row.revoked = granted, revoked
        await self._session.flush()

    async def forget_call(self, call_cid: str) -> None:
        await self._session.execute(
            delete(PermissionOverrideRow).where(PermissionOverrideRow.call_cid == call_cid)
        )

    async def users_with(self, call_cid: str) -> list[str]:
        return list(
            await self._session.scalars(
                select(PermissionOverrideRow.user_id).where(PermissionOverrideRow.call_cid == call_cid)
            )
        )
