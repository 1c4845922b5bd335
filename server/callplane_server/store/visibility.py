"""Who may see which rows, as SQL conditions: the calls a user may read (QueryCalls) and the users a user
may see (QueryUsers). The services pass plain data; the rules mirror services/authz.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, exists, false, or_, true

from callplane_server.store.models import CallMemberRow, CallRow, PermissionOverrideRow, UserRow, UserTeamRow
from callplane_server.store.query.jsonsql import JsonArrayContains


@dataclass(frozen=True)
class CallReader:
    """A user reading calls: its global role, teams, the token's call scope (None: any call), and every
    call type's grants (type → role → capabilities)."""

    user_id: str
    role: str
    teams: Sequence[str]
    call_cids: frozenset[str] | None
    grants: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)


def _contains(column: object, value: str) -> ColumnElement[bool]:
    return JsonArrayContains(column, (), "string", value)


def calls_with_capability(reader: CallReader, capability: str) -> ColumnElement[bool]:
    """Calls in which `reader` has `capability`: the call is of one of its teams (or has none), within
    the token's scope, does not block the user, and the capability comes from the grants of its global
    role, of `call_member` / its member role when it is a member, or a per-user grant, and is not revoked
    for the user."""
    conditions: list[ColumnElement[bool]] = []
    if reader.call_cids is not None:
        conditions.append(CallRow.cid.in_(sorted(reader.call_cids)) if reader.call_cids else false())
    teams = sorted(set(reader.teams))
    if reader.role != "admin":  # a global admin operates across teams
        conditions.append(
            or_(CallRow.team.is_(None), CallRow.team.in_(teams)) if teams else CallRow.team.is_(None)
        )
    conditions.append(~_contains(CallRow.blocked_user_ids, reader.user_id))

    if reader.role == "admin":
        by_role: ColumnElement[bool] = true()
    else:
        role_types = sorted(t for t, g in reader.grants.items() if capability in g.get(reader.role, ()))
        by_role = CallRow.type.in_(role_types) if role_types else false()
    member_types = sorted(t for t, g in reader.grants.items() if capability in g.get("call_member", ()))
    by_member_role = [
        and_(CallRow.type == call_type, CallMemberRow.role.in_(roles))
        for call_type, grants in sorted(reader.grants.items())
        if (roles := sorted(role for role, caps in grants.items() if capability in caps))
    ]
    member_grants = or_(CallRow.type.in_(member_types) if member_types else false(), *by_member_role)
    as_member = exists().where(
        CallMemberRow.call_cid == CallRow.cid, CallMemberRow.user_id == reader.user_id, member_grants
    )
    override = (
        PermissionOverrideRow.call_cid == CallRow.cid,
        PermissionOverrideRow.user_id == reader.user_id,
    )
    granted = exists().where(*override, _contains(PermissionOverrideRow.granted, capability))
    revoked = exists().where(*override, _contains(PermissionOverrideRow.revoked, capability))
    conditions.append(or_(by_role, as_member, granted))
    conditions.append(~revoked)
    return and_(*conditions)


def users_visible_to(teams: Sequence[str]) -> ColumnElement[bool]:
    """Users sharing at least one of `teams`; with no teams, the users that have no team either."""
    if teams:
        return exists().where(UserTeamRow.user_id == UserRow.id, UserTeamRow.team.in_(sorted(set(teams))))
    return ~exists().where(UserTeamRow.user_id == UserRow.id)
