"""Recently read calls, so that a read of a call that has not changed since costs no queries.

Trusted only when the store is the database's sole writer (an embedded SQLite file this process holds
the lock of): then every change is a commit of this process, and the store tells the cache which calls
it changed before the change is acknowledged, so no read after an acknowledged write sees the old call.
A read that raced a write does not fill the cache (the generation moved on while it read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callplane_server.auth.tokens import Principal
from callplane_server.domain.records import CallRecord, MemberRecord, Page
from callplane_server.store import Store


@dataclass
class CachedCall:
    call: CallRecord
    settings: dict[str, Any]
    # The first members, oldest first, as many as a read may ask for.
    members: list[MemberRecord]
    # What each principal that read the call may do in it (only principals that may read it).
    capabilities: dict[Principal, frozenset[str]] = field(default_factory=dict)
    # QueryMembers pages of this state, by request (filter, sort, limit, cursor); a few per call.
    member_pages: dict[Any, Page[MemberRecord]] = field(default_factory=dict)

    MAX_MEMBER_PAGES = 16

    def keep_member_page(self, key: Any, page: Page[MemberRecord]) -> None:
        if key not in self.member_pages and len(self.member_pages) >= self.MAX_MEMBER_PAGES:
            del self.member_pages[next(iter(self.member_pages))]
        self.member_pages[key] = page


class CallCache:
    def __init__(self, store: Store, capacity: int = 10_000) -> None:
        self.enabled = store.sole_writer
        self._capacity = capacity
        self._entries: dict[str, CachedCall] = {}
        self.generation = 0
        store.change_listeners.append(self._changed)

    def get(self, cid: str) -> CachedCall | None:
        return self._entries.get(cid) if self.enabled else None

    def put(self, cid: str, entry: CachedCall, read_at_generation: int) -> None:
        """Keeps `entry` unless anything changed since the read that made it began."""
        if read_at_generation == self.generation:
            self._keep(cid, entry)

    def put_committed(self, cid: str, entry: CachedCall) -> None:
        """Keeps the state a write of this process read under its lock and committed. Safe without the
        generation check: a write that committed in the same group and changed the call after it
        invalidates the entry before it is acknowledged, and its acknowledgement comes after this (the
        group's writers resume in order)."""
        self._keep(cid, entry)

    def _keep(self, cid: str, entry: CachedCall) -> None:
        if not self.enabled:
            return
        if cid not in self._entries and len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[cid] = entry

    def _changed(self, cids: frozenset[str] | None) -> None:
        if cids is not None and not cids:
            return  # a write that changed nothing (a no-op update)
        self.generation += 1
        if cids is None:
            self._entries.clear()
            return
        for cid in cids:
            self._entries.pop(cid, None)
