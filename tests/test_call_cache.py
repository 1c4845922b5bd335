"""The call cache's freshness checks on the real store: requests asking in one turn of the event loop
share one statement, an entry survives only while its call and the directory are unchanged, and a
trusted cache (the embedded database's sole writer) needs no statement at all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from callplane.v1 import call_service_pb2, user_pb2
from callplane_server.domain.records import CallStamp
from callplane_server.services.call_cache import CachedCall, CallCache
from callplane_server.store import Store
from tests.support import RunningServer, struct


async def _cache_of(server: RunningServer, call_ids: list[str]) -> tuple[CallCache, list[list[str]]]:
    """A cache over the server's store holding each call's current state, and the list of cids each
    freshness check asked for (filled as checks run)."""
    store = server.server.store
    assert store is not None
    checks: list[list[str]] = []
    original = store.call_stamps

    async def counted(cids: Sequence[str]) -> dict[str, CallStamp]:
        checks.append(sorted(cids))
        return await original(cids)

    store.call_stamps = counted  # type: ignore[method-assign]
    cache = CallCache(store)
    for call_id in call_ids:
        cid = f"default:{call_id}"
        record, directory = await store.read(lambda tx, cid=cid: tx.calls.get_stamped(cid))
        assert record is not None
        cache._keep(cid, CachedCall(record, {}, [], directory=directory))
    return cache, checks


def _restore(store: Store | None, cache: CallCache) -> None:
    assert store is not None
    store.__dict__.pop("call_stamps", None)
    store.change_listeners.remove(cache._changed)


async def test_checks_asked_together_share_one_statement(server: RunningServer, calls) -> None:
    ids = [f"batched-{n}" for n in range(10)]
    for call_id in ids:
        await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
    cache, checks = await _cache_of(server, ids)
    try:
        found = await asyncio.gather(*(cache.current(f"default:{call_id}") for call_id in ids))
        assert all(entry is not None for entry in found)
        if server.backend == "sqlite":
            assert checks == []  # trusted: the store tells the cache of every change
            return
        assert checks == [sorted(f"default:{call_id}" for call_id in ids)]

        # A change to one call: only its entry goes.
        await calls.UpdateCall(
            call_service_pb2.UpdateCallRequest(type="default", id=ids[0], set_custom=struct({"n": 1}))
        )
        found = await asyncio.gather(*(cache.current(f"default:{call_id}") for call_id in ids))
        assert found[0] is None and all(entry is not None for entry in found[1:])
        assert len(checks) == 2
    finally:
        _restore(server.server.store, cache)


async def test_a_directory_change_makes_every_entry_stale(server: RunningServer, calls, users) -> None:
    ids = [f"directory-{n}" for n in range(3)]
    for call_id in ids:
        await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type="default", id=call_id))
    cache, _checks = await _cache_of(server, ids)
    try:
        await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id="renamed")]))
        found = await asyncio.gather(*(cache.current(f"default:{call_id}") for call_id in ids))
        # Validated, the check finds the directory moved on; trusted, the store told the cache.
        assert found == [None, None, None]
    finally:
        _restore(server.server.store, cache)


async def test_a_missing_call_has_no_stamp(server: RunningServer) -> None:
    store = server.server.store
    assert store is not None
    assert await store.call_stamps(["default:never-created"]) == {}
