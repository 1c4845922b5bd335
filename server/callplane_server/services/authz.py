"""Authorization: what the caller may do in a call.

A call's capabilities for a user are the union of the call type's grants for the user's global role,
for `call_member` and the member's call role when the user is a member, plus per-user grants minus
per-user revocations (UpdateUserPermissions). The global role `admin` has every capability. A user gets
none in a call of a team they are not in (unless they are a global admin), in a call outside their
token's `call_cids`, or in a call that blocked them. A server token may do everything.

RPC_RULES below is the one table of which capability each RPC checks (the README shows it, and a test
keeps the two equal). The API layer refuses to register an RPC that has no entry (`rule_for`), so a new
RPC cannot be served before its rule is written down here (and the authorization matrix test fails until
it has a row)."""

from __future__ import annotations

from callplane_server.auth.context import current_principal
from callplane_server.domain.caller import Caller as Caller  # services name the caller through authz
from callplane_server.domain.capabilities import CAPABILITIES
from callplane_server.domain.records import CallRecord, UserRecord
from callplane_server.errors import PermissionDenied
from callplane_server.store import Transaction

ALL_CAPABILITIES = frozenset(CAPABILITIES)
#: A user's standing in a call when already loaded: (member role or None, (granted, revoked) overrides).
Standing = tuple[str | None, tuple[list[str], list[str]]]
SERVER_OR_ADMIN = "server token or global admin"

#: service/RPC → what is checked. Capability names are checked on the call; other entries are rules.
RPC_RULES: dict[str, str] = {
    "CallTypeService/CreateCallType": SERVER_OR_ADMIN,
    "CallTypeService/GetCallType": "any authenticated caller",
    "CallTypeService/ListCallTypes": "any authenticated caller",
    "CallTypeService/UpdateCallType": SERVER_OR_ADMIN,
    "CallTypeService/DeleteCallType": SERVER_OR_ADMIN,
    "UserService/UpsertUsers": SERVER_OR_ADMIN
    + ", or a user upserting only themselves (role and teams unchanged)",
    "UserService/UpdateUsersPartial": SERVER_OR_ADMIN
    + ", or a user updating only themselves (not role or teams)",
    "UserService/QueryUsers": "any authenticated caller; user tokens see only users sharing a team",
    "UserService/DeleteUsers": SERVER_OR_ADMIN,
    "CallService/GetOrCreateCall": "create-call to create (created_by is the caller); read-call to get",
    "CallService/GetCall": "read-call",
    "CallService/UpdateCall": "update-call (+ update-call-settings for settings_override, "
    "+ change-max-duration for limits.max_duration_seconds)",
    "CallService/EndCall": "end-call",
    "CallService/DeleteCall": SERVER_OR_ADMIN,
    "CallService/QueryCalls": "returns only calls with read-call",
    "CallService/UpdateCallMembers": "update-call-member (update_members), remove-call-member (removals)",
    "CallService/QueryMembers": "read-call",
    "SessionService/JoinCall": "join-call as oneself (+ join-backstage in backstage, "
    "+ join-ended-call if ended); blocked users never",
    "SessionService/LeaveCall": "own participant",
    "SessionService/KeepAlive": "own participant",
    "SessionService/UpdateParticipant": "own participant, with send-audio / send-video / screenshare",
    "SessionService/QueryCallParticipants": "read-call",
    "SessionService/QueryCallSessions": "read-call",
    "SessionService/GoLive": "update-call",
    "SessionService/StopLive": "update-call",
    "RingService/RingCall": "create-call, as oneself",
    "RingService/AcceptCall": "read-call, as oneself",
    "RingService/RejectCall": "read-call, as oneself",
    "CallDataService/UpdateParticipantCustom": "own participant",
    "CallDataService/UpdateSessionCustom": "a live participant of the session, as oneself",
    "CallDataService/SendCallEvent": "create-reaction, as oneself",
    "CallDataService/PinParticipant": "pin-for-everyone",
    "CallDataService/UnpinParticipant": "pin-for-everyone",
    "EventService/WatchCall": "read-call (+ own participant when holding presence)",
    "EventService/WatchUser": "oneself",
    "EventService/SubscribeEvents": "server or admin; user tokens must list call_cids, each with read-call",
    "ModerationService/UpdateUserPermissions": "update-call-permissions",
    "ModerationService/RequestPermission": "read-call, as oneself",
    "ModerationService/BlockUser": "block-users",
    "ModerationService/UnblockUser": "block-users",
    "ModerationService/KickUser": "kick-user (+ block-users with block)",
    "WebhookService/CreateWebhook": SERVER_OR_ADMIN,
    "WebhookService/GetWebhook": SERVER_OR_ADMIN,
    "WebhookService/ListWebhooks": SERVER_OR_ADMIN,
    "WebhookService/UpdateWebhook": SERVER_OR_ADMIN,
    "WebhookService/DeleteWebhook": SERVER_OR_ADMIN,
    "WebhookService/RotateWebhookSecret": SERVER_OR_ADMIN,
    "WebhookService/ResumeWebhook": SERVER_OR_ADMIN,
    "WebhookService/ListWebhookDeliveries": SERVER_OR_ADMIN,
    "WebhookService/RedeliverWebhook": SERVER_OR_ADMIN,
}


