"""Store-level fixtures: one fresh database per backend and test module, schema from the models."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from callplane_server.store.database import normalize_url
from callplane_server.store.models import Base
from tests.support import fresh_database


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AsyncEngine]:
    async with fresh_database(backend, tmp_path_factory.mktemp(f"store-{backend}")) as url:
        created = create_async_engine(normalize_url(url))
        async with created.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            yield created
        finally:
            await created.dispose()


@pytest.fixture(scope="module")
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@pytest_asyncio.fixture(loop_scope="module")
async def session(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with sessions() as opened:
        yield opened
