"""Call and member rules: get-or-create, updates with etags, ending, deletion, members and queries."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast

from callplane_server.auth.context import current_principal
from callplane_server.domain.call import Call, Update, backstage_enabled, ordered_capabilities
from callplane_server.domain.call_types import merge_settings, validate_settings
from callplane_server.domain.custom_data import apply_set, apply_unset, split_path
from callplane_server.domain.events import (
    CallCreated,
    MembersAdded,
    MembersRemoved,
    MembersUpdated,
)
from callplane_server.domain.records import (
    CallRecord,
    CallStamp,
    CallView,
    MemberInput,
    MemberRecord,
    Page,
    PageRequest,
    UserRecord,
)
from callplane_server.domain.validation import (
    DEFAULT_MEMBERS_LIMIT,
    MAX_BATCH,
    MAX_MEMBERS_LIMIT,
    ROLE_NAME,
    TEAM_NAME,
    USER_ID,
    check_call_key,
    check_custom_depth,
    check_custom_size,
    new_call_id,
    resolve_limit,
)
from callplane_server.errors import (
    Aborted,
    CallplaneError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ViolationCollector,
)
from callplane_server.services.authz import (
    Caller,
    capabilities_for_calls,
    load_caller,
    require,
    require_admin,
    require_self,
)
from callplane_server.services.call_cache import CachedCall, CallCache
from callplane_server.services.call_lookup import (
    call_not_found,
    live_call,
    live_record,
    open_call,
    unknown_users,
)
from callplane_server.services.call_types import call_type_not_found
from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.services.ringing import cancel_rings, ring_created_call
from callplane_server.services.session_rules import end_running_session, reschedule_max_duration
from callplane_server.store import Store, Transaction
from callplane_server.store.visibility import CallReader


@dataclass
class CallData:
    created_by_id: str = ""
    members: list[MemberInput] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)
    settings_override: dict[str, Any] = field(default_factory=dict)
    starts_at: datetime | None = None
    team: str = ""


@dataclass
class CallUpdate:
    custom: dict[str, Any] | None = None
    set_custom: dict[str, Any] = field(default_factory=dict)
    unset_custom: list[str] = field(default_factory=list)
    settings_override: dict[str, Any] | None = None
    starts_at: datetime | None = None
    etag: str = ""


@dataclass
class MembersChange:
    members: list[MemberRecord]
    removed_user_ids: list[str]


def _check_team(caller: Caller, team: str, cid: str) -> None:
    """A user token creates calls only in its own teams (or without a team); a global admin anywhere."""
    if caller.is_admin or not team or (caller.user is not None and team in caller.user.teams):
        return
    raise PermissionDenied(
        f"user {caller.user_id!r} is not in team {team!r}",
        reason="TEAM_MISMATCH",
        metadata={"cid": cid, "team": team, "user_id": caller.user_id},
    )


class CallService:
    def __init__(self, store: Store, clock: Clock, limits: Limits, cache: CallCache | None = None) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self._cache = cache or CallCache(store)

    # -- helpers -----------------------------------------------------------------------------------

    async def _open(self, tx: Transaction, cid: str, *need: str) -> Call:
        """The call for change, with its first members when the cache holds this very state (every change
        bumps last_seq, so an entry equal to the row just read under the lock is current)."""
        call = await open_call(tx, cid, *need, now=self._clock())
        if call.members is None:
            entry = self._cache.held(cid)
            if entry is not None and entry.call == call.record:
                call.members, call.members_limit = entry.members, MAX_MEMBERS_LIMIT
        return call

    @staticmethod
    async def _view(tx: Transaction, call: Call, members_limit: int) -> CallView:
        """The call as clients see it, with its first `members_limit` members."""
        if call.members is None or call.members_limit < members_limit:
            call.members = (await tx.members.first([call.cid], members_limit))[call.cid]
            # Fewer than asked for: that is every member.
            call.members_limit = members_limit if len(call.members) == members_limit else MAX_MEMBERS_LIMIT
        return call.view(call.members[:members_limit])

    def _check_members(self, members: list[MemberInput], prefix: str, problems: ViolationCollector) -> None:
        if len(members) > MAX_BATCH:
            problems.add(prefix, f"at most {MAX_BATCH} members per request, got {len(members)}")
        seen: set[str] = set()
        for index, member in enumerate(members):
            path = f"{prefix}[{index}]"
            if not USER_ID.fullmatch(member.user_id or ""):
                problems.add(f"{path}.user_id", f"{member.user_id!r} is not a valid user id")
            if member.user_id in seen:
                problems.add(f"{path}.user_id", f"duplicate user id {member.user_id!r}")
            seen.add(member.user_id)
            if member.role and not ROLE_NAME.fullmatch(member.role):
                problems.add(f"{path}.role", f"{member.role!r} is not a valid role")
            if member.custom is not None:
                check_custom_size(
                    member.custom, self._limits.max_member_custom_bytes, f"{path}.custom", problems
                )

    @staticmethod
    async def _require_users(tx: Transaction, wanted: dict[str, str]) -> dict[str, UserRecord]:
        """The users `wanted` names (request field path → user id), read whole (they go into members and
        events); UNKNOWN_USERS naming each path whose user does not exist."""
        users = await tx.users.get_many(wanted.values())
        unknown = {path: user_id for path, user_id in wanted.items() if user_id not in users}
        if unknown:
            raise unknown_users(unknown)
        return users

    @staticmethod
    async def _upsert_members(
        tx: Transaction, cid: str, members: list[MemberInput], current: dict[str, MemberRecord], now: datetime
    ) -> list[MemberRecord]:
        """`members` as they will be stored: `current` (the ones that exist) keep what the input leaves
        out."""
        records = []
        for member in members:
            before = current.get(member.user_id)
            records.append(
                MemberRecord(
                    call_cid=cid,
                    user_id=member.user_id,
                    role=member.role or (before.role if before else "user"),
                    custom=member.custom if member.custom is not None else (before.custom if before else {}),
                    created_at=before.created_at if before else now,
                    updated_at=now,
                )
            )
        await tx.members.upsert(records)
        return records

    # -- RPCs -------------------------------------------------------------------------------------

    async def get_or_create(
        self,
        call_type: str,
        call_id: str,
        data: CallData,
        members_limit: int,
        *,
        ring: bool = False,
        notify: bool = False,
        video: bool = False,
    ) -> CallView:
        """With `ring` / `notify` (only when this request creates the call): rings or notifies every
        member except the creator, in the creating transaction. An empty `call_id` creates a call with an
        id made by the server (the view carries it)."""
        limit = self.check_get_or_create(call_type, call_id, data, members_limit, ring=ring, notify=notify)
        generated = not call_id
        if generated:
            call_id = new_call_id()
        else:
            # Most calls to this RPC find the call: answer those as a read, without taking the write lock.
            # A call that is missing (or deleted) goes on to the write transaction, which decides for real.
            try:
                return await self._read_view(f"{call_type}:{call_id}", limit)
            except NotFound:
                pass
        return await self._store.write(
            lambda tx: self.get_or_create_in(
                tx,
                call_type,
                call_id,
                data,
                limit,
                ring=ring,
                notify=notify,
                video=video,
                create_only=generated,
            )
        )

    def check_get_or_create(
        self,
        call_type: str,
        call_id: str,
        data: CallData,
        members_limit: int,
        *,
        ring: bool = False,
        notify: bool = False,
    ) -> int:
        """Validates a get-or-create request (an empty id asks for a generated one; a user token creates as
        itself: `data.created_by_id` is set to it); returns the members limit."""
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems, generated_if_empty=True)
        limit = resolve_limit(
            members_limit, "members_limit", problems, default=DEFAULT_MEMBERS_LIMIT, maximum=MAX_MEMBERS_LIMIT
        )
        if data.created_by_id and not USER_ID.fullmatch(data.created_by_id):
            problems.add("data.created_by_id", f"{data.created_by_id!r} is not a valid user id")
        if data.team and not TEAM_NAME.fullmatch(data.team):
            problems.add("data.team", f"{data.team!r} is not a valid team")
        self._check_members(data.members, "data.members", problems)
        if data.custom:
            check_custom_size(data.custom, self._limits.max_call_custom_bytes, "data.custom", problems)
        if data.settings_override:  # no override is always valid
            validate_settings(data.settings_override, "data.settings_override", problems)
        principal = current_principal()
        if not principal.is_server:
            # User tokens create calls as themselves.
            assert principal.user_id is not None
            require_self(
                Caller(principal, None), data.created_by_id or principal.user_id, "data.created_by_id"
            )
            data.created_by_id = principal.user_id
        if (ring or notify) and not data.created_by_id:
            problems.add("data.created_by_id", "is required with ring or notify (the caller)")
        problems.raise_if_any()
        return limit

    async def get_or_create_in(
        self,
        tx: Transaction,
        call_type: str,
        call_id: str,
        data: CallData,
        limit: int,
        *,
        ring: bool = False,
        notify: bool = False,
        video: bool = False,
        create_only: bool = False,
    ) -> CallView:
        """The call, created in `tx` when missing (after check_get_or_create): in the caller's transaction,
        so that a request that creates the call and then fails (JoinCall with `create`) creates nothing.
        `create_only` (a generated id): an existing call is never handed out."""
        cid = f"{call_type}:{call_id}"
        now = self._clock()
        existing = await tx.calls.open(cid, now)
        if existing is not None and create_only:
            raise Aborted(
                f"the generated call id {call_id!r} is taken; retry",
                reason="GENERATED_ID_TAKEN",
                metadata={"cid": cid},
            )
        if existing is not None:
            if existing.record.deleted_at is not None:
                raise FailedPrecondition(
                    f"call {cid!r} was deleted; its id cannot be reused until it is hard-deleted",
                    reason="CALL_DELETED",
                    metadata={"cid": cid},
                )
            call = await open_call(tx, cid, "read-call", now=now)
            return await self._view(tx, call, limit)
        caller = await load_caller(tx)
        _check_team(caller, data.team, cid)
        type_record = await tx.call_types.get(call_type)
        if type_record is None:
            raise call_type_not_found(call_type)
        wanted = {f"data.members[{i}].user_id": m.user_id for i, m in enumerate(data.members)}
        if data.created_by_id:
            wanted["data.created_by_id"] = data.created_by_id
        # Read whole (the members' users are part of the call.created event): their existence with them.
        users = await self._require_users(tx, wanted)
        effective = merge_settings(type_record.settings, data.settings_override)
        record = CallRecord(
            type=call_type,
            id=call_id,
            created_by_user_id=data.created_by_id or None,
            team=data.team or None,
            custom=data.custom,
            settings_override=data.settings_override,
            backstage=backstage_enabled(effective),
            ongoing=False,
            member_count=len(data.members),
            version=1,
            last_seq=0,  # (a hard-deleted call's retained events keep theirs: the store goes on after them)
            created_at=now,
            updated_at=now,
            starts_at=data.starts_at,
        )
        call = await tx.calls.create(record, type_record, now)
        # A new call has no members yet (a hard delete took its predecessor's).
        members = [
            MemberRecord(cid, m.user_id, m.role or "user", m.custom if m.custom is not None else {}, now, now)
            for m in data.members
        ]
        await tx.members.insert_new(members)
        # Checked on the inserted call so that member roles count; a denial rolls the insert back.
        call = await open_call(tx, cid, "create-call", now=now, caller=caller)
        for member in members:
            member.user = users.get(member.user_id)
        # Every member, oldest first (all were created now: by user id).
        call.members = sorted(members, key=lambda member: member.user_id)
        call.members_limit = MAX_MEMBERS_LIMIT
        view = await self._view(tx, call, limit)
        call.record_event(CallCreated(view, members))
        await ring_created_call(tx, call, [m.user_id for m in members], ring=ring, notify=notify, video=video)
        return view

    async def get(self, call_type: str, call_id: str, members_limit: int) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        limit = resolve_limit(
            members_limit, "members_limit", problems, default=DEFAULT_MEMBERS_LIMIT, maximum=MAX_MEMBERS_LIMIT
        )
        problems.raise_if_any()
        return await self._read_view(f"{call_type}:{call_id}", limit)

    async def _read_view(self, cid: str, limit: int) -> CallView:
        """The call as `read-call` shows it to the caller: from the cache when the caller read this
        state of it before, else from the database (filling the cache)."""
        cached, have = await self._readable(cid)
        return CallView(
            cached.call, cached.settings, cached.members[:limit], own_capabilities=ordered_capabilities(have)
        )

    async def _readable(self, cid: str) -> tuple[CachedCall, frozenset[str]]:
        """The call's current state and what the caller may do in it, after checking `read-call`: from
        the cache when the caller read this state before, else from the database (filling the cache)."""
        principal = current_principal()
        cached = await self._cache.current(cid)
        have = cached.capabilities.get(principal) if cached is not None else None
        if cached is None or have is None:
            generation = self._cache.generation

            async def read_call(tx: Transaction) -> tuple[CallView, frozenset[str], int]:
                # The stamp first (the call with the directory version): nothing read after it is older
                # than it (see call_cache).
                record, directory = await tx.calls.get_stamped(cid)
                call = live_record(record, cid)
                call_type = await tx.call_types.get(call.type)
                grants = call_type.grants if call_type else {}
                have = await require(tx, await load_caller(tx), call, "read-call", grants=grants)
                settings = merge_settings(call_type.settings if call_type else {}, call.settings_override)
                members = (await tx.members.first([cid], MAX_MEMBERS_LIMIT))[cid]
                return CallView(call, settings, members), have, directory

            # In two steps: unpacked straight from the call, mypy would keep `have` typed Optional.
            loaded = await self._store.read(read_call)
            full, have, directory = loaded
            if (
                cached is None
                or not self._cache.unchanged_since(cid, generation)
                or (
                    not self._cache.trusted
                    and cached.stamp != (full.call.last_seq, full.call.created_at, directory)
                )
            ):
                cached = CachedCall(full.call, full.settings, full.members, directory=directory)
            # else the cached state is still current: it only lacked this principal's capabilities.
            cached.capabilities[principal] = have
            self._cache.put(cid, cached, generation)
        return cached, have

    async def update(self, call_type: str, call_id: str, change: CallUpdate, members_limit: int) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        limit = resolve_limit(
            members_limit, "members_limit", problems, default=DEFAULT_MEMBERS_LIMIT, maximum=MAX_MEMBERS_LIMIT
        )
        if change.custom is not None and (change.set_custom or change.unset_custom):
            problems.add(
                "custom", "give either custom (replace) or set_custom/unset_custom (partial), not both"
            )
        set_paths = {path: split_path(path, f"set_custom.{path}", problems) for path in change.set_custom}
        unset_paths = [
            split_path(path, f"unset_custom[{i}]", problems) for i, path in enumerate(change.unset_custom)
        ]
        for index, path in enumerate(change.unset_custom):
            if path in change.set_custom:
                problems.add(f"unset_custom[{index}]", f"{path!r} is both set and unset")
        if change.custom is not None:
            check_custom_size(change.custom, self._limits.max_call_custom_bytes, "custom", problems)
        if change.settings_override is not None:
            validate_settings(change.settings_override, "settings_override", problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        needed = ["update-call"]
        if change.settings_override is not None:
            needed.append("update-call-settings")
            if "max_duration_seconds" in (change.settings_override.get("limits") or {}):
                needed.append("change-max-duration")

        def applied(call: CallRecord) -> Update:
            """The call's custom data and settings override after the change (its result size checked)."""
            custom = change.custom if change.custom is not None else call.custom
            for path, segments in set_paths.items():
                if segments:
                    custom = apply_set(custom, segments, change.set_custom[path])
            for segments in unset_paths:
                if segments:
                    custom = apply_unset(custom, segments)
            if set_paths or unset_paths:  # a whole `custom` was checked with the request
                size_problems = ViolationCollector()
                check_custom_size(custom, self._limits.max_call_custom_bytes, "set_custom", size_problems)
                if set_paths:
                    check_custom_depth(custom, "set_custom", size_problems)
                size_problems.raise_if_any()
            override = call.settings_override
            if change.settings_override:
                override = merge_settings(call.settings_override, change.settings_override)
            return Update(custom, override, change.starts_at)

        # A change to what the call already is, is a read: answered without the write lock.
        unchanged = await self._unchanged(cid, needed, change.etag, applied, limit)
        if unchanged is not None:
            return unchanged

        async def update_call(tx: Transaction) -> CallView:
            call = await self._open(tx, cid, *needed)
            call.check_etag(change.etag)
            override_before = call.record.settings_override
            if call.update(applied(call.record)) and call.record.settings_override != override_before:
                await reschedule_max_duration(tx, call)
            # With as many members as the cache keeps, so that the state can be kept once committed.
            return await self._view(tx, call, MAX_MEMBERS_LIMIT if self._keeps(call) else limit)

        view = await self._store.write(update_call)
        self._keep_written(view)
        return replace(view, members=view.members[:limit])

    def _keeps(self, call: Call) -> bool:
        """Whether the call's state after this write can be kept in the cache for the caller."""
        return self._cache.trusted and "read-call" in call.capabilities

    def _keep_written(self, view: CallView) -> None:
        """Keeps the state a write left (read under its lock, now committed), so the next read or no-op
        update of the call needs no query."""
        if self._cache.trusted and "read-call" in view.own_capabilities:
            entry = CachedCall(view.call, view.settings, view.members)
            entry.capabilities[current_principal()] = frozenset(view.own_capabilities)
            self._cache.put_committed(view.call.cid, entry)

    async def _unchanged(
        self,
        cid: str,
        needed: list[str],
        etag: str,
        applied: Callable[[CallRecord], Update],
        limit: int,
    ) -> CallView | None:
        """The call's view when an update would change nothing in its current state (and the caller may
        make it); None when the write path must decide (a change, a refusal, or no readable state)."""
        cached = await self._cache.current(cid)
        have = cached.capabilities.get(current_principal()) if cached is not None else None
        if cached is None or have is None:
            return None  # not known here: reading it first would cost every real change a read
        record = cached.call
        if any(capability not in have for capability in needed) or (etag and etag != record.etag):
            return None
        try:
            if applied(record).changes(record):
                return None
        except CallplaneError:
            return None
        return CallView(record, cached.settings, cached.members[:limit])

    async def end(self, call_type: str, call_id: str) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def end_call(tx: Transaction) -> CallView:
            call = await self._open(tx, cid, "end-call")
            call.check_not_ended(f"call {cid!r} already ended")
            # Rings are cancelled, everyone leaves (call_ended) and the session ends before call.ended.
            await cancel_rings(tx, call)
            await end_running_session(tx, call)
            call.end("ended")
            return call.view()

        return await self._store.write(end_call)

    async def delete(self, call_type: str, call_id: str, *, hard: bool) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def delete_call(tx: Transaction) -> CallView:
            require_admin(await load_caller(tx), "DeleteCall")
            call = await tx.calls.open(cid, self._clock())
            if call is None or (call.record.deleted_at is not None and not hard):
                raise call_not_found(cid)
            if call.record.deleted_at is None:
                await cancel_rings(tx, call)
                await end_running_session(tx, call)
            if not hard:
                call.soft_delete()
                return call.view()
            call.hard_delete()
            await tx.sessions.delete_for_call(cid)
            # A recreated call of this cid must not mistake old request ids for retries.
            await tx.idempotency.forget_call(cid)
            await tx.permissions.forget_call(cid)
            await tx.calls.hard_delete(cid)
            return call.view()

        return await self._store.write(delete_call)

    async def query(self, page: PageRequest, members_limit: int) -> Page[CallView]:
        problems = ViolationCollector()
        limit = resolve_limit(
            members_limit, "members_limit", problems, default=DEFAULT_MEMBERS_LIMIT, maximum=MAX_MEMBERS_LIMIT
        )
        problems.raise_if_any()
        # Custom-data filters and sorts no index serves: logged once per shape, or refused.
        await self._store.indexes.check_query(page)

        async def query_calls(
            tx: Transaction,
        ) -> tuple[Page[CallView], dict[str, CachedCall], dict[str, frozenset[str]]]:
            """The page, the entries to keep for the caller (new ones, and those that lacked its
            capabilities), and the caller's capabilities in each listed call."""
            # First, so that nothing read after it is older than it (see call_cache).
            directory = await self._cache.directory(tx)
            caller = await self._cache.caller(tx, directory)
            types = await self._cache.call_types(tx, directory)
            grants = {name: record.grants for name, record in types.items()}
            reader = None
            if not caller.is_server:
                assert caller.user is not None and caller.user_id is not None
                reader = CallReader(
                    user_id=caller.user_id,
                    role=caller.user.role,
                    teams=caller.user.teams,
                    call_cids=caller.principal.call_cids,
                    grants=grants,
                )
            # The page as stamps: a cached entry of the same stamp is that very state (every change
            # bumps last_seq), so its record, members, settings and renderings serve; only the other
            # calls are read.
            stamps = await tx.calls.query_stamps(page, reader=reader)
            entries: dict[str, CachedCall] = {}
            fresh: dict[str, CachedCall] = {}
            for cid, last_seq, created_at in stamps.items:
                entry = self._cache.matching(cid, CallStamp(last_seq, created_at, directory))
                if entry is not None:
                    entries[cid] = entry
            missing = await tx.calls.get_many([cid for cid, *_ in stamps.items if cid not in entries])
            # As many members as any read may ask for, so they can fill the cache.
            members = await tx.members.first(list(missing), MAX_MEMBERS_LIMIT)
            for cid, call in missing.items():
                type_settings = types[call.type].settings if call.type in types else {}
                settings = merge_settings(type_settings, call.settings_override)
                entries[cid] = fresh[cid] = CachedCall(call, settings, members[cid], directory=directory)
            # (A call hard-deleted between the two reads, on PostgreSQL, is left out of the page.)
            listed = [entries[cid] for cid, *_ in stamps.items if cid in entries]
            # What the caller may do in each: kept with the entries when it read them before.
            principal = current_principal()
            known = {entry.call.cid: entry.capabilities.get(principal) for entry in listed}
            if None in known.values():
                capabilities = await capabilities_for_calls(tx, caller, [e.call for e in listed], grants)
                # Kept with the entries that lacked them (below), as with the new ones.
                fresh.update((cid, entries[cid]) for cid, have in known.items() if have is None)
            else:
                capabilities = cast(dict[str, frozenset[str]], known)
            # The entry's record: replies rendered for that state are reused.
            views = [
                CallView(
                    entry.call,
                    entry.settings,
                    entry.members[:limit],
                    own_capabilities=ordered_capabilities(capabilities[entry.call.cid]),
                )
                for entry in listed
            ]
            return Page(views, stamps.next, stamps.prev), fresh, capabilities

        generation = self._cache.generation
        found, fresh, capabilities = await self._store.read(query_calls)
        principal = current_principal()
        for cid, entry in fresh.items():
            if "read-call" in capabilities[cid]:  # the cache keeps only principals that may read
                entry.capabilities[principal] = capabilities[cid]
                self._cache.put(cid, entry, generation)
        return found

    async def update_members(
        self, call_type: str, call_id: str, update_members: list[MemberInput], remove_members: list[str]
    ) -> MembersChange:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        self._check_members(update_members, "update_members", problems)
        if len(remove_members) > MAX_BATCH:
            problems.add("remove_members", f"at most {MAX_BATCH} per request, got {len(remove_members)}")
        updating = {m.user_id for m in update_members}
        for index, user_id in enumerate(remove_members):
            if not USER_ID.fullmatch(user_id or ""):
                problems.add(f"remove_members[{index}]", f"{user_id!r} is not a valid user id")
            elif user_id in updating:
                problems.add(f"remove_members[{index}]", f"{user_id!r} is both updated and removed")
        if not update_members and not remove_members:
            problems.add("update_members", "nothing to do: give update_members and/or remove_members")
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        needed = [
            *(["update-call-member"] if update_members else []),
            *(["remove-call-member"] if remove_members else []),
        ]

        async def change_members(tx: Transaction) -> MembersChange:
            call = await self._open(tx, cid, *needed)
            users = await self._require_users(
                tx, {f"update_members[{i}].user_id": m.user_id for i, m in enumerate(update_members)}
            )
            before = await tx.members.get_many(cid, [m.user_id for m in update_members])
            records = await self._upsert_members(tx, cid, update_members, before, call.now)
            removed = await tx.members.remove(cid, list(dict.fromkeys(remove_members)))
            added = [r for r in records if r.user_id not in before]
            updated = [r for r in records if r.user_id in before]
            call.members_changed(added=len(added), removed=len(removed))
            for record in records:
                record.user = users.get(record.user_id)
            if added:
                call.record_event(MembersAdded(added))
            if updated:
                call.record_event(MembersUpdated(updated))
            if removed:
                call.record_event(MembersRemoved(removed))
            return MembersChange(records, removed)

        return await self._store.write(change_members)

    async def query_members(self, call_type: str, call_id: str, page: PageRequest) -> Page[MemberRecord]:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def members_page(tx: Transaction) -> Page[MemberRecord]:
            call = await live_call(tx, cid)
            await require(tx, await load_caller(tx), call, "read-call")
            return await tx.members.query(cid, page)

        # Members are part of the call's cached state: any change to them invalidates the entry.
        cached, _have = await self._readable(cid)
        key = _page_key(page)
        found = cached.member_pages.get(key)
        if found is None:
            generation = self._cache.generation
            found = await self._store.read(members_page)
            if self._cache.unchanged_since(cid, generation):
                cached.keep_member_page(key, found)
        return found


def _page_key(page: PageRequest) -> tuple[Any, ...]:
    conditions = json.dumps(page.filter_conditions, sort_keys=True) if page.filter_conditions else ""
    return (conditions, page.sort, page.limit, page.next, page.prev)