PACKAGE = "callplane.v1"


class MissingRule(RuntimeError):
    """An RPC without an entry in RPC_RULES: the server refuses to start rather than serve it unchecked."""


def rule_for(method: str) -> str:
    """The RPC_RULES entry of a full method name ("/callplane.v1.CallService/GetCall")."""
    service, _, rpc = method.removeprefix("/").partition("/")
    package, _, service_name = service.rpartition(".")
    rule = RPC_RULES.get(f"{service_name}/{rpc}") if package == PACKAGE else None
    if rule is None:
        raise MissingRule(
            f"{method} has no entry in RPC_RULES (services/authz.py): write down what it checks, "
            "and give it a row in the authorization matrix test"
        )
    return rule


async def load_caller(tx: Transaction) -> Caller:
    principal = current_principal()
    if principal.is_server:
        return Caller(principal, None)
    assert principal.user_id is not None
    users = await tx.users.get_many([principal.user_id])
    # A token may name a user that does not exist yet: a plain `user` with no teams.
    return Caller(principal, users.get(principal.user_id) or UserRecord(id=principal.user_id))


def _denied(message: str, reason: str, **metadata: object) -> PermissionDenied:
    return PermissionDenied(message, reason=reason, metadata=metadata)


async def call_capabilities(
    tx: Transaction,
    caller: Caller,
    call: CallRecord,
    grants: dict[str, list[str]] | None = None,
    *,
    standing: Standing | None = None,
) -> frozenset[str]:
    """Everything the caller may do in the call (empty when it may not see the call at all).
    `standing`: the user's, when the caller has it already."""
    if caller.is_server:
        return ALL_CAPABILITIES
    return (await _explain(tx, caller, call, grants, standing))[0]


def _denial(caller: Caller, call: CallRecord) -> str:
    """Why the caller has no capabilities at all in the call ("" if it may have some)."""
    user = caller.user
    assert user is not None
    scope = caller.principal.call_cids
    if scope is not None and call.cid not in scope:
        return "CALL_NOT_IN_TOKEN_SCOPE"
    # The global admin role is the operator's: it reaches across teams, as QueryUsers and
    # SubscribeEvents already let it.
    if call.team and call.team not in user.teams and user.role != "admin":
        return "TEAM_MISMATCH"
    if user.id in call.blocked_user_ids:
        return "USER_BLOCKED"
    return ""


