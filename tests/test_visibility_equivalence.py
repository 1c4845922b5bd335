"""The read-call rule exists twice, and this keeps the two equal (issue 11): the SQL predicate QueryCalls
filters with (`store.visibility.calls_with_capability(reader, "read-call")`) and the Python rule every
other RPC checks (`services.authz`: `_denial` + `_granted`, reached through `call_capabilities` and the
batch `capabilities_for_calls`). A third reading, written here from authz's docstring, checks that the two
do not agree on something neither should say.

Exhaustive over (rows written straight into a fresh database, then each rule evaluated on them):
- the user's global role: user / admin / moderator;
- the user's teams: none / red / blue / red and blue;
- the call's team: none / red / blue (so: no team, one of the user's, another);
- the token's call_cids: unlimited / a set including the call / a set excluding it / empty;
- whether the call blocked the user;
- the user's membership: none / member with role user / host / moderator;
- the call type's read-call grant: to nobody / user / moderator / admin / call_member / host (every type
  also grants join-call to everyone, which must not count);
- the user's override in the call: none / read-call granted / read-call revoked / both / another
  capability granted and revoked.
That is 3 × 4 × 3 × 4 × 2 × 4 × 6 × 5 = 34,560 cases per backend.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.auth.tokens import Principal
from callplane_server.domain.records import CallRecord, UserRecord
from callplane_server.services.authz import Caller, call_capabilities, capabilities_for_calls
from callplane_server.store import Store, Transaction
from callplane_server.store.models import (
    CallMemberRow,
    CallRow,
    CallTypeRow,
    PermissionOverrideRow,
    UserRow,
    UserTeamRow,
)
from callplane_server.store.visibility import CallReader, calls_with_capability
from tests.support import fresh_database

READ = "read-call"
OTHER = "join-call"
NOW = datetime(2026, 1, 1, tzinfo=UTC)

ROLES = ("user", "admin", "moderator")
USER_TEAMS: tuple[tuple[str, ...], ...] = ((), ("red",), ("blue",), ("red", "blue"))
CALL_TEAMS = (None, "red", "blue")
BLOCKED = (False, True)
MEMBERSHIPS = (None, "user", "host", "moderator")
#: Who the call type grants read-call to (None: nobody).
GRANTEES = (None, "user", "moderator", "admin", "call_member", "host")
#: (granted, revoked) per-user overrides; None: no override row.
OVERRIDES: tuple[tuple[list[str], list[str]] | None, ...] = (
    None,
    ([READ], []),
    ([], [READ]),
    ([READ], [READ]),
    ([OTHER], [OTHER]),
)
SCOPES = ("unlimited", "includes", "excludes", "empty")


@dataclass(frozen=True)
class Relation:
    """What one user is to every call: blocked or not, member role, override."""

    blocked: bool
    member_role: str | None
    override: tuple[list[str], list[str]] | None

    @property
    def key(self) -> str:
        return f"{int(self.blocked)}{self.member_role or '-'}{OVERRIDES.index(self.override)}"


RELATIONS = [Relation(*combination) for combination in itertools.product(BLOCKED, MEMBERSHIPS, OVERRIDES)]


@dataclass(frozen=True)
class Reader:
    user_id: str
    role: str
    teams: tuple[str, ...]
    relation: Relation


READERS = [
    Reader(f"u-{role}-{'+'.join(teams) or 'none'}-{relation.key}", role, teams, relation)
    for role, teams, relation in itertools.product(ROLES, USER_TEAMS, RELATIONS)
]


@dataclass(frozen=True)
class CallShape:
    team: str | None
    grantee: str | None

    @property
    def type_name(self) -> str:
        return f"grant-{self.grantee or 'nobody'}"

    @property
    def cid(self) -> str:
        return f"{self.type_name}:team-{self.team or 'none'}"


CALLS = [CallShape(team, grantee) for grantee, team in itertools.product(GRANTEES, CALL_TEAMS)]
# Two complementary token scopes: every call is in one of them and not in the other.
SCOPE_A = frozenset(shape.cid for index, shape in enumerate(CALLS) if index % 2 == 0)
SCOPE_B = frozenset(shape.cid for index, shape in enumerate(CALLS) if index % 2 == 1)
SCOPE_SETS: dict[str, frozenset[str] | None] = {
    "unlimited": None,
    "a": SCOPE_A,
    "b": SCOPE_B,
    "empty": frozenset(),
}


def grants_of(shape: CallShape) -> dict[str, list[str]]:
    grants: dict[str, list[str]] = {role: [OTHER] for role in (*ROLES, "call_member", "host")}
    if shape.grantee is not None:
        grants[shape.grantee] = [OTHER, READ]
    return grants


def scope_case(scope: frozenset[str] | None, cid: str) -> str:
    if scope is None:
        return "unlimited"
    if not scope:
        return "empty"
    return "includes" if cid in scope else "excludes"


def expected(reader: Reader, shape: CallShape, scope: frozenset[str] | None) -> bool:
    """authz's docstring, read plainly: no capability outside the token's scope, in another team's call
    (unless a global admin) or when blocked; else the grants of the global role, and of `call_member` and
    the member role for a member (a global admin: every capability), plus granted, minus revoked."""
    relation = reader.relation
    if scope is not None and shape.cid not in scope:
        return False
    if shape.team is not None and shape.team not in reader.teams and reader.role != "admin":
        return False
    if relation.blocked:
        return False
    granted, revoked = relation.override or ([], [])
    if READ in revoked:
        return False
    if reader.role == "admin" or READ in granted:
        return True
    roles = {reader.role} | ({"call_member", relation.member_role} if relation.member_role else set())
    return shape.grantee in roles


# --- the database --------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Store]:
    async with fresh_database(backend, tmp_path_factory.mktemp(f"visibility-{backend}")) as url:
        opened = await Store.open(url)
        try:
            await opened.database.run(_fill, write=True)
            yield opened
        finally:
            await opened.close()


async def _fill(session: AsyncSession) -> None:
    """Every reader, and every call shape with each reader related to it as the reader's relation says."""
    stamp = {"created_at": NOW, "updated_at": NOW}
    await session.execute(
        insert(CallTypeRow),
        [
            {"name": name, "settings": {}, "grants": grants_of(shape), **stamp}
            for name, shape in {shape.type_name: shape for shape in CALLS}.items()
        ],
    )
    await session.execute(
        insert(UserRow),
        [{"id": r.user_id, "name": r.user_id, "role": r.role, "custom": {}, **stamp} for r in READERS],
    )
    await session.execute(
        insert(UserTeamRow), [{"user_id": r.user_id, "team": team} for r in READERS for team in r.teams]
    )
    blocked = sorted(r.user_id for r in READERS if r.relation.blocked)
    members = [r for r in READERS if r.relation.member_role is not None]
    overridden = [r for r in READERS if r.relation.override is not None]
    for shape in CALLS:
        call_type, _, call_id = shape.cid.partition(":")
        await session.execute(
            insert(CallRow),
            [
                {
                    "cid": shape.cid,
                    "type": call_type,
                    "id": call_id,
                    "team": shape.team,
                    "custom": {},
                    "settings_override": {},
                    "backstage": False,
                    "ongoing": False,
                    "member_count": len(members),
                    "version": 1,
                    "last_seq": 0,
                    "pins": [],
                    "blocked_user_ids": blocked,
                    **stamp,
                }
            ],
        )
        await session.execute(
            insert(CallMemberRow),
            [
                {
                    "call_cid": shape.cid,
                    "user_id": r.user_id,
                    "role": r.relation.member_role,
                    "custom": {},
                    **stamp,
                }
                for r in members
            ],
        )
        await session.execute(
            insert(PermissionOverrideRow),
            [
                {
                    "call_cid": shape.cid,
                    "user_id": r.user_id,
                    "granted": r.relation.override[0],
                    "revoked": r.relation.override[1],
                }
                for r in overridden
                if r.relation.override is not None
            ],
        )


