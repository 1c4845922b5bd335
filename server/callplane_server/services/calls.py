"""Call and member rules: get-or-create, updates with etags, ending, deletion, members and queries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from callplane_server.auth.context import current_principal
from callplane_server.domain.call_types import merge_settings, validate_settings
from callplane_server.domain.capabilities import CAPABILITIES
from callplane_server.domain.custom_data import apply_set, apply_unset, split_path
from callplane_server.domain.events import (
    CallCreated,
    CallDeleted,
    CallEnded,
    CallUpdated,
    MembersAdded,
    MembersRemoved,
    MembersUpdated,
)
from callplane_server.domain.records import CallRecord, CallView, MemberInput, MemberRecord, Page, PageRequest
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
from callplane_server.services.call_lookup import call_not_found, live_call, unknown_users
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


def ordered_capabilities(capabilities: frozenset[str] | set[str]) -> list[str]:
    """Capabilities in the canonical CAPABILITIES order."""
    return [capability for capability in CAPABILITIES if capability in capabilities]


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

    async def _view(
        self,
        tx: Transaction,
        call: CallRecord,
        members_limit: int,
        *,
        created: bool = False,
        own: frozenset[str] = frozenset(),
    ) -> CallView:
        call_type = await tx.call_types.get(call.type)
        if call_type is None:  # pragma: no cover - a foreign key keeps this from happening
            raise call_type_not_found(call.type)
        members = (await tx.members.first([call.cid], members_limit))[call.cid]
        return CallView(
            call,
            merge_settings(call_type.settings, call.settings_override),
            members,
            created,
            ordered_capabilities(own),
        )

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

    async def _require_users(self, tx: Transaction, wanted: dict[str, str]) -> None:
        existing = await tx.users.existing_ids(wanted.values())
        unknown = {path: user_id for path, user_id in wanted.items() if user_id not in existing}
        if unknown:
            raise unknown_users(unknown)

    async def _upsert_members(
        self, tx: Transaction, cid: str, members: list[MemberInput], now: datetime
    ) -> list[MemberRecord]:
        current = await tx.members.get_many(cid, [m.user_id for m in members])
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
        caller = await load_caller(tx)
        existing = await tx.calls.get(cid)
        if existing is not None and create_only:
            raise Aborted(
                f"the generated call id {call_id!r} is taken; retry",
                reason="GENERATED_ID_TAKEN",
                metadata={"cid": cid},
            )
        if existing is not None:
            if existing.deleted_at is not None:
                raise FailedPrecondition(
                    f"call {cid!r} was deleted; its id cannot be reused until it is hard-deleted",
                    reason="CALL_DELETED",
                    metadata={"cid": cid},
                )
            have = await require(tx, caller, existing, "read-call")
            return await self._view(tx, existing, limit, own=have)
        _check_team(caller, data.team, cid)
        type_record = await tx.call_types.get(call_type)
        if type_record is None:
            raise call_type_not_found(call_type)
        wanted = {f"data.members[{i}].user_id": m.user_id for i, m in enumerate(data.members)}
        if data.created_by_id:
            wanted["data.created_by_id"] = data.created_by_id
        await self._require_users(tx, wanted)
        now = self._clock()
        effective = merge_settings(type_record.settings, data.settings_override)
        call = CallRecord(
            type=call_type,
            id=call_id,
            created_by_user_id=data.created_by_id or None,
            team=data.team or None,
            custom=data.custom,
            settings_override=data.settings_override,
            backstage=bool(effective.get("backstage", {}).get("enabled")),
            ongoing=False,
            member_count=len(data.members),
            version=1,
            # A hard-deleted call's retained events keep their seqs; a new call of that cid goes on.
            last_seq=await tx.events.max_seq(cid),
            created_at=now,
            updated_at=now,
            starts_at=data.starts_at,
        )
        await tx.calls.insert(call)
        members = await self._upsert_members(tx, cid, data.members, now)
        # Checked on the inserted call so that member roles count; a denial rolls the insert back.
        have = await require(tx, caller, call, "create-call")
        view = await self._view(tx, call, limit, created=True, own=have)
        users = await tx.users.get_many(m.user_id for m in members)
        for member in members:
            member.user = users.get(member.user_id)
        await tx.events.record(cid, CallCreated(view, members), now)
        await ring_created_call(
            tx, view, [m.user_id for m in members], ring=ring, notify=notify, video=video, now=now
        )
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
            cached.call,
            cached.settings,
            cached.members[:limit],
            own_capabilities=ordered_capabilities(have),
            rendered=cached.rendered,
        )

    async def _readable(self, cid: str) -> tuple[CachedCall, frozenset[str]]:
        """The call's current state and what the caller may do in it, after checking `read-call`: from
        the cache when the caller read this state before, else from the database (filling the cache)."""
        principal = current_principal()
        cached = self._cache.get(cid)
        have = cached.capabilities.get(principal) if cached is not None else None
        if cached is None or have is None:
            generation = self._cache.generation

            async def work(tx: Transaction) -> tuple[CallView, frozenset[str]]:
                call = await live_call(tx, cid)
                have = await require(tx, await load_caller(tx), call, "read-call")
                return await self._view(tx, call, MAX_MEMBERS_LIMIT), have

            # In two steps: unpacked straight from the call, mypy would keep `have` typed Optional.
            loaded = await self._store.read(work)
            full, have = loaded
            if cached is None or generation != self._cache.generation:
                cached = CachedCall(full.call, full.settings, full.members)
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

        async def work(tx: Transaction) -> CallView:
            call = await live_call(tx, cid, for_update=True)
            await require(tx, await load_caller(tx), call, *needed)
            if change.etag and change.etag != call.etag:
                raise Aborted(
                    f"call {cid!r} changed since etag {change.etag!r} (now {call.etag!r}); re-read and retry",
                    reason="ETAG_MISMATCH",
                    metadata={"cid": cid, "etag": change.etag, "current_etag": call.etag},
                )
            custom = call.custom
            if change.custom is not None:
                custom = change.custom
            for path, segments in set_paths.items():
                if segments:
                    custom = apply_set(custom, segments, change.set_custom[path])
            for segments in unset_paths:
                if segments:
                    custom = apply_unset(custom, segments)
            size_problems = ViolationCollector()
            check_custom_size(custom, self._limits.max_call_custom_bytes, "set_custom", size_problems)
            if set_paths:
                check_custom_depth(custom, "set_custom", size_problems)
            size_problems.raise_if_any()
            override = call.settings_override
            if change.settings_override:
                override = merge_settings(call.settings_override, change.settings_override)
            changed = (
                custom != call.custom
                or override != call.settings_override
                or (change.starts_at is not None and change.starts_at != call.starts_at)
            )
            if changed:
                call.custom = custom
                if override != call.settings_override:
                    type_record = await tx.call_types.get(call.type)
                    base = type_record.settings if type_record else {}
                    before = merge_settings(base, call.settings_override)
                    effective = merge_settings(base, override)
                    call.settings_override = override
                    # Only a change of backstage.enabled itself moves the call in or out of backstage;
                    # other settings changes must not undo a GoLive.
                    was = bool(before.get("backstage", {}).get("enabled"))
                    now_enabled = bool(effective.get("backstage", {}).get("enabled"))
                    if was != now_enabled:
                        call.backstage = now_enabled
                    await reschedule_max_duration(tx, call, effective)
                if change.starts_at is not None:
                    call.starts_at = change.starts_at
                call.version += 1
                call.updated_at = self._clock()
                await tx.calls.save(call)
                view = await self._view(tx, call, limit)
                await tx.events.record(cid, CallUpdated(view), call.updated_at)
                return view
            return await self._view(tx, call, limit)

        return await self._store.write(work)

    async def end(self, call_type: str, call_id: str) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def work(tx: Transaction) -> CallView:
            call = await live_call(tx, cid, for_update=True)
            await require(tx, await load_caller(tx), call, "end-call")
            if call.ended_at is not None:
                raise FailedPrecondition(
                    f"call {cid!r} already ended", reason="CALL_ENDED", metadata={"cid": cid}
                )
            now = self._clock()
            # Rings are cancelled, everyone leaves (call_ended) and the session ends before call.ended.
            await cancel_rings(tx, call, now)
            await end_running_session(tx, call, now)
            call.ended_at = now
            call.ongoing = False
            call.updated_at = now
            call.version += 1
            await tx.calls.save(call)
            view = await self._view(tx, call, 0)
            await tx.events.record(cid, CallEnded(view, reason="ended"), now)
            return view

        return await self._store.write(work)

    async def delete(self, call_type: str, call_id: str, *, hard: bool) -> CallView:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def work(tx: Transaction) -> CallView:
            require_admin(await load_caller(tx), "DeleteCall")
            call = await tx.calls.get(cid, for_update=True)
            if call is None or (call.deleted_at is not None and not hard):
                raise call_not_found(cid)
            now = self._clock()
            if call.deleted_at is None:
                await cancel_rings(tx, call, now)
                await end_running_session(tx, call, now)
            view = await self._view(tx, call, 0)
            if hard:
                # The event goes first: it takes its seq from the call row that is about to go.
                await tx.events.record(cid, CallDeleted(view, hard=True), now)
                await tx.sessions.delete_for_call(cid)
                # A recreated call of this cid must not mistake old request ids for retries.
                await tx.idempotency.forget_call(cid)
                await tx.permissions.forget_call(cid)
                await tx.calls.hard_delete(cid)
                return view
            call.deleted_at = now
            call.ended_at = call.ended_at or now
            call.ongoing = False
            call.updated_at = now
            call.version += 1
            await tx.calls.save(call)
            view.call = call
            await tx.events.record(cid, CallDeleted(view, hard=False), now)
            return view

        return await self._store.write(work)

    async def query(self, page: PageRequest, members_limit: int) -> Page[CallView]:
        problems = ViolationCollector()
        limit = resolve_limit(
            members_limit, "members_limit", problems, default=DEFAULT_MEMBERS_LIMIT, maximum=MAX_MEMBERS_LIMIT
        )
        problems.raise_if_any()

        async def work(
            tx: Transaction,
        ) -> tuple[Page[CallView], dict[str, CachedCall], dict[str, frozenset[str]]]:
            caller = await load_caller(tx)
            types = {record.name: record for record in await tx.call_types.list()}
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
            calls = await tx.calls.query(page, reader=reader)
            # A cached entry equal to the row just read is that very state (every change bumps
            # last_seq), so its members, settings and renderings serve; only the other calls are read.
            entries: dict[str, CachedCall] = {}
            fresh: dict[str, CachedCall] = {}
            for call in calls.items:
                entry = self._cache.get(call.cid)
                if entry is not None and entry.call == call:
                    entries[call.cid] = entry
            missing = [call for call in calls.items if call.cid not in entries]
            # With the cache on, read as many members as any read may ask for, so they can fill it.
            members = await tx.members.first(
                [call.cid for call in missing], MAX_MEMBERS_LIMIT if self._cache.enabled else limit
            )
            for call in missing:
                type_settings = types[call.type].settings if call.type in types else {}
                settings = merge_settings(type_settings, call.settings_override)
                entries[call.cid] = fresh[call.cid] = CachedCall(call, settings, members[call.cid])
            capabilities = await capabilities_for_calls(tx, caller, calls.items, grants)
            views = [
                CallView(
                    call,
                    entries[call.cid].settings,
                    entries[call.cid].members[:limit],
                    own_capabilities=ordered_capabilities(capabilities[call.cid]),
                    rendered=entries[call.cid].rendered,
                )
                for call in calls.items
            ]
            return Page(views, calls.next, calls.prev), fresh, capabilities

        generation = self._cache.generation
        found, fresh, capabilities = await self._store.read(work)
        principal = current_principal()
        for cid, entry in fresh.items():
            if "read-call" in capabilities[cid]:  # the cache keeps only principals that may read
                entry.capabilities[principal] = capabilities[cid]
                self._cache.put(cid, entry, generation)
        return found

        return await self._store.read(work)

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

        async def work(tx: Transaction) -> MembersChange:
            call = await live_call(tx, cid, for_update=True)
            await require(tx, await load_caller(tx), call, *needed)
            await self._require_users(
                tx, {f"update_members[{i}].user_id": m.user_id for i, m in enumerate(update_members)}
            )
            now = self._clock()
            before = await tx.members.get_many(cid, [m.user_id for m in update_members])
            records = await self._upsert_members(tx, cid, update_members, now)
            removed = await tx.members.remove(cid, list(dict.fromkeys(remove_members)))
            await tx.calls.refresh_member_counts([cid])
            users = await tx.users.get_many(r.user_id for r in records)
            for record in records:
                record.user = users.get(record.user_id)
            added = [r for r in records if r.user_id not in before]
            updated = [r for r in records if r.user_id in before]
            if added:
                await tx.events.record(cid, MembersAdded(added), now)
            if updated:
                await tx.events.record(cid, MembersUpdated(updated), now)
            if removed:
                await tx.events.record(cid, MembersRemoved(removed), now)
            return MembersChange(records, removed)

        return await self._store.write(work)

    async def query_members(self, call_type: str, call_id: str, page: PageRequest) -> Page[MemberRecord]:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def work(tx: Transaction) -> Page[MemberRecord]:
            call = await live_call(tx, cid)
            await require(tx, await load_caller(tx), call, "read-call")
            return await tx.members.query(cid, page)

        if not self._cache.enabled:
            return await self._store.read(work)
        # Members are part of the call's cached state: any change to them invalidates the entry.
        cached, _have = await self._readable(cid)
        key = _page_key(page)
        found = cached.member_pages.get(key)
        if found is None:
            generation = self._cache.generation
            found = await self._store.read(work)
            if generation == self._cache.generation:
                cached.keep_member_page(key, found)
        return found


def _page_key(page: PageRequest) -> tuple[Any, ...]:
    conditions = json.dumps(page.filter_conditions, sort_keys=True) if page.filter_conditions else ""
    return (conditions, page.sort, page.limit, page.next, page.prev)
