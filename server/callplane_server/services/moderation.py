"""Per-call permissions and moderation: UpdateUserPermissions, RequestPermission, BlockUser, UnblockUser,
KickUser.

Per-user overrides are kept as (granted, revoked) per user and call (tx.permissions) and applied on top
of the call type's role grants by services/authz.py. Blocking adds the user to the call's
`blocked_user_ids` (authz then gives them nothing in the call, so they cannot join) and removes their
live participants; kicking removes them (and blocks with `block`)."""

from __future__ import annotations

from collections.abc import Sequence

from callplane_server.auth.tokens import Principal
from callplane_server.domain.call import Call
from callplane_server.domain.capabilities import KNOWN_CAPABILITIES
from callplane_server.domain.events import (
    PermissionRequested,
    PermissionsUpdated,
    UserBlocked,
    UserKicked,
    UserUnblocked,
)
from callplane_server.domain.validation import USER_ID, check_call_key, check_pattern
from callplane_server.errors import NotFound, ViolationCollector
from callplane_server.services.authz import Caller, call_capabilities
from callplane_server.services.call_lookup import caller_of, open_call
from callplane_server.services.clock import Clock
from callplane_server.services.sessions import SessionService
from callplane_server.store import Store, Transaction

# call.session_participant_left reasons for moderation.
KICKED = "kicked"
BLOCKED = "blocked"

#: Capabilities one request may name at most (there are only ~20).
MAX_PERMISSIONS = 50


def _check_capabilities(values: Sequence[str], name: str, problems: ViolationCollector) -> None:
    if len(values) > MAX_PERMISSIONS:
        problems.add(name, f"at most {MAX_PERMISSIONS} capabilities, got {len(values)}")
        return
    for index, value in enumerate(values):
        if value not in KNOWN_CAPABILITIES:
            problems.add(f"{name}[{index}]", f"{value!r} is not a known capability")


async def user_capabilities(tx: Transaction, call: Call, user_id: str) -> frozenset[str]:
    """What one user (acting with an unscoped user token) may do in the call."""
    user = (await tx.users.get_many([user_id])).get(user_id)
    if user is None:
        return frozenset()
    return await call_capabilities(tx, Caller(Principal(user_id=user_id), user), call.record, call.grants)


class ModerationService:
    def __init__(self, store: Store, clock: Clock, sessions: SessionService) -> None:
        self._store = store
        self._clock = clock
        self._sessions = sessions

    @staticmethod
    def _key(call_type: str, call_id: str, user_id: str | None = None) -> ViolationCollector:
        problems = ViolationCollector()
        check_call_key(call_type, call_id, problems)
        if user_id is not None:
            check_pattern(user_id, USER_ID, "user_id", "user id", problems)
        return problems

    @staticmethod
    async def _existing_user(tx: Transaction, user_id: str) -> None:
        if not await tx.users.existing_ids([user_id]):
            raise NotFound(
                f"user {user_id!r} does not exist", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
            )

    # -- permissions -------------------------------------------------------------------------------

    async def update_user_permissions(
        self, call_type: str, call_id: str, user_id: str, grant: Sequence[str], revoke: Sequence[str]
    ) -> list[str]:
        problems = self._key(call_type, call_id, user_id)
        _check_capabilities(grant, "grant_permissions", problems)
        _check_capabilities(revoke, "revoke_permissions", problems)
        both = sorted(set(grant) & set(revoke))
        if both:
            problems.add("revoke_permissions", f"both granted and revoked: {', '.join(both)}")
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def update_permissions(tx: Transaction) -> list[str]:
            call = await open_call(tx, cid, "update-call-permissions", now=self._clock())
            await self._existing_user(tx, user_id)
            old_granted, old_revoked = await tx.permissions.get(cid, user_id)
            granted = sorted((set(old_granted) | set(grant)) - set(revoke))
            revoked = sorted((set(old_revoked) | set(revoke)) - set(grant))
            await tx.permissions.save(cid, user_id, granted, revoked)
            capabilities = sorted(await user_capabilities(tx, call, user_id))
            call.record_event(PermissionsUpdated(user_id, capabilities), recipients=[user_id])
            return capabilities

        return await self._store.write(update_permissions)

    async def request_permission(self, call_type: str, call_id: str, permissions: Sequence[str]) -> None:
        problems = self._key(call_type, call_id)
        _check_capabilities(permissions, "permissions", problems)
        if not permissions:
            problems.add("permissions", "name at least one capability")
        problems.raise_if_any()
        cid = f"{call_type}:{call_id}"
        wanted = list(dict.fromkeys(permissions))

        async def request(tx: Transaction) -> None:
            call = await open_call(tx, cid, "read-call", now=self._clock())
            caller = await caller_of(tx, call)
            if caller.is_server:
                return  # a server token has every capability and asks on nobody's behalf
            candidates = list(dict.fromkeys(await tx.rings.member_ids(cid)))
            if call.record.current_session_id:
                live = await tx.sessions.live_participants(call.record.current_session_id)
                candidates.extend(p.user_id for p in live if p.user_id not in candidates)
            recipients = [
                candidate
                for candidate in candidates
                if candidate != caller.user_id
                and "update-call-permissions" in await user_capabilities(tx, call, candidate)
            ]
            call.record_event(PermissionRequested(caller.user_id or "", wanted), recipients=recipients)

        await self._store.write(request)

    # -- moderation --------------------------------------------------------------------------------

    async def _remove_live(self, tx: Transaction, call: Call, user_id: str, reason: str) -> None:
        if not call.record.current_session_id:
            return
        for participant in await tx.sessions.live_participants(call.record.current_session_id):
            if participant.user_id == user_id:
                await self._sessions.remove_participant(tx, call, participant, reason)

    @staticmethod
    def _tell(call: Call, happened: type[UserBlocked | UserUnblocked | UserKicked], user_id: str) -> None:
        """Records a moderation event, addressed to the user it happened to."""
        by = call.caller.user_id if call.caller is not None else None
        call.record_event(happened(user_id, by or ""), recipients=[user_id])

    async def block_user(self, call_type: str, call_id: str, user_id: str) -> None:
        self._key(call_type, call_id, user_id).raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def block(tx: Transaction) -> None:
            call = await open_call(tx, cid, "block-users", now=self._clock())
            await self._existing_user(tx, user_id)
            if call.block(user_id):
                await self._remove_live(tx, call, user_id, BLOCKED)
                self._tell(call, UserBlocked, user_id)

        await self._store.write(block)

    async def unblock_user(self, call_type: str, call_id: str, user_id: str) -> None:
        self._key(call_type, call_id, user_id).raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def unblock(tx: Transaction) -> None:
            call = await open_call(tx, cid, "block-users", now=self._clock())
            if call.unblock(user_id):  # unblocking is idempotent
                self._tell(call, UserUnblocked, user_id)

        await self._store.write(unblock)

    async def kick_user(self, call_type: str, call_id: str, user_id: str, *, block: bool) -> None:
        self._key(call_type, call_id, user_id).raise_if_any()
        cid = f"{call_type}:{call_id}"

        async def kick(tx: Transaction) -> None:
            call = await open_call(
                tx, cid, "kick-user", *(["block-users"] if block else []), now=self._clock()
            )
            await self._existing_user(tx, user_id)
            newly_blocked = block and call.block(user_id)
            await self._remove_live(tx, call, user_id, KICKED)
            self._tell(call, UserKicked, user_id)
            if newly_blocked:
                self._tell(call, UserBlocked, user_id)

        await self._store.write(kick)
