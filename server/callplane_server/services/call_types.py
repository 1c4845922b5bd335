"""Call type rules: names, settings ranges, grants, and deletion only when unused."""

from __future__ import annotations

import builtins
from typing import Any

from callplane_server.domain.call_types import (
    BUILTIN_CALL_TYPES,
    DEFAULT_SETTINGS,
    merge_settings,
    normalize_grants,
    validate_grants,
    validate_settings,
)
from callplane_server.domain.records import CallTypeRecord
from callplane_server.domain.validation import CALL_TYPE_NAME, check_pattern
from callplane_server.errors import AlreadyExists, FailedPrecondition, NotFound, ViolationCollector
from callplane_server.services.authz import load_caller, require_admin
from callplane_server.services.clock import Clock
from callplane_server.store import Store, Transaction


def call_type_not_found(name: str) -> NotFound:
    return NotFound(
        f"call type {name!r} does not exist", reason="CALL_TYPE_NOT_FOUND", metadata={"type": name}
    )


class CallTypeService:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def create(
        self, name: str, settings: dict[str, Any], grants: dict[str, list[str]] | None
    ) -> CallTypeRecord:
        problems = ViolationCollector()
        check_pattern(name, CALL_TYPE_NAME, "name", "call type name (1..64 of a-z 0-9 _ -)", problems)
        validate_settings(settings, "settings", problems)
        if grants:
            validate_grants(grants, "grants", problems)
        problems.raise_if_any()
        now = self._clock()
        record = CallTypeRecord(
            name=name,
            settings=merge_settings(DEFAULT_SETTINGS, settings),
            grants=normalize_grants(grants if grants else BUILTIN_CALL_TYPES["default"].grants),
            created_at=now,
            updated_at=now,
        )

        async def work(tx: Transaction) -> CallTypeRecord:
            require_admin(await load_caller(tx), "CreateCallType")
            if await tx.call_types.get(name) is not None:
                raise AlreadyExists(
                    f"call type {name!r} already exists", reason="CALL_TYPE_EXISTS", metadata={"type": name}
                )
            await tx.call_types.insert(record)
            return record

        return await self._store.write(work)

    async def get(self, name: str) -> CallTypeRecord:
        async def work(tx: Transaction) -> CallTypeRecord:
            record = await tx.call_types.get(name)
            if record is None:
                raise call_type_not_found(name)
            return record

        return await self._store.read(work)

    async def list(self) -> list[CallTypeRecord]:
        return await self._store.read(lambda tx: tx.call_types.list())

    async def update(
        self, name: str, settings: dict[str, Any], grants: dict[str, builtins.list[str]] | None
    ) -> CallTypeRecord:
        problems = ViolationCollector()
        validate_settings(settings, "settings", problems)
        if grants:
            validate_grants(grants, "grants", problems)
        problems.raise_if_any()

        async def work(tx: Transaction) -> CallTypeRecord:
            require_admin(await load_caller(tx), "UpdateCallType")
            record = await tx.call_types.get(name)
            if record is None:
                raise call_type_not_found(name)
            record.settings = merge_settings(record.settings, settings)
            if grants:
                record.grants = normalize_grants({**record.grants, **grants})
            record.updated_at = self._clock()
            await tx.call_types.update(record)
            return record

        return await self._store.write(work)

    async def delete(self, name: str) -> None:
        async def work(tx: Transaction) -> None:
            require_admin(await load_caller(tx), "DeleteCallType")
            if await tx.call_types.get(name) is None:
                raise call_type_not_found(name)
            in_use = await tx.call_types.count_calls(name)
            if in_use:
                raise FailedPrecondition(
                    f"call type {name!r} is used by {in_use} call(s); delete them first",
                    reason="CALL_TYPE_IN_USE",
                    metadata={"type": name, "call_count": in_use},
                )
            await tx.call_types.delete(name)

        await self._store.write(work)
