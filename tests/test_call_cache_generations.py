"""The call cache keeps a read that raced only writes of other calls (so a steady flow of writes does not
turn every read of an unchanged call into a database read), and never one that raced a change of its call
or a change that may concern any call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest_asyncio

from callplane_server.domain.records import CallRecord
from callplane_server.services.call_cache import CachedCall, CallCache
from callplane_server.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite:///{tmp_path / 'cache.db'}")
    try:
        yield opened
    finally:
        await opened.close()


def entry(call_id: str) -> CachedCall:
    record = CallRecord("default", call_id, None, None, {}, {}, False, False, 0, 1, 0, NOW, NOW)
    return CachedCall(record, {}, [])


def changed(store: Store, cids: frozenset[str] | None) -> None:
    """What the store tells its listeners when a write (of these calls; None: of anything) commits."""
    for listener in store.change_listeners:
        listener(cids)


async def test_a_write_of_another_call_does_not_keep_a_read_from_filling(store: Store) -> None:
    cache = CallCache(store)
    read_at = cache.generation
    changed(store, frozenset({"default:b"}))
    cache.put("default:a", entry("a"), read_at)
    assert cache.held("default:a") is not None


async def test_a_write_of_the_call_keeps_a_read_that_raced_it_out(store: Store) -> None:
    cache = CallCache(store)
    read_at = cache.generation
    changed(store, frozenset({"default:a", "default:b"}))
    cache.put("default:a", entry("a"), read_at)
    assert cache.held("default:a") is None
    # A read that began after the change fills it.
    cache.put("default:a", entry("a"), cache.generation)
    assert cache.held("default:a") is not None


async def test_a_change_of_anything_keeps_every_raced_read_out(store: Store) -> None:
    cache = CallCache(store)
    read_at = cache.generation
    changed(store, None)
    changed(store, frozenset({"default:b"}))
    cache.put("default:a", entry("a"), read_at)
    assert cache.held("default:a") is None


async def test_a_forgotten_change_still_keeps_raced_reads_out(store: Store) -> None:
    cache = CallCache(store)
    read_at = cache.generation
    changed(store, frozenset({"default:a"}))
    for i in range(CallCache.RECENT_CHANGES):  # pushes the change of a out of the recent ones
        changed(store, frozenset({f"default:other-{i}"}))
    cache.put("default:a", entry("a"), read_at)
    assert cache.held("default:a") is None
