"""The store facade the services use: transactions that hand out repositories."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.database import Database
from callplane_server.store.query import CursorSigner
from callplane_server.store.repositories import (
    CallRepository,
    CallTypeRepository,
    MemberRepository,
    SecretRepository,
    UserRepository,
)

T = TypeVar("T")


class Transaction:
    """One unit of work: every repository shares the same session and so the same transaction."""

    def __init__(self, session: AsyncSession, signer: CursorSigner) -> None:
        self.call_types = CallTypeRepository(session)
        self.users = UserRepository(session, signer)
        self.calls = CallRepository(session, signer)
        self.members = MemberRepository(session, signer, self.users)
        self.secrets = SecretRepository(session)


class Store:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._signer: CursorSigner | None = None

    @classmethod
    async def open(cls, database_url: str, *, migrate: bool = True) -> Store:
        store = cls(Database(database_url))
        if migrate:
            await store.database.migrate()
        secret = await store.database.run(
            lambda session: SecretRepository(session).get_or_create("cursor_signing_key"), write=True
        )
        store._signer = CursorSigner(secret.encode())
        return store

    async def close(self) -> None:
        await self.database.dispose()

    @property
    def signer(self) -> CursorSigner:
        if self._signer is None:
            raise RuntimeError("store not opened")
        return self._signer

    async def read(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        return await self.database.run(lambda session: work(Transaction(session, self.signer)), write=False)

    async def write(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """Runs `work` in a write transaction; it may be retried whole on a transient conflict."""
        return await self.database.run(lambda session: work(Transaction(session, self.signer)), write=True)
