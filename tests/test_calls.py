"""CallService: GetOrCreateCall, GetCall, UpdateCall, EndCall, DeleteCall (soft and hard)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from callplane.v1 import call_pb2, call_service_pb2, call_type_pb2, user_pb2
from tests.errors import expect_error
from tests.support import struct

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


async def make_users(users, unique, count: int, **fields: Any) -> list[str]:
    ids = [unique("u") for _ in range(count)]
    await users.UpsertUsers(
        user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=i, **fields) for i in ids])
    )
    return ids


async def create(calls, call_id: str, call_type: str = "default", members_limit: int = 0, **data: Any):
    return await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=call_type, id=call_id, data=call_service_pb2.CallData(**data), members_limit=members_limit
        )
    )


async def get(calls, call_id: str, call_type: str = "default", members_limit: int = 0):
    return await calls.GetCall(
        call_service_pb2.GetCallRequest(type=call_type, id=call_id, members_limit=members_limit)
    )


async def update(calls, call_id: str, call_type: str = "default", **fields: Any):
    return await calls.UpdateCall(call_service_pb2.UpdateCallRequest(type=call_type, id=call_id, **fields))


async def query_ids(calls, conditions: dict[str, Any]) -> list[str]:
    response = await calls.QueryCalls(
        call_service_pb2.QueryCallsRequest(filter_conditions=struct(conditions))
    )
    return [state.call.id for state in response.calls]


# --- GetOrCreateCall ----------------------------------------------------------------------------------


async def test_get_or_create_creates_then_returns_unchanged(calls, users, unique):
    creator, member = await make_users(users, unique, 2)
    call_id = unique("c")
    starts_at = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    first = await create(
        calls,
        call_id,
        created_by_id=creator,
        members=[
            call_pb2.MemberRequest(user_id=creator, role="host"),
            call_pb2.MemberRequest(user_id=member),
        ],
        custom=struct({"topic": "standup", "n": 1}),
        starts_at=timestamp(starts_at),
        team="blue",
    )
    assert first.created is True
    call = first.call
    assert (call.cid, call.type, call.id) == (f"default:{call_id}", "default", call_id)
    assert call.created_by_user_id == creator
    assert call.team == "blue"
    assert plain(call.custom) == {"topic": "standup", "n": 1}
    assert call.starts_at.ToDatetime(tzinfo=UTC) == starts_at
    assert not call.HasField("ended_at")
    assert call.member_count == 2
    assert call.etag
    assert call.backstage is False and call.ongoing is False
    assert call.HasField("created_at") and call.created_at == call.updated_at
    # Members added together share created_at: ties are ordered by user_id.
    assert [(m.user_id, m.role) for m in first.members] == sorted([(creator, "host"), (member, "user")])
    assert {m.user.id for m in first.members} == {creator, member}

    second = await create(
        calls, call_id, created_by_id=member, custom=struct({"topic": "other"}), team="red", members=[]
    )
    assert second.created is False
    assert second.call == first.call  # returned unchanged: data is ignored
    assert [m.user_id for m in second.members] == sorted([creator, member])
    assert (await get(calls, call_id)).call == first.call


async def test_get_or_create_without_data(calls, unique):
    call_id = unique("c")
    response = await create(calls, call_id)
    assert response.created
    assert response.call.created_by_user_id == ""
    assert response.call.team == ""
    assert plain(response.call.custom) == {}
    assert response.call.member_count == 0
    assert list(response.members) == []
    assert not response.call.HasField("starts_at")


async def test_backstage_follows_effective_settings(calls, unique):
    livestream = await create(calls, unique("c"), call_type="livestream")
    assert livestream.call.backstage is True
    overridden = await create(
        calls,
        unique("c"),
        call_type="livestream",
        settings_override=call_type_pb2.CallSettings(
            backstage=call_type_pb2.BackstageSettings(enabled=False)
        ),
    )
    assert overridden.call.backstage is False
    assert overridden.call.settings.backstage.enabled is False
    assert overridden.call.settings.audio.access_request_enabled is True  # from livestream


async def test_unknown_users_are_all_named_and_nothing_is_written(calls, users, unique):
    (known,) = await make_users(users, unique, 1)
    ghost_a, ghost_b, ghost_creator = unique("ghost"), unique("ghost"), unique("ghost")
    call_id = unique("c")
    details = await expect_error(
        create(
            calls,
            call_id,
            created_by_id=ghost_creator,
            members=[
                call_pb2.MemberRequest(user_id=ghost_a),
                call_pb2.MemberRequest(user_id=known),
                call_pb2.MemberRequest(user_id=ghost_b),
            ],
        ),
        INVALID,
        "UNKNOWN_USERS",
        fields=["data.members[0].user_id", "data.members[2].user_id", "data.created_by_id"],
    )
    assert set(details.metadata["user_ids"].split(",")) == {ghost_a, ghost_b, ghost_creator}
    assert len(details.violations) == 3
    for ghost in (ghost_a, ghost_b, ghost_creator):
        assert ghost in details.message
    await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    assert await query_ids(calls, {"id": call_id}) == []
    # Still creatable afterwards.
    assert (await create(calls, call_id, members=[call_pb2.MemberRequest(user_id=known)])).created


async def test_members_limit_bounds(calls, users, unique):
    member_ids = sorted(await make_users(users, unique, 30))  # same created_at: ordered by user_id
    call_id = unique("c")
    created = await create(
        calls, call_id, members=[call_pb2.MemberRequest(user_id=m) for m in member_ids], members_limit=3
    )
    assert [m.user_id for m in created.members] == member_ids[:3]
    assert created.call.member_count == 30
    assert len((await get(calls, call_id)).members) == 25  # 0 → default
    assert [m.user_id for m in (await get(calls, call_id, members_limit=7)).members] == member_ids[:7]
    assert len((await get(calls, call_id, members_limit=100)).members) == 30
    for bad in (101, -1):
        await expect_error(
            get(calls, call_id, members_limit=bad), INVALID, "INVALID_ARGUMENT", fields=["members_limit"]
        )
        await expect_error(
            create(calls, call_id, members_limit=bad), INVALID, "INVALID_ARGUMENT", fields=["members_limit"]
        )
        await expect_error(
            update(calls, call_id, members_limit=bad), INVALID, "INVALID_ARGUMENT", fields=["members_limit"]
        )
    updated = await update(calls, call_id, members_limit=2, set_custom=struct({"a": 1}))
    assert [m.user_id for m in updated.members] == member_ids[:2]


async def test_create_members_batch_limit(calls, users, unique):
    member_ids = await make_users(users, unique, 100)
    call_id = unique("c")
    extra = unique("u")
    await expect_error(
        create(calls, call_id, members=[call_pb2.MemberRequest(user_id=m) for m in [*member_ids, extra]]),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["data.members"],
    )
    await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND)
    created = await create(calls, call_id, members=[call_pb2.MemberRequest(user_id=m) for m in member_ids])
    assert created.call.member_count == 100


@pytest.mark.parametrize(
    ("call_type", "call_id", "data", "field"),
    [
        ("default", "has space", {}, "id"),
        ("default", "x" * 65, {}, "id"),
        ("default", "colon:x", {}, "id"),
        ("", "ok", {}, "type"),
        ("Default", "ok", {}, "type"),
        ("default", "ok", {"created_by_id": "bad id"}, "data.created_by_id"),
        ("default", "ok", {"team": "bad team!"}, "data.team"),
        ("default", "ok", {"members": [call_pb2.MemberRequest(user_id="bad id")]}, "data.members[0].user_id"),
        ("default", "ok", {"members": [call_pb2.MemberRequest(user_id="")]}, "data.members[0].user_id"),
        (
            "default",
            "ok",
            {"members": [call_pb2.MemberRequest(user_id="a"), call_pb2.MemberRequest(user_id="a")]},
            "data.members[1].user_id",
        ),
        (
            "default",
            "ok",
            {"members": [call_pb2.MemberRequest(user_id="a", role="Host!")]},
            "data.members[0].role",
        ),
        (
            "default",
            "ok",
            {
                "settings_override": call_type_pb2.CallSettings(
                    ring=call_type_pb2.RingSettings(missed_call_timeout_ms=1)
                )
            },
            "data.settings_override.ring.missed_call_timeout_ms",
        ),
    ],
)
async def test_get_or_create_invalid_arguments(calls, unique, call_type, call_id, data, field):
    if call_id == "ok":
        call_id = unique("c")
    await expect_error(
        create(calls, call_id, call_type=call_type, **data), INVALID, "INVALID_ARGUMENT", fields=[field]
    )
    if (
        call_id
        and call_type == "default"
        and " " not in call_id
        and len(call_id) <= 64
        and ":" not in call_id
    ):
        await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND)


async def test_empty_id_creates_a_call_with_a_generated_id(calls, users, unique):
    """Like Stream's "leave it empty and we'll generate one": each request creates a new call."""
    (creator,) = [unique("u")]
    await users.UpsertUsers(user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id=creator)]))
    first = await create(calls, "", created_by_id=creator, custom=struct({"n": 1}))
    second = await create(calls, "", created_by_id=creator, custom=struct({"n": 2}))
    assert first.created and second.created
    assert first.call.id != second.call.id
    for response in (first, second):
        assert str(uuid.UUID(response.call.id, version=4)) == response.call.id
        assert response.call.cid == f"default:{response.call.id}"
        found = await get(calls, response.call.id)
        assert found.call.created_by_user_id == creator
        assert json_format.MessageToDict(found.call.custom) == json_format.MessageToDict(response.call.custom)
    # Validation still applies to the rest of the request, and nothing is created.
    await expect_error(
        create(calls, "", created_by_id="bad id"), INVALID, "INVALID_ARGUMENT", fields=["data.created_by_id"]
    )


