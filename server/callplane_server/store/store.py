"""The store facade the services use: transactions that hand out repositories."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.events import DomainEvent
from callplane_server.domain.records import CallRecord, CallStamp
from callplane_server.errors import CallplaneError, Unavailable
from callplane_server.store.custom_indexes import CustomIndex, ensure_custom_indexes
from callplane_server.store.database import GROUP_SCOPE, Database, GroupScope
from callplane_server.store.events import EventRepository, Written, write_events
from callplane_server.store.execution import Statements
from callplane_server.store.idempotency import IdempotencyRepository
from callplane_server.store.index_manager import CustomIndexRepository, IndexManager
from callplane_server.store.permissions import PermissionRepository
from callplane_server.store.query import CursorSigner
from callplane_server.store.repositories import (
    CALL_STAMPS,
    CallRepository,
    CallTypeRepository,
    Directory,
    MemberRepository,
    SecretRepository,
    UserRepository,
)
from callplane_server.store.rings import RingRepository
from callplane_server.store.sessions import SessionRepository
from callplane_server.store.timers import TimerRepository
from callplane_server.store.webhooks import WebhookRepository

T = TypeVar("T")


class Transaction:
    """One unit of work: every repository shares the same session and so the same transaction."""

    def __init__(self, session: AsyncSession, signer: CursorSigner, *, write: bool = False) -> None:
        statements = Statements(session)
        self.directory = Directory(session, statements)
        self.call_types = CallTypeRepository(session, statements, self.directory)
        self.users = UserRepository(session, signer, statements, self.directory)
        self.events = EventRepository(session, statements)
        self.calls = CallRepository(
            session,
            signer,
            statements,
            sink=self._record if write else None,
            unwritten_seq=self.events.unwritten_max_seq,
        )
        self.members = MemberRepository(session, signer, self.users, statements)
        self.secrets = SecretRepository(session)
        self.permissions = PermissionRepository(session, statements)
        self.sessions = SessionRepository(session)
        self.timers = TimerRepository(session)
        self.rings = RingRepository(session)
        self.idempotency = IdempotencyRepository(session, statements)
        self.custom_indexes = CustomIndexRepository(session)
        self.webhooks = WebhookRepository(session)

    def _record(
        self, call: CallRecord, event: DomainEvent, at: datetime, recipients: tuple[str, ...]
    ) -> None:
        self.events.append(call, event, at, recipients)

    async def flush(self) -> tuple[frozenset[str], Written | None]:
        """Writes back the calls this transaction changed, then its events (last, so the position
        counter is locked as briefly as possible). Returns the changed calls and the events written."""
        changed = await self.calls.flush() | self.events.pending_cids()
        return changed, await self.events.flush()


class Store:
    def __init__(self, database: Database) -> None:
        self.database = database
        # Custom-data indexes: built and dropped in the background, judged against QueryCalls shapes.
        self.indexes = IndexManager(database)
        self._signer: CursorSigner | None = None
        # Called with the last event position after each commit that wrote events (the local doorbell),
        # when there are no event listeners.
        self.commit_listeners: list[Callable[[int], None]] = []
        # Called with the events a commit of this process wrote, right after it, instead of the commit
        # listeners: they need not read them back.
        self.event_listeners: list[Callable[[Written], None]] = []
        # Last positions of this process's commits in progress: their NOTIFY (PostgreSQL) may come back
        # before the commit returns, and needs no read, since the commit hands its events over.
        self.committing: set[int] = set()
        # Called after each committed write, before it is acknowledged, with the cids of the calls it
        # changed, or None when it may have changed anything (it wrote no call events: users, call types).
        self.change_listeners: list[Callable[[frozenset[str] | None], None]] = []
        # With group commit, the group writes the events of all its writes at once (one statement for
        # the positions, one insert) and rings the doorbell once.
        database.defer_to_group(write_events, self._events_committed)

    def _events_committed(self, written: Written) -> None:
        """A commit (a group commit on SQLite) wrote these events: handed to the event listeners as they
        are (they need not read them back), else the commit listeners are rung."""
        if self.event_listeners:
            for deliver in self.event_listeners:
                deliver(written)
            return
        for listener in self.commit_listeners:
            listener(written.last_position)

    @classmethod
    async def open(
        cls,
        database_url: str,
        *,
        migrate: bool = True,
        custom_indexes: Sequence[CustomIndex] = (),
        require_indexes: bool = False,
    ) -> Store:
        """`custom_indexes`: the server's own (created now, before serving); `require_indexes`: refuse
        QueryCalls requests no READY index serves (INDEX_REQUIRED) instead of only logging them."""
        store = cls(Database(database_url))
        store.indexes = IndexManager(store.database, custom_indexes, require=require_indexes)
        try:
            if migrate:
                await store.database.migrate()
            await ensure_custom_indexes(store.database, custom_indexes)
            await store.indexes.start()
            secret = await store.database.run(
                lambda session: SecretRepository(session).get_or_create("cursor_signing_key"), write=True
            )
        except BaseException:
            await store.close()
            raise
        store._signer = CursorSigner(secret.encode())
        return store

    @property
    def sole_writer(self) -> bool:
        """Every change to the database goes through this process (so in-process caches may trust
        change_listeners); false when other processes share it."""
        return self.database.sole_writer

    async def close(self) -> None:
        await self.indexes.close()
        await self.database.dispose()

    @property
    def signer(self) -> CursorSigner:
        if self._signer is None:
            raise RuntimeError("store not opened")
        return self._signer

    async def call_stamps(self, cids: Sequence[str]) -> dict[str, CallStamp]:
        """cid → its stamp as committed now, for each of the calls that exists, in one statement outside
        any transaction. A cached call read at its stamp is current."""
        rows = await self.database.probe(CALL_STAMPS[self.database.dialect], {"cids": list(cids)})
        return {row[0]: CallStamp(int(row[1]), row[2], int(row[3] or 0)) for row in rows}

    async def read(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        return await self.database.run(lambda session: work(Transaction(session, self.signer)), write=False)

    async def write(
        self,
        work: Callable[[Transaction], Awaitable[T]],
        *,
        upkeep: bool = False,
        touches_calls: bool = True,
    ) -> T:
        """Runs `work` in a write transaction; it may be retried whole on a transient conflict. Events
        emitted by `work` are numbered and written last, in the same transaction. `upkeep`: the
        server's own upkeep (its replica lease), which must not wait behind RPC writes for a
        connection (PostgreSQL gives it one of its own)."""
        written: Written | None = None
        changed: frozenset[str] | None = None
        # Every attempt's (a retried one's positions were rolled back, and will be handed out again).
        attempted: list[int] = []

        async def attempt(session: AsyncSession) -> T:
            nonlocal written, changed
            tx = Transaction(session, self.signer, write=True)
            result = await work(tx)
            cids, written = await tx.flush()
            if written is not None:
                self.committing.add(written.last_position)
                attempted.append(written.last_position)
            # A transaction that opened calls changed only what belongs to them (members, sessions,
            # participants, permissions...); one that did not may have changed anything (users, types),
            # unless it is the server's upkeep (its lease and holds: nothing a call's state shows).
            changed = cids if tx.calls.opened_any or upkeep or not touches_calls else cids or None
            group: GroupScope | None = session.info.get(GROUP_SCOPE)
            if changed is None and group is not None:
                group.forget_all()
            # Also now, before the commit: a later write of the same group commit must not take this
            # change's calls from a cache (it runs in the same transaction, after this change).
            self._changed(changed)
            return result

        try:
            result = await self.database.run(attempt, write=True, upkeep=upkeep)
        except CallplaneError as error:
            # A refusal rolled back; an outage leaves the outcome unknown (the commit may have landed:
            # then the tailer's poll finds its events).
            if isinstance(error, Unavailable):
                self._changed(None)
            raise
        except BaseException:
            self._changed(None)
            raise
        finally:
            self.committing.difference_update(attempted)
        self._changed(changed)
        if written is not None:
            self._events_committed(written)
        return result

    def _changed(self, cids: frozenset[str] | None) -> None:
        for listener in self.change_listeners:
            listener(cids)
