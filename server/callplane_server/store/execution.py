"""Running prebuilt Core statements on a unit of work's connection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Executable, Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


class Statements:
    """Executes Core statements on the transaction's connection. Through the ORM session every statement
    resolves its connection again and passes the ORM's execution layer; the hot paths' statements are
    Core, built once with bound parameters, and need neither."""

    __slots__ = ("_connection", "_session")

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._connection: AsyncConnection | None = None

    async def execute(
        self, statement: Executable, parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
    ) -> Result[Any]:
        if self._connection is None:
            self._connection = await self._session.connection()
        return await self._connection.execute(statement, parameters)
