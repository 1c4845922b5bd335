"""Call type rules: names, settings ranges, grants, and deletion only when unused."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from dataclasses import replace
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
from callplane_server.store.custom_indexes import CustomIndex, parse_custom_index

#: Custom indexes one call type may declare (each costs every write of a call some upkeep).
MAX_CUSTOM_INDEXES = 16


def parse_custom_indexes(
    specs: builtins.list[str], field: str, problems: ViolationCollector
) -> builtins.list[CustomIndex]:
    """The indexes of a request's `custom_indexes` specs; each problem names `custom_indexes[i]`."""
    if len(specs) > MAX_CUSTOM_INDEXES:
        problems.add(field, f"at most {MAX_CUSTOM_INDEXES} custom indexes per call type, got {len(specs)}")
        return []
    indexes: builtins.list[CustomIndex] = []
    for position, spec in enumerate(specs):
        try:
            index = parse_custom_index(spec)
        except ValueError as error:
            problems.add(f"{field}[{position}]", str(error))
            continue
        if index in indexes:
            problems.add(f"{field}[{position}]", f"custom index {str(index)!r} is declared twice")
            continue
        indexes.append(index)
    return indexes


def call_type_not_found(name: str) -> NotFound:
    return NotFound(
        f"call type {name!r} does not exist", reason="CALL_TYPE_NOT_FOUND", metadata={"type": name}
    )


class CallTypeService:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def create(
        self,
        name: str,
        settings: dict[str, Any],
        grants: dict[str, list[str]] | None,
        custom_indexes: list[str] | None = None,
    ) -> CallTypeRecord:
        problems = ViolationCollector()
        check_pattern(name, CALL_TYPE_NAME, "name", "call type name (1..64 of a-z 0-9 _ -)", problems)
        validate_settings(settings, "settings", problems)
        if grants:
            validate_grants(grants, "grants", problems)
        indexes = parse_custom_indexes(custom_indexes or [], "custom_indexes", problems)
        problems.raise_if_any()
        now = self._clock()
        record = CallTypeRecord(
            name=name,
            settings=merge_settings(DEFAULT_SETTINGS, settings),
            grants=normalize_grants(grants if grants else BUILTIN_CALL_TYPES["default"].grants),
            created_at=now,
            updated_at=now,
        )

        async def work(tx: Transaction) -> tuple[CallTypeRecord, bool]:
            require_admin(await load_caller(tx), "CreateCallType")
            if await tx.call_types.get(name) is not None:
                raise AlreadyExists(
                    f"call type {name!r} already exists", reason="CALL_TYPE_EXISTS", metadata={"type": name}
                )
            await tx.call_types.insert(record)
            work_for_indexes = await tx.custom_indexes.declare(name, indexes)
            record.custom_indexes = (await tx.custom_indexes.of_call_types([name]))[name]
            return record, work_for_indexes

        return await self._write_and_wake(work)

    async def _write_and_wake(
        self, work: Callable[[Transaction], Awaitable[tuple[CallTypeRecord, bool]]]
    ) -> CallTypeRecord:
        record, work_for_indexes = await self._store.write(work)
        if work_for_indexes:
            self._store.indexes.wake()  # builds (drops) in the background; the reply says BUILDING
        return record

    async def get(self, name: str) -> CallTypeRecord:
        async def work(tx: Transaction) -> CallTypeRecord:
            record = await tx.call_types.get(name)
            if record is None:
                raise call_type_not_found(name)
            # A copy: the record read may be shared (cached) by other reads.
            return replace(record, custom_indexes=(await tx.custom_indexes.of_call_types([name]))[name])

        return await self._store.read(work)

    async def list(self) -> list[CallTypeRecord]:
        async def work(tx: Transaction) -> list[CallTypeRecord]:
            records = await tx.call_types.list()
            indexes = await tx.custom_indexes.of_call_types([record.name for record in records])
            return [replace(record, custom_indexes=indexes[record.name]) for record in records]

        return await self._store.read(work)

    async def update(
        self,
        name: str,
        settings: dict[str, Any],
        grants: dict[str, builtins.list[str]] | None,
        custom_indexes: builtins.list[str] | None = None,
    ) -> CallTypeRecord:
        """`custom_indexes`: None keeps the declared ones; a list (maybe empty) replaces them."""
        problems = ViolationCollector()
        validate_settings(settings, "settings", problems)
        if grants:
            validate_grants(grants, "grants", problems)
        indexes = (
            None
            if custom_indexes is None
            else parse_custom_indexes(custom_indexes, "custom_indexes.specs", problems)
        )
        problems.raise_if_any()

        async def work(tx: Transaction) -> tuple[CallTypeRecord, bool]:
            require_admin(await load_caller(tx), "UpdateCallType")
            record = await tx.call_types.get(name)
            if record is None:
                raise call_type_not_found(name)
            record.settings = merge_settings(record.settings, settings)
            if grants:
                record.grants = normalize_grants({**record.grants, **grants})
            record.updated_at = self._clock()
            await tx.call_types.update(record)
            work_for_indexes = indexes is not None and await tx.custom_indexes.declare(name, indexes)
            record.custom_indexes = (await tx.custom_indexes.of_call_types([name]))[name]
            return record, work_for_indexes

        return await self._write_and_wake(work)

    async def delete(self, name: str) -> None:
        async def work(tx: Transaction) -> bool:
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
            work_for_indexes = await tx.custom_indexes.declare(name, [])
            await tx.call_types.delete(name)
            return work_for_indexes

        if await self._store.write(work):
            self._store.indexes.wake()