async def test_longest_call_id(calls, unique):
    call_id = (unique("c") + "Z" * 64)[:64]
    assert (await create(calls, call_id)).call.id == call_id


async def test_call_custom_size_limit(calls, unique):
    # {"k":"..."} is 8 bytes plus the value: 16384 bytes are allowed, 16385 are not.
    call_id = unique("c")
    created = await create(calls, call_id, custom=struct({"k": "x" * 16_376}))
    assert len(plain(created.call.custom)["k"]) == 16_376
    too_big = unique("c")
    details = await expect_error(
        create(calls, too_big, custom=struct({"k": "x" * 16_377})),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["data.custom"],
    )
    assert "16385" in details.violations[0].description
    await expect_error(get(calls, too_big), grpc.StatusCode.NOT_FOUND)
    # Replacing with too much data.
    await expect_error(update(calls, call_id, custom=struct({"k": "y" * 16_377})), INVALID, fields=["custom"])
    # Growing the stored document past the limit with a partial update.
    await expect_error(
        update(calls, call_id, set_custom=struct({"more": "z"})), INVALID, fields=["set_custom"]
    )
    assert plain((await get(calls, call_id)).call.custom) == {"k": "x" * 16_376}


async def test_member_custom_size_limit_on_create(calls, users, unique):
    (member,) = await make_users(users, unique, 1)
    call_id = unique("c")
    await expect_error(
        create(
            calls, call_id, members=[call_pb2.MemberRequest(user_id=member, custom=struct({"k": "x" * 5113}))]
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["data.members[0].custom"],
    )
    created = await create(
        calls, call_id, members=[call_pb2.MemberRequest(user_id=member, custom=struct({"k": "x" * 5112}))]
    )
    assert created.created and len(plain(created.members[0].custom)["k"]) == 5112


# --- GetCall ------------------------------------------------------------------------------------------


async def test_get_unknown_call(calls, unique):
    call_id = unique("c")
    details = await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    assert details.metadata["cid"] == f"default:{call_id}"
    await expect_error(get(calls, "bad id"), INVALID, fields=["id"])


# --- UpdateCall ---------------------------------------------------------------------------------------


async def test_update_replaces_custom(calls, unique):
    call_id = unique("c")
    created = await create(calls, call_id, custom=struct({"a": 1, "b": {"c": 2}}))
    updated = await update(calls, call_id, custom=struct({"z": "new"}))
    assert plain(updated.call.custom) == {"z": "new"}
    assert updated.call.etag != created.call.etag
    assert updated.call.updated_at.ToDatetime() > created.call.updated_at.ToDatetime()
    assert updated.call.created_at == created.call.created_at
    cleared = await update(calls, call_id, custom=struct({}))  # an empty Struct that is set clears
    assert plain(cleared.call.custom) == {}
    assert (await get(calls, call_id)).call == cleared.call


async def test_update_set_and_unset_custom_paths(calls, unique):
    call_id = unique("c")
    await create(calls, call_id, custom=struct({"keep": 1, "drop": 2, "deep": {"x": 1, "y": 2}, "flat": 3}))
    updated = await update(
        calls,
        call_id,
        set_custom=struct({"deep.z": "new", "fresh.a.b": True, "flat.inner": 1}),
        unset_custom=["drop", "deep.y", "missing.path"],
    )
    assert plain(updated.call.custom) == {
        "keep": 1,
        "deep": {"x": 1, "z": "new"},
        "fresh": {"a": {"b": True}},
        "flat": {"inner": 1},
    }
    assert plain((await get(calls, call_id)).call.custom) == plain(updated.call.custom)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"custom": struct({"a": 1}), "set_custom": struct({"b": 1})}, "custom"),
        ({"custom": struct({"a": 1}), "unset_custom": ["b"]}, "custom"),
        ({"set_custom": struct({"a..b": 1})}, "set_custom.a..b"),
        ({"set_custom": struct({"a b": 1})}, "set_custom.a b"),
        ({"unset_custom": ["ok", "bad path"]}, "unset_custom[1]"),
        ({"set_custom": struct({"a": 1}), "unset_custom": ["a"]}, "unset_custom[0]"),
        (
            {
                "settings_override": call_type_pb2.CallSettings(
                    video=call_type_pb2.VideoSettings(target_height=100)
                )
            },
            "settings_override.video.target_height",
        ),
        (
            {
                "settings_override": call_type_pb2.CallSettings(
                    audio=call_type_pb2.AudioSettings(default_device="tv")
                )
            },
            "settings_override.audio.default_device",
        ),
    ],
)
async def test_update_invalid_arguments(calls, unique, fields, path):
    call_id = unique("c")
    created = await create(calls, call_id, custom=struct({"a": 0}))
    await expect_error(update(calls, call_id, **fields), INVALID, "INVALID_ARGUMENT", fields=[path])
    assert (await get(calls, call_id)).call == created.call


