"""How every call-scoped operation starts: the call opened for change (or read), with its caller and
what the caller may do in it; and the errors those lookups raise."""

from __future__ import annotations

from datetime import datetime

from callplane_server.domain.call import Call
from callplane_server.domain.caller import Caller
from callplane_server.domain.records import CallRecord
from callplane_server.errors import InvalidArgument, NotFound, ViolationCollector
from callplane_server.services.authz import load_caller, require
from callplane_server.store import Transaction


def call_not_found(cid: str) -> NotFound:
    return NotFound(f"call {cid!r} does not exist", reason="CALL_NOT_FOUND", metadata={"cid": cid})


async def open_call(
    tx: Transaction, cid: str, *need: str, now: datetime, caller: Caller | None = None, check: bool = True
) -> Call:
    """The live call for change (its row locked), with its caller and the caller's capabilities in it;
    CALL_NOT_FOUND when missing or soft-deleted, PERMISSION_DENIED naming the first of `need` the caller
    lacks. `check=False` skips authorization (the server's own bookkeeping and checks made by the
    caller itself, e.g. own-participant rules)."""
    call = await tx.calls.open(cid, now)
    if call is None or call.record.deleted_at is not None:
        raise call_not_found(cid)
    if caller is not None:
        call.caller = caller
    if check:
        call.capabilities = await require(
            tx, await caller_of(tx, call), call.record, *need, grants=call.grants
        )
    return call


async def caller_of(tx: Transaction, call: Call) -> Caller:
    """The RPC's caller, loaded once per opened call."""
    if call.caller is None:
        call.caller = await load_caller(tx)
    return call.caller


async def live_call(tx: Transaction, cid: str, *, for_share: bool = False) -> CallRecord:
    """The call for reading, unless it does not exist or was soft-deleted (CALL_NOT_FOUND)."""
    return live_record(await tx.calls.get(cid, for_share=for_share), cid)


def live_record(call: CallRecord | None, cid: str) -> CallRecord:
    """The call read, unless it does not exist or was soft-deleted (CALL_NOT_FOUND)."""
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