def _granted(
    user: UserRecord,
    grants: dict[str, list[str]],
    member_role: str | None,
    overrides: tuple[list[str], list[str]],
) -> frozenset[str]:
    roles = {user.role}
    if member_role is not None:
        roles |= {"call_member", member_role}
    capabilities: set[str] = set()
    for role in roles:
        capabilities |= set(grants.get(role, []))
    if user.role == "admin":
        capabilities = set(ALL_CAPABILITIES)
    granted, revoked = overrides
    return frozenset((capabilities | set(granted)) - set(revoked))


async def _explain(
    tx: Transaction,
    caller: Caller,
    call: CallRecord,
    grants: dict[str, list[str]] | None = None,
    standing: Standing | None = None,
) -> tuple[frozenset[str], str]:
    """(capabilities, why they are empty: a reason code or ""). `grants`: the call type's, when known."""
    why = _denial(caller, call)
    if why:
        return frozenset(), why
    user = caller.user
    assert user is not None
    if grants is None:
        call_type = await tx.call_types.get(call.type)
        grants = call_type.grants if call_type else {}
    if standing is None:
        standing = (await tx.members.role_of(call.cid, user.id), await tx.permissions.get(call.cid, user.id))
    role, overrides = standing
    return _granted(user, grants, role, overrides), ""


async def capabilities_for_calls(
    tx: Transaction, caller: Caller, calls: list[CallRecord], grants_by_type: dict[str, dict[str, list[str]]]
) -> dict[str, frozenset[str]]:
    """call_capabilities for a page of calls with two queries in all, not three per call."""
    if caller.is_server:
        return {call.cid: ALL_CAPABILITIES for call in calls}
    user = caller.user
    assert user is not None
    cids = [call.cid for call in calls]
    member_roles = await tx.members.roles_of(user.id, cids)
    overrides = await tx.permissions.for_user(user.id, cids)
    return {
        call.cid: frozenset()
        if _denial(caller, call)
        else _granted(
            user,
            grants_by_type.get(call.type, {}),
            member_roles.get(call.cid),
            overrides.get(call.cid, ([], [])),
        )
        for call in calls
    }


async def require(
    tx: Transaction,
    caller: Caller,
    call: CallRecord,
    *capabilities: str,
    grants: dict[str, list[str]] | None = None,
    standing: Standing | None = None,
) -> frozenset[str]:
    """Raises PERMISSION_DENIED naming the first missing capability; returns all the caller has.
    `grants`: the call type's, `standing`: the user's in the call, when the caller has them already."""
    if caller.is_server:
        return ALL_CAPABILITIES
    have, why = await _explain(tx, caller, call, grants, standing)
    if why:
        messages = {
            "CALL_NOT_IN_TOKEN_SCOPE": "this token is limited to other calls",
            "TEAM_MISMATCH": f"call {call.cid!r} belongs to a team the user is not in",
            "USER_BLOCKED": f"user {caller.user_id!r} is blocked from call {call.cid!r}",
        }
        raise _denied(messages[why], why, cid=call.cid, user_id=caller.user_id)
    for capability in capabilities:
        if capability not in have:
            raise _denied(
                f"user {caller.user_id!r} lacks the {capability!r} capability in call {call.cid!r}",
                "MISSING_CAPABILITY",
                capability=capability,
                cid=call.cid,
                user_id=caller.user_id,
            )
    return have


def require_admin(caller: Caller, what: str) -> None:
    if not caller.is_admin:
        raise _denied(
            f"{what} needs a server token or a global admin", "ADMIN_REQUIRED", user_id=caller.user_id
        )


def require_self(caller: Caller, user_id: str, field: str = "user_id") -> None:
    """User tokens act only as themselves."""
    if caller.is_server or caller.user_id == user_id:
        return
    raise _denied(
        f"a token for {caller.user_id!r} cannot act as {user_id!r}",
        "NOT_YOURSELF",
        field=field,
        user_id=caller.user_id,
        requested_user_id=user_id,
    )