async def test_update_settings_override_merges(calls, call_types, unique):
    call_id = unique("c")
    created = await create(
        calls,
        call_id,
        settings_override=call_type_pb2.CallSettings(
            video=call_type_pb2.VideoSettings(target_width=640, camera_facing="back"),
            limits=call_type_pb2.LimitsSettings(max_participants=10),
        ),
    )
    assert created.call.settings.video.target_width == 640
    assert created.call.settings_override.video.target_width == 640
    assert not created.call.settings_override.video.HasField("target_height")
    assert not created.call.settings_override.HasField("ring")
    default = (await call_types.GetCallType(_get_type("default"))).call_type
    assert created.call.settings.video.target_height == default.settings.video.target_height
    assert created.call.settings.ring == default.settings.ring

    updated = await update(
        calls,
        call_id,
        settings_override=call_type_pb2.CallSettings(
            video=call_type_pb2.VideoSettings(target_width=1920),
            ring=call_type_pb2.RingSettings(incoming_call_timeout_ms=60_000),
        ),
    )
    override = updated.call.settings_override
    assert override.video.target_width == 1920  # replaced
    assert override.video.camera_facing == "back"  # kept
    assert override.limits.max_participants == 10  # kept
    assert override.ring.incoming_call_timeout_ms == 60_000  # added
    effective = updated.call.settings
    # Effective = call type ⊕ override, field by field.
    expected = call_type_pb2.CallSettings()
    expected.CopyFrom(default.settings)
    expected.video.target_width = 1920
    expected.video.camera_facing = "back"
    expected.limits.max_participants = 10
    expected.ring.incoming_call_timeout_ms = 60_000
    assert effective == expected
    assert (await get(calls, call_id)).call.settings == expected


