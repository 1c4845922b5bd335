"""User rules: batch upserts, dotted-path partial updates, queries and deletion with memberships."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callplane_server.domain.custom_data import apply_set, apply_unset, split_path
from callplane_server.domain.events import MembersRemoved
from callplane_server.domain.records import Page, PageRequest, UserRecord
from callplane_server.domain.validation import (
    MAX_BATCH,
    ROLE_NAME,
    TEAM_NAME,
    USER_ID,
    check_custom_depth,
    check_custom_size,
    check_pattern,
)
from callplane_server.errors import NotFound, ViolationCollector
from callplane_server.services.authz import Caller, load_caller, require_admin, require_self
from callplane_server.services.clock import Clock
from callplane_server.services.limits import Limits
from callplane_server.store import Store, Transaction

_SETTABLE = {"name", "image", "role", "teams", "custom"}


@dataclass
class UserInput:
    id: str
    name: str = ""
    image: str = ""
    role: str = ""
    teams: list[str] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass
class UserPatch:
    id: str
    set: dict[str, Any] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)


def users_not_found(missing: list[str]) -> NotFound:
    return NotFound(
        f"unknown user(s): {', '.join(missing)}",
        reason="USER_NOT_FOUND",
        metadata={"user_ids": ",".join(missing)},
    )


def check_batch(
    ids: list[str], field_name: str, problems: ViolationCollector, *, id_suffix: str = ".id"
) -> None:
    if not ids:
        problems.add(field_name, "must not be empty")
    if len(ids) > MAX_BATCH:
        problems.add(field_name, f"at most {MAX_BATCH} per request, got {len(ids)}")
    seen: set[str] = set()
    for index, user_id in enumerate(ids):
        if user_id in seen:
            problems.add(f"{field_name}[{index}]{id_suffix}", f"duplicate id {user_id!r}")
        seen.add(user_id)


def check_user_fields(
    prefix: str, *, role: str | None, teams: list[str] | None, name: str | None, problems: ViolationCollector
) -> None:
    if role is not None and role and not ROLE_NAME.fullmatch(role):
        problems.add(f"{prefix}.role", f"{role!r} is not a valid role (1..64 of a-z 0-9 _ -)")
    for index, team in enumerate(teams or []):
        if not isinstance(team, str) or not TEAM_NAME.fullmatch(team):
            problems.add(f"{prefix}.teams[{index}]", f"{team!r} is not a valid team (1..64 characters)")
    if name is not None and len(name) > 256:
        problems.add(f"{prefix}.name", "at most 256 characters")


class UserService:
    def __init__(self, store: Store, clock: Clock, limits: Limits) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits

    async def upsert(self, users: list[UserInput]) -> list[UserRecord]:
        problems = ViolationCollector()
        check_batch([u.id for u in users], "users", problems)
        for index, user in enumerate(users):
            prefix = f"users[{index}]"
            check_pattern(
                user.id, USER_ID, f"{prefix}.id", "user id (1..128 of A-Z a-z 0-9 @ _ - .)", problems
            )
            check_user_fields(prefix, role=user.role, teams=user.teams, name=user.name, problems=problems)
            check_custom_size(user.custom, self._limits.max_user_custom_bytes, f"{prefix}.custom", problems)
        problems.raise_if_any()

        async def work(tx: Transaction) -> list[UserRecord]:
            caller = await load_caller(tx)
            existing = await tx.users.get_many(u.id for u in users)
            if not caller.is_admin:
                self._check_self_upsert(caller, users, existing)
            now = self._clock()
            records = [
                UserRecord(
                    id=u.id,
                    name=u.name,
                    image=u.image,
                    role=u.role or "user",
                    teams=sorted(set(u.teams)),
                    custom=u.custom,
                    created_at=existing[u.id].created_at if u.id in existing else now,
                    updated_at=now,
                )
                for u in users
            ]
            await tx.users.save(records)
            return records

        return await self._store.write(work)

    @staticmethod
    def _check_self_upsert(caller: Caller, users: list[UserInput], existing: dict[str, UserRecord]) -> None:
        """A user token upserts only itself, keeping its role and teams (a new user: role `user`, no
        teams)."""
        for index, user in enumerate(users):
            require_self(caller, user.id, f"users[{index}].id")
        for user in users:
            stored = existing.get(user.id)
            role, teams = (stored.role, sorted(stored.teams)) if stored else ("user", [])
            if (user.role or "user") != role or sorted(set(user.teams)) != teams:
                require_admin(caller, "changing a user's role or teams")

    async def update_partial(self, patches: list[UserPatch]) -> list[UserRecord]:
        problems = ViolationCollector()
        check_batch([p.id for p in patches], "users", problems)
        for index, patch in enumerate(patches):
            self._check_patch(index, patch, problems)
        problems.raise_if_any()

        async def work(tx: Transaction) -> list[UserRecord]:
            caller = await load_caller(tx)
            if not caller.is_admin:
                for index, patch in enumerate(patches):
                    require_self(caller, patch.id, f"users[{index}].id")
                    touched = {path.split(".", 1)[0] for path in [*patch.set, *patch.unset]}
                    if touched & {"role", "teams"}:
                        require_admin(caller, "changing a user's role or teams")
            existing = await tx.users.get_many(p.id for p in patches)
            missing = [p.id for p in patches if p.id not in existing]
            if missing:
                raise users_not_found(missing)
            now = self._clock()
            updated: list[UserRecord] = []
            violations = ViolationCollector()
            for index, patch in enumerate(patches):
                record = existing[patch.id]
                self._apply(record, patch)
                record.updated_at = now
                check_custom_size(
                    record.custom, self._limits.max_user_custom_bytes, f"users[{index}].custom", violations
                )
                if any("." in path for path in patch.set):
                    check_custom_depth(record.custom, f"users[{index}].custom", violations)
                updated.append(record)
            violations.raise_if_any()
            await tx.users.save(updated)
            return updated

        return await self._store.write(work)

    @staticmethod
    def _check_patch(index: int, patch: UserPatch, problems: ViolationCollector) -> None:
        prefix = f"users[{index}]"
        check_pattern(patch.id, USER_ID, f"{prefix}.id", "user id", problems)
        for path, value in patch.set.items():
            field_name = f"{prefix}.set.{path}"
            head = path.split(".", 1)[0]
            if head not in _SETTABLE or (head != "custom" and "." in path):
                problems.add(
                    field_name, f"cannot set {path!r}: settable paths are name image role teams custom[.path]"
                )
                continue
            if head == "custom" and "." in path:
                split_path(path.split(".", 1)[1], field_name, problems)
            elif head in ("name", "image", "role") and not isinstance(value, str):
                problems.add(field_name, "must be a string")
            elif head == "teams" and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                problems.add(field_name, "must be a list of strings")
            elif head == "custom" and not isinstance(value, dict):
                problems.add(field_name, "must be an object")
            if head in ("role", "teams", "name"):
                check_user_fields(
                    f"{prefix}.set",
                    role=value if head == "role" and isinstance(value, str) else None,
                    teams=value if head == "teams" and isinstance(value, list) else None,
                    name=value if head == "name" and isinstance(value, str) else None,
                    problems=problems,
                )
        for position, path in enumerate(patch.unset):
            field_name = f"{prefix}.unset[{position}]"
            head = path.split(".", 1)[0]
            if head not in _SETTABLE or (head != "custom" and "." in path):
                problems.add(field_name, f"cannot unset {path!r}")
            elif head == "custom" and "." in path:
                split_path(path.split(".", 1)[1], field_name, problems)
            if path in patch.set:
                problems.add(field_name, f"{path!r} is both set and unset")

    @staticmethod
    def _apply(record: UserRecord, patch: UserPatch) -> None:
        for path, value in patch.set.items():
            if path.startswith("custom."):
                record.custom = apply_set(record.custom, path.split(".")[1:], value)
            elif path == "teams":
                record.teams = sorted(set(value))
            else:
                setattr(record, path, value)
        for path in patch.unset:
            if path.startswith("custom."):
                record.custom = apply_unset(record.custom, path.split(".")[1:])
            elif path == "custom":
                record.custom = {}
            elif path == "teams":
                record.teams = []
            elif path == "role":
                record.role = "user"
            else:
                setattr(record, path, "")

    async def query(self, page: PageRequest) -> Page[UserRecord]:
        async def work(tx: Transaction) -> Page[UserRecord]:
            caller = await load_caller(tx)
            if caller.is_admin:
                return await tx.users.query(page)
            assert caller.user is not None
            return await tx.users.query(page, visible_to_teams=caller.user.teams)

        return await self._store.read(work)

    async def delete(self, user_ids: list[str]) -> list[str]:
        problems = ViolationCollector()
        check_batch(user_ids, "user_ids", problems, id_suffix="")
        problems.raise_if_any()

        async def work(tx: Transaction) -> list[str]:
            require_admin(await load_caller(tx), "DeleteUsers")
            existing = await tx.users.existing_ids(user_ids)
            missing = [user_id for user_id in user_ids if user_id not in existing]
            if missing:
                raise users_not_found(missing)
            changed_calls = await tx.users.delete(user_ids)
            now = self._clock()
            for cid in sorted(changed_calls):  # sorted: the order in which writers lock calls
                call = await tx.calls.open(cid, now)
                if call is not None:
                    removed = changed_calls[cid]
                    call.members_changed(added=0, removed=len(removed))
                    call.record_event(MembersRemoved(removed))
            return user_ids

        return await self._store.write(work)