# --- the three readings --------------------------------------------------------------------------------


@dataclass
class Verdicts:
    sql: bool
    call_capabilities: bool
    capabilities_for_calls: bool
    expected: bool

    @property
    def agree(self) -> bool:
        return self.sql == self.call_capabilities == self.capabilities_for_calls == self.expected


async def _evaluate(store: Store) -> dict[tuple[str, str, str], Verdicts]:
    """(user id, scope name, cid) → what each reading says about read-call."""
    grants = {shape.type_name: grants_of(shape) for shape in CALLS}
    sql: dict[tuple[str, str], set[str]] = {}

    async def visible(session: AsyncSession) -> None:
        for reader, (scope_name, scope) in itertools.product(READERS, SCOPE_SETS.items()):
            predicate = calls_with_capability(
                CallReader(reader.user_id, reader.role, reader.teams, scope, grants), READ
            )
            sql[reader.user_id, scope_name] = set(await session.scalars(select(CallRow.cid).where(predicate)))

    await store.database.run(visible, write=False)

    shapes = {shape.cid: shape for shape in CALLS}
    verdicts: dict[tuple[str, str, str], Verdicts] = {}

    async def python(tx: Transaction) -> None:
        records: dict[str, CallRecord] = {}
        for cid in shapes:
            record = await tx.calls.get(cid)
            assert record is not None
            records[cid] = record
        users = await tx.users.get_many([reader.user_id for reader in READERS])
        for reader, (scope_name, scope) in itertools.product(READERS, SCOPE_SETS.items()):
            user: UserRecord = users[reader.user_id]
            caller = Caller(Principal(user_id=reader.user_id, call_cids=scope), user)
            batch = await capabilities_for_calls(tx, caller, list(records.values()), grants)
            for cid, record in records.items():
                single = await call_capabilities(tx, caller, record)
                verdicts[reader.user_id, scope_name, cid] = Verdicts(
                    sql=cid in sql[reader.user_id, scope_name],
                    call_capabilities=READ in single,
                    capabilities_for_calls=READ in batch[cid],
                    expected=expected(reader, shapes[cid], scope),
                )

    await store.read(python)
    return verdicts