def _get_type(name: str):
    from callplane.v1 import call_type_service_pb2

    return call_type_service_pb2.GetCallTypeRequest(name=name)


async def test_update_backstage_override_changes_backstage_flag(calls, unique):
    call_id = unique("c")
    assert (await create(calls, call_id)).call.backstage is False
    updated = await update(
        calls,
        call_id,
        settings_override=call_type_pb2.CallSettings(backstage=call_type_pb2.BackstageSettings(enabled=True)),
    )
    assert updated.call.backstage is True
    assert await query_ids(calls, {"id": call_id, "backstage": True}) == [call_id]


async def test_update_starts_at(calls, unique):
    call_id = unique("c")
    created = await create(calls, call_id)
    when = datetime(2031, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    updated = await update(calls, call_id, starts_at=timestamp(when))
    assert updated.call.starts_at.ToDatetime(tzinfo=UTC) == when
    assert updated.call.etag != created.call.etag
    later = datetime(2032, 1, 1, tzinfo=UTC)
    again = await update(calls, call_id, starts_at=timestamp(later), set_custom=struct({"x": 1}))
    assert again.call.starts_at.ToDatetime(tzinfo=UTC) == later
    # Not setting starts_at keeps it.
    kept = await update(calls, call_id, set_custom=struct({"y": 2}))
    assert kept.call.starts_at.ToDatetime(tzinfo=UTC) == later


async def test_update_etag_match_and_mismatch(calls, unique):
    call_id = unique("c")
    created = await create(calls, call_id)
    first_etag = created.call.etag
    updated = await update(calls, call_id, set_custom=struct({"v": 1}), etag=first_etag)
    assert plain(updated.call.custom) == {"v": 1}
    second_etag = updated.call.etag
    assert second_etag != first_etag
    details = await expect_error(
        update(calls, call_id, set_custom=struct({"v": 2}), etag=first_etag),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert details.metadata["etag"] == first_etag
    assert details.metadata["current_etag"] == second_etag
    assert plain((await get(calls, call_id)).call.custom) == {"v": 1}
    assert (await update(calls, call_id, set_custom=struct({"v": 3}), etag=second_etag)).call.custom["v"] == 3


async def test_update_without_change_keeps_etag(calls, unique):
    call_id = unique("c")
    created = await create(calls, call_id, custom=struct({"a": 1}))
    same = await update(calls, call_id, set_custom=struct({"a": 1}))
    assert same.call == created.call


async def test_update_unknown_call(calls, unique):
    await expect_error(
        update(calls, unique("c"), set_custom=struct({"a": 1})), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND"
    )


# --- EndCall ------------------------------------------------------------------------------------------


async def test_end_call_twice(calls, unique):
    call_id = unique("c")
    created = await create(calls, call_id)
    ended = (await calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=call_id))).call
    assert ended.HasField("ended_at")
    assert ended.ended_at.ToDatetime() >= created.call.created_at.ToDatetime()
    assert ended.ongoing is False
    assert ended.etag != created.call.etag
    assert (await get(calls, call_id)).call.ended_at == ended.ended_at
    details = await expect_error(
        calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=call_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_ENDED",
    )
    assert details.metadata["cid"] == f"default:{call_id}"
    assert (await get(calls, call_id)).call.ended_at == ended.ended_at
    await expect_error(
        calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=unique("c"))),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )


