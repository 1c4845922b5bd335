"""Lookups every call-scoped service starts with, and the errors they raise."""

from __future__ import annotations

from callplane_server.domain.records import CallRecord
from callplane_server.errors import InvalidArgument, NotFound, ViolationCollector
from callplane_server.store import Transaction


def call_not_found(cid: str) -> NotFound:
    return NotFound(f"call {cid!r} does not exist", reason="CALL_NOT_FOUND", metadata={"cid": cid})


async def live_call(
    tx: Transaction, cid: str, *, for_update: bool = False, for_share: bool = False
) -> CallRecord:
    """The call, unless it does not exist or was soft-deleted (CALL_NOT_FOUND)."""
    call = await tx.calls.get(cid, for_update=for_update, for_share=for_share)
    if call is None or call.deleted_at is not None:
        raise call_not_found(cid)
    return call


def unknown_users(unknown: dict[str, str]) -> InvalidArgument:
    """INVALID_ARGUMENT naming each unknown user; `unknown` maps request field path → user id."""
    problems = ViolationCollector()
    for path, user_id in unknown.items():
        problems.add(path, f"user {user_id!r} does not exist")
    ids = ",".join(dict.fromkeys(unknown.values()))
    return InvalidArgument(
        f"unknown user(s): {ids.replace(',', ', ')}",
        reason="UNKNOWN_USERS",
        metadata={"user_ids": ids},
        field_violations=problems.violations,
    )