def _describe(key: tuple[str, str, str], verdicts: Verdicts) -> str:
    user_id, scope_name, cid = key
    reader = next(r for r in READERS if r.user_id == user_id)
    shape = next(s for s in CALLS if s.cid == cid)
    relation = reader.relation
    case = {
        "role": reader.role,
        "user teams": list(reader.teams),
        "call team": shape.team,
        "token scope": scope_case(SCOPE_SETS[scope_name], cid),
        "blocked": relation.blocked,
        "member role": relation.member_role,
        "read-call granted to": shape.grantee,
        "override (granted, revoked)": relation.override,
    }
    said = {
        "SQL calls_with_capability": verdicts.sql,
        "call_capabilities": verdicts.call_capabilities,
        "capabilities_for_calls": verdicts.capabilities_for_calls,
        "authz docstring": verdicts.expected,
    }
    return f"{case} -> {said}"


def test_every_case_is_covered() -> None:
    """The matrix really spans the axes the module docstring lists (scope cases per call included)."""
    seen: set[tuple[Any, ...]] = set()
    for reader, shape, scope in itertools.product(READERS, CALLS, SCOPE_SETS.values()):
        relation = reader.relation
        seen.add(
            (
                reader.role,
                reader.teams,
                shape.team,
                scope_case(scope, shape.cid),
                relation.blocked,
                relation.member_role,
                shape.grantee,
                OVERRIDES.index(relation.override),
            )
        )
    expected_size = (
        len(ROLES)
        * len(USER_TEAMS)
        * len(CALL_TEAMS)
        * len(SCOPES)
        * len(BLOCKED)
        * len(MEMBERSHIPS)
        * len(GRANTEES)
        * len(OVERRIDES)
    )
    assert len(seen) == expected_size == 34_560


async def test_sql_predicate_and_python_rule_agree(store: Store) -> None:
    verdicts = await _evaluate(store)
    assert len(verdicts) == len(READERS) * len(SCOPE_SETS) * len(CALLS)
    readable = sum(v.sql for v in verdicts.values())
    assert 0 < readable < len(verdicts), "a degenerate matrix: nothing or everything readable"
    disagreements = [(key, v) for key, v in verdicts.items() if not v.agree]
    shown = "\n".join(_describe(key, v) for key, v in disagreements[:25])
    assert not disagreements, (
        f"{len(disagreements)} of {len(verdicts)} cases disagree on read-call (first 25):\n{shown}"
    )