# --- DeleteCall ---------------------------------------------------------------------------------------


async def test_soft_delete(calls, users, unique):
    (member,) = await make_users(users, unique, 1)
    call_id = unique("c")
    await create(calls, call_id, members=[call_pb2.MemberRequest(user_id=member)], custom=struct({"a": 1}))
    deleted = (await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id))).call
    assert deleted.id == call_id
    assert deleted.HasField("ended_at")
    await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    details = await expect_error(create(calls, call_id), grpc.StatusCode.FAILED_PRECONDITION, "CALL_DELETED")
    assert details.metadata["cid"] == f"default:{call_id}"
    assert await query_ids(calls, {"id": call_id}) == []
    assert await query_ids(calls, {"members": member}) == []
    await expect_error(update(calls, call_id, set_custom=struct({"b": 1})), grpc.StatusCode.NOT_FOUND)
    await expect_error(
        calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=call_id)), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id)),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )
    # A soft-deleted call can still be hard-deleted, which frees the id.
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id, hard=True))
    assert (await create(calls, call_id)).created


async def test_hard_delete_frees_the_id_and_removes_members(calls, users, unique):
    member_a, member_b = await make_users(users, unique, 2)
    call_id = unique("c")
    await create(
        calls,
        call_id,
        members=[call_pb2.MemberRequest(user_id=member_a), call_pb2.MemberRequest(user_id=member_b)],
        custom=struct({"old": True}),
    )
    deleted = await calls.DeleteCall(
        call_service_pb2.DeleteCallRequest(type="default", id=call_id, hard=True)
    )
    assert deleted.call.id == call_id
    await expect_error(get(calls, call_id), grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
    assert await query_ids(calls, {"members": member_a}) == []
    recreated = await create(calls, call_id, custom=struct({"new": True}))
    assert recreated.created is True
    assert plain(recreated.call.custom) == {"new": True}
    assert recreated.call.member_count == 0
    assert list(recreated.members) == []
    members = await calls.QueryMembers(call_service_pb2.QueryMembersRequest(type="default", id=call_id))
    assert list(members.members) == []
    await expect_error(
        calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=unique("c"), hard=True)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_NOT_FOUND",
    )


