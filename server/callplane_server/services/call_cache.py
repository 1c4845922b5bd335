"""Recently read calls, so that a read of a call that has not changed since costs at most one statement.

Two modes, by who else may change the database:

- **Trusted** (the store is the database's sole writer: an embedded SQLite file this process holds the
  lock of): every change is a commit of this process, and the store tells the cache which calls it
  changed before the change is acknowledged, so an entry is used with no statement at all. A read that
  raced a write of the same call (or a write that may have changed anything) does not fill the cache;
  writes of other calls do not keep it from filling, so a steady flow of writes does not turn every
  read of an unchanged call into a database read.
- **Validated** (PostgreSQL, where other replicas write too): an entry is used only after one statement
  shows it is current: the call's stamp as committed now (CallStamp: its last_seq, which every change to
  a call, its members or their permissions bumps, its creation instant, and the directory version, which
  every change to users or call types bumps), equal to the one the entry was read at. The statement
  runs after the request arrived, so a change acknowledged by any replica before it is seen
  (read-your-writes across replicas). An entry's parts are read stamp first, so a part can only be
  newer than its stamp, never older: a race costs a miss.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any

from callplane_server.auth.context import current_principal
from callplane_server.auth.tokens import Principal
from callplane_server.domain.caller import Caller
from callplane_server.domain.records import CallRecord, CallStamp, CallTypeRecord, MemberRecord, Page
from callplane_server.services.authz import load_caller
from callplane_server.store import Store, Transaction


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
    # The directory version read before the rest of the entry (validated mode).
    directory: int = 0

    MAX_MEMBER_PAGES = 16

    def keep_member_page(self, key: Any, page: Page[MemberRecord]) -> None:
        if key not in self.member_pages and len(self.member_pages) >= self.MAX_MEMBER_PAGES:
            del self.member_pages[next(iter(self.member_pages))]
        self.member_pages[key] = page

    @property
    def stamp(self) -> CallStamp:
        return CallStamp(self.call.last_seq, self.call.created_at, self.directory)


class CallCache:
    def __init__(self, store: Store, capacity: int = 10_000) -> None:
        self._store = store
        # Entries need no check when every change to the database is this process's own.
        self.trusted = store.sole_writer
        self._capacity = capacity
        self._entries: dict[str, CachedCall] = {}
        self.generation = 0
        # Calls whose stamps were asked for since the next check was scheduled (validated mode).
        self._wanted: dict[str, asyncio.Future[CallStamp | None]] = {}
        self._wanted_by = contextvars.Context()
        self._checking: asyncio.Task[None] | None = None
        # The call types and callers of the newest directory version seen (see `directory`).
        self._directory_changes = 0
        self._directory_version = -1
        self._types: dict[str, CallTypeRecord] | None = None
        self._callers: dict[Principal, Caller] = {}
        # The generation of each recent change, by call (oldest first, at most RECENT_CHANGES), and the
        # generation below which a read may have missed a change no longer remembered (or one to any call).
        self._changed_at: dict[str, int] = {}
        self._floor = 0
        store.change_listeners.append(self._changed)

    RECENT_CHANGES = 4096

    def unchanged_since(self, cid: str, generation: int) -> bool:
        """True if no change that may concern `cid` was recorded since `self.generation` was `generation`."""
        return generation >= self._floor and self._changed_at.get(cid, -1) <= generation

    async def current(self, cid: str) -> CachedCall | None:
        """The entry of the call if it is its current state (checked with one statement unless trusted)."""
        entry = self._entries.get(cid)
        if entry is None or self.trusted:
            return entry
        if await self._stamp(cid) == entry.stamp:
            return entry
        if self._entries.get(cid) is entry:
            del self._entries[cid]
        return None

    async def _stamp(self, cid: str) -> CallStamp | None:
        """The call's stamp as committed after this request arrived. Checks are grouped, as commits are in
        group commit: while one check runs, the requests that arrive wait for the next, which then reads
        the stamps of all their calls in one statement. Each statement is sent after every request it
        serves asked, so it sees every change acknowledged before any of them arrived."""
        wanted = self._wanted.get(cid)
        if wanted is None:
            if not self._wanted:
                # The request that asks first pays for the statement (it runs in its context).
                self._wanted_by = contextvars.copy_context()
                if self._checking is None:
                    asyncio.get_running_loop().call_soon(self._check_wanted)
            wanted = self._wanted[cid] = asyncio.get_running_loop().create_future()
        # Shielded: the check is shared; one request giving up must not cancel it for the others.
        return await asyncio.shield(wanted)

    def _check_wanted(self) -> None:
        wanted, self._wanted = self._wanted, {}
        if wanted:
            self._checking = asyncio.get_running_loop().create_task(
                self._check(wanted), context=self._wanted_by
            )

    async def _check(self, wanted: dict[str, asyncio.Future[CallStamp | None]]) -> None:
        try:
            cids = list(wanted)
            stamps: dict[str, CallStamp] = {}
            for start in range(0, len(cids), self.MAX_CHECKED):
                stamps.update(await self._store.call_stamps(cids[start : start + self.MAX_CHECKED]))
        except Exception as error:
            for future in wanted.values():
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # retrieved here: every waiter may have given up
        else:
            for cid, future in wanted.items():
                if not future.done():
                    future.set_result(stamps.get(cid))
        finally:
            self._checking = None
            self._check_wanted()  # those that asked meanwhile

    MAX_CHECKED = 500

    def held(self, cid: str) -> CachedCall | None:
        """The entry of the call without checking it: only when trusted (else None)."""
        return self._entries.get(cid) if self.trusted else None

    def matching(self, cid: str, stamp: CallStamp) -> CachedCall | None:
        """The entry for exactly this state of the call, whose stamp the caller read in its transaction
        (so no further check is needed). Trusted, the directory part is not compared: the store tells the
        cache of every change."""
        entry = self._entries.get(cid)
        if entry is None:
            return None
        if entry.stamp[:2] != stamp[:2] or (not self.trusted and entry.directory != stamp.directory):
            return None
        return entry

    def put(self, cid: str, entry: CachedCall, read_at_generation: int) -> None:
        """Keeps `entry` unless the call (or anything) changed since the read that made it began."""
        if self.unchanged_since(cid, read_at_generation):
            self._keep(cid, entry)

    def put_committed(self, cid: str, entry: CachedCall) -> None:
        """Keeps the state a write of this process read under its lock and committed. Safe without the
        generation check: a write that committed in the same group and changed the call after it
        invalidates the entry before it is acknowledged, and its acknowledgement comes after this (the
        group's writers resume in order). Trusted mode only: a write does not read the directory."""
        if self.trusted:
            self._keep(cid, entry)

    def _keep(self, cid: str, entry: CachedCall) -> None:
        if cid not in self._entries and len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[cid] = entry

    # -- the directory (users, call types) as queries see it -----------------------------------------

    async def directory(self, tx: Transaction) -> int:
        """The directory's version for a read, taken first in its transaction (see the module docstring):
        validated, the database's directory version; trusted, the count of this process's changes that
        may have touched users or call types."""
        return self._directory_changes if self.trusted else await tx.directory.version()

    async def call_types(self, tx: Transaction, version: int) -> dict[str, CallTypeRecord]:
        """Every call type by name, as of directory `version` (read once per version)."""
        fresh = self._directory_at(version)
        if fresh and self._types is not None:
            return self._types
        types = {record.name: record for record in await tx.call_types.list()}
        if fresh and self._directory_at(version):
            self._types = types
        return types

    async def caller(self, tx: Transaction, version: int) -> Caller:
        """The RPC's caller (its user's role and teams), as of directory `version`."""
        principal = current_principal()
        fresh = self._directory_at(version)
        if fresh:
            known = self._callers.get(principal)
            if known is not None:
                return known
        caller = await load_caller(tx)
        if fresh and self._directory_at(version):
            if len(self._callers) >= self._capacity:
                self._callers.clear()
            self._callers[principal] = caller
        return caller

    def _directory_at(self, version: int) -> bool:
        """Whether what is read at directory `version` may be kept (and what was kept may serve it): the
        newest version seen, and (trusted) no change since it was taken."""
        if self.trusted and version != self._directory_changes:
            return False
        if version > self._directory_version:
            self._directory_version, self._types, self._callers = version, None, {}
        return version == self._directory_version

    def _changed(self, cids: frozenset[str] | None) -> None:
        if cids is not None and not cids:
            return  # a write that changed nothing (a no-op update)
        self.generation += 1
        if cids is None:
            self._entries.clear()
            self._directory_changes += 1
            self._types, self._callers = None, {}
            self._changed_at.clear()
            self._floor = self.generation
            return
        for cid in cids:
            self._entries.pop(cid, None)
            self._changed_at.pop(cid, None)  # re-inserted last: the dict stays in generation order
            self._changed_at[cid] = self.generation
        while len(self._changed_at) > self.RECENT_CHANGES:
            oldest = next(iter(self._changed_at))
            self._floor = max(self._floor, self._changed_at.pop(oldest))
