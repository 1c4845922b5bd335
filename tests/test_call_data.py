"""CallDataService: participant and session custom data (replace / shallow-merge / keys_to_delete, etags,
size limits), custom events (recipients, WatchUser delivery, idempotent retries) and pins."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from callplane.v1 import (
    call_data_service_pb2,
    call_pb2,
    call_service_pb2,
    event_pb2,
    event_service_pb2,
    session_pb2,
    session_service_pb2,
    user_pb2,
)
from callplane_server.services.limits import Limits
from tests.errors import expect_error
from tests.support import snapshot, struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
REPLACE = session_pb2.CUSTOM_DATA_MODE_REPLACE
MERGE = session_pb2.CUSTOM_DATA_MODE_SHALLOW_MERGE
STREAM_TIMEOUT = 15.0
LIMITS = Limits()


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def sized(size: int) -> dict[str, Any]:
    """A document whose compact JSON encoding is exactly `size` bytes: {"k":"xxx…"}."""
    return {"k": "x" * (size - len('{"k":""}'))}


# --- helpers ---------------------------------------------------------------------------------------


async def make_users(users, unique: Callable[[str], str], count: int) -> list[str]:
    ids = [unique("u") for _ in range(count)]
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i) for i in ids]))
    return ids


async def make_call(calls, unique: Callable[[str], str], members: dict[str, str] | None = None) -> str:
    """A call of type default; `members` maps user id → role."""
    call_id = unique("c")
    await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type="default",
            id=call_id,
            data=call_service_pb2.CallData(
                members=[call_pb2.MemberRequest(user_id=u, role=r) for u, r in (members or {}).items()]
            ),
        )
    )
    return call_id


async def join(sessions, unique, call_id: str, user_id: str, custom: dict[str, Any] | None = None):
    response = await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default",
            id=call_id,
            user_id=user_id,
            participant_session_id=unique("p"),
            custom=struct(custom or {}),
        )
    )
    return response.participant


async def leave(sessions, call_id: str, participant_session_id: str) -> None:
    await sessions.LeaveCall(
        session_service_pb2.LeaveCallRequest(
            type="default", id=call_id, participant_session_id=participant_session_id
        )
    )


async def current_seq(events, call_id: str) -> int:
    return (await snapshot(events, call_id)).seq


async def call_events(events, call_id: str, after_seq: int, up_to_seq: int) -> list[event_pb2.Event]:
    """The events of WatchCall(after_seq) up to and including `up_to_seq` (checked gap-free)."""
    if up_to_seq <= after_seq:
        return []
    found: list[event_pb2.Event] = []
    stream = events.WatchCall(
        event_service_pb2.WatchCallRequest(type="default", id=call_id, after_seq=after_seq)
    )
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in stream:
                if message.WhichOneof("message") != "event":
                    continue
                assert message.event.seq == after_seq + len(found) + 1, message.event
                found.append(message.event)
                if message.event.seq >= up_to_seq:
                    return found
    finally:
        stream.cancel()
    raise AssertionError(f"WatchCall ended before seq {up_to_seq}")


async def user_events(events, user_id: str, marker_type: str = "custom") -> list[event_pb2.Event]:
    """A user's WatchUser events from the start up to and including the first custom event whose payload
    has `marker` set (tests end each scenario with one addressed to everybody involved)."""
    found: list[event_pb2.Event] = []
    stream = events.WatchUser(event_service_pb2.WatchUserRequest(user_id=user_id, after_seq=0))
    try:
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in stream:
                if message.WhichOneof("message") != "event":
                    continue
                found.append(message.event)
                if message.event.type == marker_type and plain(message.event.custom.custom).get("marker"):
                    return found
    finally:
        stream.cancel()
    raise AssertionError(f"WatchUser({user_id}) ended before the marker")


def participant_request(call_id: str, participant: session_pb2.Participant, **fields: Any):
    fields.setdefault("user_id", participant.user_id)
    if "custom" in fields and isinstance(fields["custom"], dict):
        fields["custom"] = struct(fields["custom"])
    return call_data_service_pb2.UpdateParticipantCustomRequest(
        type="default", id=call_id, participant_session_id=participant.participant_session_id, **fields
    )


def session_request(call_id: str, user_id: str, **fields: Any):
    if "custom" in fields and isinstance(fields["custom"], dict):
        fields["custom"] = struct(fields["custom"])
    return call_data_service_pb2.UpdateSessionCustomRequest(
        type="default", id=call_id, user_id=user_id, **fields
    )


def send_request(call_id: str, user_id: str, custom: dict[str, Any], **fields: Any):
    return call_data_service_pb2.SendCallEventRequest(
        type="default", id=call_id, user_id=user_id, custom=struct(custom), **fields
    )


def pin_request(call_id: str, participant: session_pb2.Participant):
    return call_data_service_pb2.PinParticipantRequest(
        type="default",
        id=call_id,
        participant_session_id=participant.participant_session_id,
        user_id=participant.user_id,
    )


def unpin_request(call_id: str, participant: session_pb2.Participant):
    return call_data_service_pb2.UnpinParticipantRequest(
        type="default",
        id=call_id,
        participant_session_id=participant.participant_session_id,
        user_id=participant.user_id,
    )


def live(snap: event_service_pb2.CallSnapshot) -> dict[str, session_pb2.Participant]:
    return {p.participant_session_id: p for p in snap.session.participants}


# --- participant custom data ---------------------------------------------------------------------


async def test_participant_custom_replace_merge_and_keys_to_delete(
    calls, users, data, sessions, events, unique
):
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    me = await join(sessions, unique, call_id, a, {"hand": False, "seat": 1})
    assert plain(me.custom) == {"hand": False, "seat": 1}
    before = await current_seq(events, call_id)

    replaced = (
        await data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=REPLACE, custom={"x": "1", "y": "2"})
        )
    ).participant
    assert plain(replaced.custom) == {"x": "1", "y": "2"}
    assert replaced.custom_etag != me.custom_etag

    merged = (
        await data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=MERGE, custom={"y": "3", "z": "4"}, keys_to_delete=["x"])
        )
    ).participant
    assert plain(merged.custom) == {"y": "3", "z": "4"}
    assert merged.custom_etag not in (me.custom_etag, replaced.custom_etag)

    # UNSPECIFIED is REPLACE.
    unspecified = (
        await data.UpdateParticipantCustom(participant_request(call_id, me, custom={"only": True}))
    ).participant
    assert plain(unspecified.custom) == {"only": True}

    # Deleting a key that is not there and setting nothing new: a no-op keeps the etag and emits nothing.
    same = (
        await data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=MERGE, keys_to_delete=["gone"])
        )
    ).participant
    assert plain(same.custom) == {"only": True}
    assert same.custom_etag == unspecified.custom_etag

    after = await current_seq(events, call_id)
    changes = await call_events(events, call_id, before, after)
    assert [e.type for e in changes] == ["call.participant_custom_updated"] * 3
    assert [plain(e.call_participant_custom_updated.participant.custom) for e in changes] == [
        {"x": "1", "y": "2"},
        {"y": "3", "z": "4"},
        {"only": True},
    ]
    assert all(
        e.call_participant_custom_updated.participant.participant_session_id == me.participant_session_id
        for e in changes
    )
    assert changes[-1].call_participant_custom_updated.participant.custom_etag == unspecified.custom_etag
    # The snapshot shows the participant's current data.
    assert plain(live(await snapshot(events, call_id))[me.participant_session_id].custom) == {"only": True}


async def test_participant_custom_invalid_requests(calls, users, data, sessions, unique):
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    me = await join(sessions, unique, call_id, a)
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, me, mode=REPLACE, keys_to_delete=["x"])),
        INVALID,
        fields=["keys_to_delete"],
    )
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, me, keys_to_delete=["x"])),
        INVALID,
        fields=["keys_to_delete"],
    )
    await expect_error(
        data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=MERGE, custom={"x": 1}, keys_to_delete=["y", "x"])
        ),
        INVALID,
        fields=["keys_to_delete[1]"],
    )
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, me, mode=7)), INVALID, fields=["mode"]
    )
    await expect_error(
        data.UpdateParticipantCustom(
            call_data_service_pb2.UpdateParticipantCustomRequest(type="default", id=call_id, user_id=a)
        ),
        INVALID,
        fields=["participant_session_id"],
    )
    await expect_error(
        data.UpdateParticipantCustom(participant_request(unique("nope"), me)), NOT_FOUND, "CALL_NOT_FOUND"
    )


async def test_participant_custom_etag(calls, users, data, sessions, events, unique):
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    me = await join(sessions, unique, call_id, a, {"v": 0})
    first = (
        await data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=MERGE, custom={"v": 1}, etag=me.custom_etag)
        )
    ).participant
    assert plain(first.custom) == {"v": 1}
    before = await current_seq(events, call_id)
    details = await expect_error(
        data.UpdateParticipantCustom(
            participant_request(call_id, me, mode=REPLACE, custom={"v": 2}, etag=me.custom_etag)
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert details.metadata["current_etag"] == first.custom_etag
    assert details.metadata["etag"] == me.custom_etag
    # Nothing changed: same data, same etag, no event.
    assert await current_seq(events, call_id) == before
    now = live(await snapshot(events, call_id))[me.participant_session_id]
    assert plain(now.custom) == {"v": 1}
    assert now.custom_etag == first.custom_etag


async def test_participant_custom_size_limit(calls, users, data, sessions, events, unique):
    limit = LIMITS.max_participant_custom_bytes
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    me = await join(sessions, unique, call_id, a)
    exact = (
        await data.UpdateParticipantCustom(participant_request(call_id, me, custom=sized(limit)))
    ).participant
    assert plain(exact.custom) == sized(limit)
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, me, custom=sized(limit + 1))),
        INVALID,
        fields=["custom"],
    )
    # A merge is checked on its result: one more key pushes the document over.
    before = await current_seq(events, call_id)
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, me, mode=MERGE, custom={"a": 1})),
        INVALID,
        fields=["custom"],
    )
    assert await current_seq(events, call_id) == before
    now = live(await snapshot(events, call_id))[me.participant_session_id]
    assert plain(now.custom) == sized(limit)
    assert now.custom_etag == exact.custom_etag


async def test_participant_custom_own_data_only(calls, users, data, sessions, events, unique):
    a, b = await make_users(users, unique, 2)
    call_id = await make_call(calls, unique)
    await expect_error(
        data.UpdateParticipantCustom(
            call_data_service_pb2.UpdateParticipantCustomRequest(
                type="default", id=call_id, participant_session_id=unique("p"), user_id=a
            )
        ),
        PRECONDITION,
        "NO_ACTIVE_SESSION",
    )
    mine = await join(sessions, unique, call_id, a, {"mine": True})
    theirs = await join(sessions, unique, call_id, b)
    details = await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, mine, user_id=b, custom={"hacked": True})),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_OWN_PARTICIPANT",
    )
    assert details.metadata["participant_session_id"] == mine.participant_session_id
    assert plain(live(await snapshot(events, call_id))[mine.participant_session_id].custom) == {"mine": True}
    await expect_error(
        data.UpdateParticipantCustom(
            call_data_service_pb2.UpdateParticipantCustomRequest(
                type="default", id=call_id, participant_session_id=unique("p"), user_id=a
            )
        ),
        NOT_FOUND,
        "PARTICIPANT_NOT_FOUND",
    )
    # A participant that left is no longer live (the session goes on with the other one).
    await leave(sessions, call_id, theirs.participant_session_id)
    await expect_error(
        data.UpdateParticipantCustom(participant_request(call_id, theirs, custom={"late": True})),
        NOT_FOUND,
        "PARTICIPANT_NOT_FOUND",
    )


# --- session custom data -----------------------------------------------------------------------------


async def test_session_custom_modes_etag_and_events(calls, users, data, sessions, events, unique):
    a, b, outsider = await make_users(users, unique, 3)
    call_id = await make_call(calls, unique, {outsider: "user"})
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, custom={"x": 1})),
        PRECONDITION,
        "NO_ACTIVE_SESSION",
    )
    await join(sessions, unique, call_id, a)
    await join(sessions, unique, call_id, b)
    # A member who has not joined is not a participant.
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, outsider, custom={"x": 1})),
        PRECONDITION,
        "NOT_A_PARTICIPANT",
    )
    before = await current_seq(events, call_id)
    first = (
        await data.UpdateSessionCustom(session_request(call_id, a, custom={"topic": "standup", "round": 1}))
    ).session
    assert plain(first.custom) == {"topic": "standup", "round": 1}
    assert first.participant_count == 2
    # Any participant may change it: b merges and deletes, guarded by a's etag.
    second = (
        await data.UpdateSessionCustom(
            session_request(
                call_id,
                b,
                mode=MERGE,
                custom={"round": 2, "speaker": b},
                keys_to_delete=["topic"],
                etag=first.custom_etag,
            )
        )
    ).session
    assert plain(second.custom) == {"round": 2, "speaker": b}
    assert second.custom_etag != first.custom_etag
    details = await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, custom={"lost": True}, etag=first.custom_etag)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert details.metadata["current_etag"] == second.custom_etag
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, mode=REPLACE, keys_to_delete=["round"])),
        INVALID,
        fields=["keys_to_delete"],
    )
    after = await current_seq(events, call_id)
    changes = await call_events(events, call_id, before, after)
    assert [e.type for e in changes] == ["call.session_custom_updated"] * 2
    assert [e.call_session_custom_updated.updated_by_user_id for e in changes] == [a, b]
    assert plain(changes[1].call_session_custom_updated.custom) == {"round": 2, "speaker": b}
    assert changes[1].call_session_custom_updated.custom_etag == second.custom_etag
    assert changes[1].call_session_custom_updated.session_id == second.id
    snap = await snapshot(events, call_id)
    assert plain(snap.session.custom) == {"round": 2, "speaker": b}
    assert snap.session.custom_etag == second.custom_etag


async def test_session_custom_size_limit(calls, users, data, sessions, events, unique):
    limit = LIMITS.max_session_custom_bytes
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    await join(sessions, unique, call_id, a)
    exact = (await data.UpdateSessionCustom(session_request(call_id, a, custom=sized(limit)))).session
    assert plain(exact.custom) == sized(limit)
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, custom=sized(limit + 1))),
        INVALID,
        fields=["custom"],
    )
    before = await current_seq(events, call_id)
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, mode=MERGE, custom={"b": 1})),
        INVALID,
        fields=["custom"],
    )
    assert await current_seq(events, call_id) == before
    assert (await snapshot(events, call_id)).session.custom_etag == exact.custom_etag


async def test_session_custom_reaches_new_joiners_and_stays_in_history(
    calls, users, data, sessions, events, server, unique
):
    a, b = await make_users(users, unique, 2)
    call_id = await make_call(calls, unique)
    first = await join(sessions, unique, call_id, a)
    updated = (
        await data.UpdateSessionCustom(session_request(call_id, a, custom={"whiteboard": "v1"}))
    ).session
    # A new joiner gets the session data with the session, and in its WatchCall snapshot.
    joined = await sessions.JoinCall(
        session_service_pb2.JoinCallRequest(
            type="default", id=call_id, user_id=b, participant_session_id=unique("p")
        )
    )
    assert plain(joined.session.custom) == {"whiteboard": "v1"}
    snap = await snapshot(events, call_id)
    assert snap.session.id == updated.id
    assert plain(snap.session.custom) == {"whiteboard": "v1"}
    assert snap.session.custom_etag == updated.custom_etag
    # Everyone leaves; after the inactivity timeout the session ends and keeps its data.
    await leave(sessions, call_id, first.participant_session_id)
    await leave(sessions, call_id, joined.participant.participant_session_id)
    server.clock.advance(timedelta(seconds=901))
    await server.server.timers.run_due()
    history = await sessions.QueryCallSessions(
        session_service_pb2.QueryCallSessionsRequest(type="default", id=call_id)
    )
    (ended,) = [s for s in history.sessions if s.id == updated.id]
    assert ended.HasField("ended_at")
    assert plain(ended.custom) == {"whiteboard": "v1"}
    assert ended.custom_etag == updated.custom_etag
    await expect_error(
        data.UpdateSessionCustom(session_request(call_id, a, custom={"after": True})),
        PRECONDITION,
        "NO_ACTIVE_SESSION",
    )


# --- custom events --------------------------------------------------------------------------------


async def test_send_call_event_recipients(calls, users, data, events, unique):
    sender, host, mod, guest, bystander = await make_users(users, unique, 5)
    call_id = await make_call(calls, unique, {sender: "user", host: "host", mod: "moderator", guest: "user"})
    everyone = await data.SendCallEvent(send_request(call_id, sender, {"kind": "everyone"}))
    to_users = await data.SendCallEvent(
        send_request(call_id, sender, {"kind": "users"}, to_user_ids=[guest, bystander])
    )
    to_roles = await data.SendCallEvent(
        send_request(call_id, sender, {"kind": "roles"}, to_roles=["host", "moderator"])
    )
    both = await data.SendCallEvent(
        send_request(call_id, sender, {"kind": "both"}, to_user_ids=[bystander, host], to_roles=["host"])
    )
    assert not any(r.duplicate for r in (everyone, to_users, to_roles, both))
    assert [to_users.seq, to_roles.seq, both.seq] == [everyone.seq + 1, everyone.seq + 2, everyone.seq + 3]
    people = [sender, host, mod, guest, bystander]
    marker = await data.SendCallEvent(send_request(call_id, sender, {"marker": True}, to_user_ids=people))

    # Every custom event is on the call's stream, with its addressing.
    on_call = await call_events(events, call_id, everyone.seq - 1, marker.seq)
    assert [e.type for e in on_call] == ["custom"] * 5
    assert [plain(e.custom.custom).get("kind") for e in on_call[:4]] == ["everyone", "users", "roles", "both"]
    assert all(e.custom.user_id == sender for e in on_call)
    assert list(on_call[1].custom.to_user_ids) == [guest, bystander]
    assert list(on_call[2].custom.to_roles) == ["host", "moderator"]

    # WatchUser delivers only what was addressed to the user (by id or by role); "everyone" is the call's.
    expected = {
        sender: [],
        host: ["roles", "both"],
        mod: ["roles"],
        guest: ["users"],
        bystander: ["users", "both"],
    }
    for user_id, kinds in expected.items():
        received = await user_events(events, user_id)
        assert [plain(e.custom.custom).get("kind") for e in received[:-1]] == kinds, user_id
        assert [e.user_seq for e in received] == list(range(1, len(received) + 1))
        assert received[-1].seq == marker.seq


async def test_send_call_event_to_roles_reaches_participants(calls, users, data, sessions, events, unique):
    """Participants who are not members join with their user role and are addressed by it too."""
    sender, admin = await make_users(users, unique, 2)
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=admin, role="admin")]))
    call_id = await make_call(calls, unique, {sender: "user"})
    participant = await join(sessions, unique, call_id, admin)
    assert participant.role == "admin"
    sent = await data.SendCallEvent(send_request(call_id, sender, {"kind": "admins"}, to_roles=["admin"]))
    await data.SendCallEvent(send_request(call_id, sender, {"marker": True}, to_user_ids=[admin]))
    received = await user_events(events, admin)
    assert [e.seq for e in received if e.type == "custom"][:1] == [sent.seq]


async def test_send_call_event_idempotent_retry(calls, users, data, events, unique):
    (sender,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique, {sender: "user"})
    first = await data.SendCallEvent(send_request(call_id, sender, {"n": 1}, request_id="req-1"))
    retry = await data.SendCallEvent(send_request(call_id, sender, {"n": 1}, request_id="req-1"))
    assert not first.duplicate
    assert retry.duplicate
    assert retry.seq == first.seq
    # The same key on another call is another request.
    other_call = await make_call(calls, unique, {sender: "user"})
    other = await data.SendCallEvent(send_request(other_call, sender, {"n": 1}, request_id="req-1"))
    assert not other.duplicate

    # Concurrent retries of a new key: one sends, the rest return its seq.
    results = await asyncio.gather(
        *(data.SendCallEvent(send_request(call_id, sender, {"n": 2}, request_id="req-2")) for _ in range(8))
    )
    assert len({r.seq for r in results}) == 1
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    marker = await data.SendCallEvent(send_request(call_id, sender, {"marker": True}))
    on_call = await call_events(events, call_id, first.seq - 1, marker.seq)
    assert [(e.type, e.custom.request_id) for e in on_call] == [
        ("custom", "req-1"),
        ("custom", "req-2"),
        ("custom", ""),
    ]
    assert on_call[1].seq == results[0].seq


async def test_send_call_event_limits_and_errors(calls, users, data, events, unique):
    limit = LIMITS.max_custom_event_bytes
    (sender,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    exact = await data.SendCallEvent(send_request(call_id, sender, sized(limit)))
    assert exact.seq > 0
    await expect_error(
        data.SendCallEvent(send_request(call_id, sender, sized(limit + 1))), INVALID, fields=["custom"]
    )
    await expect_error(
        data.SendCallEvent(send_request(call_id, sender, {}, request_id="r" * 65)),
        INVALID,
        fields=["request_id"],
    )
    assert (
        await data.SendCallEvent(send_request(call_id, sender, {}, request_id="r" * 64))
    ).seq == exact.seq + 1
    await expect_error(
        data.SendCallEvent(send_request(call_id, sender, {}, to_roles=["Not A Role"])),
        INVALID,
        fields=["to_roles[0]"],
    )
    await expect_error(
        data.SendCallEvent(send_request(call_id, unique("ghost"), {})), NOT_FOUND, "USER_NOT_FOUND"
    )
    ghost = unique("ghost")
    await expect_error(
        data.SendCallEvent(send_request(call_id, sender, {}, to_user_ids=[sender, ghost])),
        INVALID,
        "UNKNOWN_USERS",
        fields=["to_user_ids[1]"],
    )
    await expect_error(
        data.SendCallEvent(send_request(unique("missing"), sender, {})), NOT_FOUND, "CALL_NOT_FOUND"
    )
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id))
    await expect_error(data.SendCallEvent(send_request(call_id, sender, {})), NOT_FOUND, "CALL_NOT_FOUND")


# --- pins ----------------------------------------------------------------------------------------------


async def test_pins_order_idempotency_and_events(calls, users, data, sessions, events, unique):
    a, b = await make_users(users, unique, 2)
    call_id = await make_call(calls, unique)
    pa = await join(sessions, unique, call_id, a)
    pb = await join(sessions, unique, call_id, b)
    before = await current_seq(events, call_id)

    def order(pins) -> list[str]:
        return [p.participant_session_id for p in pins]

    assert order((await data.PinParticipant(pin_request(call_id, pb))).pins) == [pb.participant_session_id]
    pinned = (await data.PinParticipant(pin_request(call_id, pa))).pins
    assert order(pinned) == [pb.participant_session_id, pa.participant_session_id]
    assert [p.user_id for p in pinned] == [b, a]
    assert pinned[0].pinned_at.ToDatetime() < pinned[1].pinned_at.ToDatetime()
    # Pinning again changes nothing (same pinned_at, no event).
    again = (await data.PinParticipant(pin_request(call_id, pb))).pins
    assert list(again) == list(pinned)
    snap = await snapshot(events, call_id)
    assert list(snap.pins) == list(pinned)

    assert order((await data.UnpinParticipant(unpin_request(call_id, pb))).pins) == [
        pa.participant_session_id
    ]
    assert order((await data.UnpinParticipant(unpin_request(call_id, pb))).pins) == [
        pa.participant_session_id
    ]
    # Re-pinning appends at the end.
    repinned = (await data.PinParticipant(pin_request(call_id, pb))).pins
    assert order(repinned) == [pa.participant_session_id, pb.participant_session_id]

    after = await current_seq(events, call_id)
    changes = await call_events(events, call_id, before, after)
    assert [e.type for e in changes] == ["call.pins_updated"] * 4
    assert [order(e.call_pins_updated.pins) for e in changes] == [
        [pb.participant_session_id],
        [pb.participant_session_id, pa.participant_session_id],
        [pa.participant_session_id],
        [pa.participant_session_id, pb.participant_session_id],
    ]
    assert list((await snapshot(events, call_id)).pins) == list(repinned)


async def test_pin_requires_a_live_participant(calls, users, data, sessions, unique):
    a, b = await make_users(users, unique, 2)
    call_id = await make_call(calls, unique)
    ghost = session_pb2.Participant(participant_session_id=unique("p"), user_id=a)
    await expect_error(data.PinParticipant(pin_request(call_id, ghost)), NOT_FOUND, "PARTICIPANT_NOT_FOUND")
    pa = await join(sessions, unique, call_id, a)
    pb = await join(sessions, unique, call_id, b)
    await expect_error(data.PinParticipant(pin_request(call_id, ghost)), NOT_FOUND, "PARTICIPANT_NOT_FOUND")
    # The session id must belong to the given user.
    wrong_user = session_pb2.Participant(participant_session_id=pa.participant_session_id, user_id=b)
    await expect_error(
        data.PinParticipant(pin_request(call_id, wrong_user)), NOT_FOUND, "PARTICIPANT_NOT_FOUND"
    )
    await leave(sessions, call_id, pb.participant_session_id)
    await expect_error(data.PinParticipant(pin_request(call_id, pb)), NOT_FOUND, "PARTICIPANT_NOT_FOUND")
    await expect_error(
        data.PinParticipant(
            call_data_service_pb2.PinParticipantRequest(type="default", id=call_id, user_id=a)
        ),
        INVALID,
        fields=["participant_session_id"],
    )
    await expect_error(data.PinParticipant(pin_request(unique("nope"), pa)), NOT_FOUND, "CALL_NOT_FOUND")
    # Unpinning something that is not pinned is fine.
    assert list((await data.UnpinParticipant(unpin_request(call_id, pa))).pins) == []


async def test_session_custom_concurrent_writers_with_one_etag(calls, users, data, sessions, events, unique):
    """Optimistic concurrency: of several writers holding the same etag exactly one wins."""
    (a,) = await make_users(users, unique, 1)
    call_id = await make_call(calls, unique)
    await join(sessions, unique, call_id, a)
    start = (await data.UpdateSessionCustom(session_request(call_id, a, custom={"n": 0}))).session
    attempts = [
        data.UpdateSessionCustom(
            session_request(call_id, a, mode=MERGE, custom={"n": n, f"w{n}": True}, etag=start.custom_etag)
        )
        for n in range(1, 7)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 5, results
    assert all(r.code() == grpc.StatusCode.ABORTED for r in lost)
    (winner,) = won
    n = int(plain(winner.session.custom)["n"])
    assert plain(winner.session.custom) == {"n": n, f"w{n}": True}
    assert (await snapshot(events, call_id)).session.custom_etag == winner.session.custom_etag


async def test_idempotency_key_primary_key_settles_a_race(server):
    """Two transactions that both saw no key: the loser hits the primary key, the store retries it whole
    and the retry finds the winner's result (PostgreSQL; SQLite has a single writer, so no race)."""
    if server.backend == "sqlite":
        pytest.skip("SQLite serializes writers: the race cannot happen there")
    store = server.server.store
    assert store is not None
    barrier = asyncio.Barrier(2)
    cid, request_id = "default:race", "same-key"
    attempts: list[str] = []

    def writer(name: str):
        async def work(tx) -> dict[str, Any]:
            first = await tx.idempotency.get(cid, request_id)
            attempts.append(name)
            if first is not None:
                return {**first, "duplicate": True}
            if attempts.count(name) == 1:
                await barrier.wait()  # both have seen "no key" before either inserts
            await tx.idempotency.insert(cid, request_id, {"seq": name}, server.clock())
            return {"seq": name, "duplicate": False}

        return store.write(work)

    one, two = await asyncio.wait_for(asyncio.gather(writer("one"), writer("two")), STREAM_TIMEOUT)
    assert one["seq"] == two["seq"]
    assert sorted([one["duplicate"], two["duplicate"]]) == [False, True]
    assert len(attempts) == 3  # the loser ran twice