async def test_delete_ended_call(calls, unique):
    call_id = unique("c")
    await create(calls, call_id)
    ended = (await calls.EndCall(call_service_pb2.EndCallRequest(type="default", id=call_id))).call
    deleted = (await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type="default", id=call_id))).call
    assert deleted.ended_at == ended.ended_at  # keeps the original end time


async def test_concurrent_writers_each_act_as_themselves(server, calls, users, unique) -> None:
    """Writes that arrive together may share one commit (SQLite group commit); each still runs as its
    own caller, so checks made inside the transaction ("as oneself") see the right user."""
    from callplane.v1 import session_service_pb2, session_service_pb2_grpc
    from tests.support import channel, user_token

    joiners = await make_users(users, unique, 12)
    call_ids = [unique("c") for _ in joiners]
    for user_id, call_id in zip(joiners, call_ids, strict=True):
        await create(calls, call_id, created_by_id=user_id)
    channels = [channel(server.target, token=user_token(user_id)) for user_id in joiners]
    try:
        replies = await asyncio.gather(
            *(
                session_service_pb2_grpc.SessionServiceStub(c).JoinCall(
                    session_service_pb2.JoinCallRequest(type="default", id=call_id, user_id=user_id)
                )
                for c, user_id, call_id in zip(channels, joiners, call_ids, strict=True)
            )
        )
        assert [r.participant.user_id for r in replies] == joiners
    finally:
        for c in channels:
            await c.close()
