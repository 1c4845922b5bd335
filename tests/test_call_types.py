"""CallTypeService: built-ins, create/get/list/update/delete, settings ranges and grants."""

from __future__ import annotations

import grpc
import pytest

from callplane.v1 import call_service_pb2, call_type_pb2, call_type_service_pb2
from callplane_server.domain.capabilities import BUILTIN_ROLES, CAPABILITIES
from tests.errors import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT

BUILTINS = ("audio_room", "default", "development", "livestream")
ROLES = BUILTIN_ROLES  # the server's own names, not a copy that could drift from them

# section, field, (invalid values), (valid boundary values)
RANGES = [
    ("video", "target_width", (239, 3841, 0), (240, 3840)),
    ("video", "target_height", (239, 2161), (240, 2160)),
    ("video", "target_bitrate", (-1,), (0, 5_000_000)),
    ("backstage", "join_ahead_time_seconds", (-1, 86_401), (0, 86_400)),
    ("ring", "incoming_call_timeout_ms", (4_999, 180_001, 0), (5_000, 180_000)),
    ("ring", "auto_cancel_timeout_ms", (4_999, 180_001), (5_000, 180_000)),
    ("ring", "missed_call_timeout_ms", (4_999, 180_001), (5_000, 180_000)),
    ("session", "inactivity_timeout_seconds", (4, 901, 0), (5, 900)),
    ("limits", "max_participants", (-1, 100_001), (0, 100_000)),
    ("limits", "max_duration_seconds", (-1, 604_801), (0, 604_800)),
    ("audio", "default_device", ("loudspeaker", ""), ("speaker", "earpiece")),
    ("video", "camera_facing", ("side", ""), ("front", "back")),
]
RANGE_IDS = [f"{section}.{name}" for section, name, _, _ in RANGES]

SETTINGS_MESSAGES = {
    "audio": call_type_pb2.AudioSettings,
    "video": call_type_pb2.VideoSettings,
    "screensharing": call_type_pb2.ScreensharingSettings,
    "backstage": call_type_pb2.BackstageSettings,
    "ring": call_type_pb2.RingSettings,
    "session": call_type_pb2.SessionSettings,
    "limits": call_type_pb2.LimitsSettings,
}


def settings(section: str, **values: object) -> call_type_pb2.CallSettings:
    return call_type_pb2.CallSettings(**{section: SETTINGS_MESSAGES[section](**values)})


def assert_full(settings_message: call_type_pb2.CallSettings) -> None:
    """Every section and every optional scalar in it is set."""
    for section_field in call_type_pb2.CallSettings.DESCRIPTOR.fields:
        assert settings_message.HasField(section_field.name), section_field.name
        section = getattr(settings_message, section_field.name)
        for field in section.DESCRIPTOR.fields:
            assert section.HasField(field.name), f"{section_field.name}.{field.name} is unset"


def grants_of(call_type: call_type_pb2.CallType) -> dict[str, list[str]]:
    return {role: list(grant.capabilities) for role, grant in call_type.grants.items()}


def name_for(unique) -> str:
    return unique("ct").lower()


# --- built-ins ---------------------------------------------------------------------------------------


async def test_builtins_are_listed_in_name_order(call_types):
    response = await call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
    names = [call_type.name for call_type in response.call_types]
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", BUILTINS)
async def test_builtin_has_full_settings_and_grants(call_types, name):
    call_type = (await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))).call_type
    assert call_type.name == name
    assert_full(call_type.settings)
    grants = grants_of(call_type)
    assert set(ROLES) <= set(grants), grants
    for role, capabilities in grants.items():
        assert capabilities, role
        assert set(capabilities) <= set(CAPABILITIES), (role, capabilities)
    assert set(grants["admin"]) == set(CAPABILITIES)
    assert "join-call" in grants["call_member"]
    assert "read-call" in grants["user"]
    assert call_type.HasField("created_at") and call_type.HasField("updated_at")


async def test_builtin_settings_differ_by_purpose(call_types):
    async def get(name: str) -> call_type_pb2.CallType:
        return (await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))).call_type

    default, livestream, audio_room, development = [
        await get(name) for name in ("default", "livestream", "audio_room", "development")
    ]
    assert default.settings.backstage.enabled is False
    assert default.settings.video.enabled is True
    assert livestream.settings.backstage.enabled is True
    assert audio_room.settings.backstage.enabled is True
    assert audio_room.settings.video.enabled is False
    assert audio_room.settings.audio.mic_default_on is False
    assert "create-call" in grants_of(default)["user"]
    assert "send-video" not in grants_of(livestream)["user"]
    assert "send-audio" not in grants_of(audio_room)["user"]
    assert "update-call-permissions" not in grants_of(development)["user"]
    assert "end-call" in grants_of(development)["user"]


# --- create / get -------------------------------------------------------------------------------------


async def test_create_fills_defaults_and_default_grants(call_types, unique):
    name = name_for(unique)
    created = (
        await call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=name, settings=settings("video", target_width=1920, camera_facing="back")
            )
        )
    ).call_type
    assert created.name == name
    assert_full(created.settings)
    assert created.settings.video.target_width == 1920
    assert created.settings.video.camera_facing == "back"
    default = (
        await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name="default"))
    ).call_type
    # Unset fields take the documented defaults (those of the built-in `default` type).
    assert created.settings.video.target_height == default.settings.video.target_height
    assert created.settings.audio == default.settings.audio
    assert created.settings.ring == default.settings.ring
    assert grants_of(created) == grants_of(default)

    fetched = (await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))).call_type
    assert fetched == created
    listed = await call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
    assert created in listed.call_types


async def test_create_with_grants(call_types, unique):
    name = name_for(unique)
    grants = {
        "user": call_type_pb2.Capabilities(capabilities=["read-call", "join-call", "read-call"]),
        "guest": call_type_pb2.Capabilities(capabilities=["read-call"]),
    }
    created = (
        await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name, grants=grants))
    ).call_type
    result = grants_of(created)
    assert set(result) == {"user", "guest"}
    assert sorted(result["user"]) == ["join-call", "read-call"]  # deduplicated
    assert result["guest"] == ["read-call"]


async def test_create_existing_name_is_already_exists(call_types, unique):
    name = name_for(unique)
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    details = await expect_error(
        call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name)),
        grpc.StatusCode.ALREADY_EXISTS,
        "CALL_TYPE_EXISTS",
    )
    assert details.metadata.get("type") == name
    await expect_error(
        call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name="default")),
        grpc.StatusCode.ALREADY_EXISTS,
        "CALL_TYPE_EXISTS",
    )


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "dot.ted", "x" * 65, "colon:x"])
async def test_create_invalid_name(call_types, bad):
    await expect_error(
        call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=bad)),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["name"],
    )


async def test_create_longest_name(call_types, unique):
    name = (name_for(unique) + "x" * 64)[:64]
    created = await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    assert created.call_type.name == name


async def test_get_unknown_is_not_found(call_types, unique):
    name = name_for(unique)
    details = await expect_error(
        call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )
    assert details.metadata.get("type") == name


# --- settings ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "field", "invalid", "valid"), RANGES, ids=RANGE_IDS)
async def test_settings_ranges_on_create(call_types, unique, section, field, invalid, valid):
    path = f"settings.{section}.{field}"
    for value in invalid:
        name = name_for(unique)
        details = await expect_error(
            call_types.CreateCallType(
                call_type_service_pb2.CreateCallTypeRequest(
                    name=name, settings=settings(section, **{field: value})
                )
            ),
            INVALID,
            "INVALID_ARGUMENT",
            fields=[path],
        )
        assert details.fields == [path], (value, details.fields)
        await expect_error(
            call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name)),
            grpc.StatusCode.NOT_FOUND,
        )
    for value in valid:
        created = await call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=name_for(unique), settings=settings(section, **{field: value})
            )
        )
        assert getattr(getattr(created.call_type.settings, section), field) == value


@pytest.mark.parametrize(("section", "field", "invalid", "valid"), RANGES, ids=RANGE_IDS)
async def test_settings_ranges_on_update(call_types, unique, section, field, invalid, valid):
    name = name_for(unique)
    before = (
        await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    ).call_type
    for value in invalid:
        await expect_error(
            call_types.UpdateCallType(
                call_type_service_pb2.UpdateCallTypeRequest(
                    name=name, settings=settings(section, **{field: value})
                )
            ),
            INVALID,
            "INVALID_ARGUMENT",
            fields=[f"settings.{section}.{field}"],
        )
    after = (await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))).call_type
    assert after == before
    updated = await call_types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(
            name=name, settings=settings(section, **{field: valid[-1]})
        )
    )
    assert getattr(getattr(updated.call_type.settings, section), field) == valid[-1]


async def test_every_invalid_setting_is_reported_at_once(call_types, unique):
    request = call_type_service_pb2.CreateCallTypeRequest(
        name=name_for(unique),
        settings=call_type_pb2.CallSettings(
            video=call_type_pb2.VideoSettings(target_width=1, target_height=1),
            ring=call_type_pb2.RingSettings(incoming_call_timeout_ms=1),
            session=call_type_pb2.SessionSettings(inactivity_timeout_seconds=1000),
        ),
    )
    details = await expect_error(
        call_types.CreateCallType(request),
        INVALID,
        fields=[
            "settings.video.target_width",
            "settings.video.target_height",
            "settings.ring.incoming_call_timeout_ms",
            "settings.session.inactivity_timeout_seconds",
        ],
    )
    assert len(details.violations) == 4


# --- grants -------------------------------------------------------------------------------------------


async def test_unknown_capability(call_types, unique):
    name = name_for(unique)
    details = await expect_error(
        call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=name, grants={"user": call_type_pb2.Capabilities(capabilities=["join-call", "fly"])}
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["grants.user"],
    )
    assert "fly" in details.violations[0].description
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    await expect_error(
        call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(
                name=name, grants={"host": call_type_pb2.Capabilities(capabilities=["teleport"])}
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        fields=["grants.host"],
    )


async def test_invalid_role_name(call_types, unique):
    await expect_error(
        call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=name_for(unique),
                grants={"Bad Role": call_type_pb2.Capabilities(capabilities=["read-call"])},
            )
        ),
        INVALID,
        fields=["grants.Bad Role"],
    )


# --- update -------------------------------------------------------------------------------------------


async def test_update_merges_settings_and_replaces_named_grants(call_types, unique):
    name = name_for(unique)
    created = (
        await call_types.CreateCallType(
            call_type_service_pb2.CreateCallTypeRequest(
                name=name, settings=settings("video", target_width=640)
            )
        )
    ).call_type
    updated = (
        await call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(
                name=name,
                settings=call_type_pb2.CallSettings(
                    video=call_type_pb2.VideoSettings(target_height=480),
                    ring=call_type_pb2.RingSettings(auto_cancel_timeout_ms=30_000),
                ),
                grants={
                    "user": call_type_pb2.Capabilities(capabilities=["read-call"]),
                    "moderator": call_type_pb2.Capabilities(capabilities=[]),  # removes the role
                },
            )
        )
    ).call_type
    assert_full(updated.settings)
    assert updated.settings.video.target_width == 640  # kept
    assert updated.settings.video.target_height == 480  # replaced
    assert updated.settings.ring.auto_cancel_timeout_ms == 30_000
    assert updated.settings.ring.incoming_call_timeout_ms == created.settings.ring.incoming_call_timeout_ms
    assert updated.settings.audio == created.settings.audio
    grants = grants_of(updated)
    assert grants["user"] == ["read-call"]
    assert "moderator" not in grants
    assert grants["host"] == grants_of(created)["host"]  # roles not named are kept
    assert updated.created_at == created.created_at
    assert updated.updated_at.ToDatetime() > created.updated_at.ToDatetime()
    fetched = (await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))).call_type
    assert fetched == updated


async def test_update_without_changes_keeps_everything(call_types, unique):
    name = name_for(unique)
    created = (
        await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    ).call_type
    updated = (
        await call_types.UpdateCallType(call_type_service_pb2.UpdateCallTypeRequest(name=name))
    ).call_type
    assert updated.settings == created.settings
    assert grants_of(updated) == grants_of(created)


async def test_update_unknown_is_not_found(call_types, unique):
    await expect_error(
        call_types.UpdateCallType(
            call_type_service_pb2.UpdateCallTypeRequest(
                name=name_for(unique), settings=settings("video", enabled=False)
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )


async def test_update_of_type_changes_effective_settings_of_its_calls(call_types, calls, unique):
    name = name_for(unique)
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    call_id = unique("c")
    created = await calls.GetOrCreateCall(
        call_service_pb2.GetOrCreateCallRequest(
            type=name,
            id=call_id,
            data=call_service_pb2.CallData(settings_override=settings("video", target_width=800)),
        )
    )
    assert created.call.settings.video.target_width == 800
    await call_types.UpdateCallType(
        call_type_service_pb2.UpdateCallTypeRequest(
            name=name,
            settings=call_type_pb2.CallSettings(
                video=call_type_pb2.VideoSettings(target_width=1920, target_height=1080)
            ),
        )
    )
    fetched = await calls.GetCall(call_service_pb2.GetCallRequest(type=name, id=call_id))
    assert fetched.call.settings.video.target_width == 800  # the call's override wins
    assert fetched.call.settings.video.target_height == 1080  # inherited from the type


# --- delete -------------------------------------------------------------------------------------------


async def test_delete_unused_type(call_types, unique):
    name = name_for(unique)
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    await call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name))
    await expect_error(
        call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )
    listed = await call_types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
    assert name not in [call_type.name for call_type in listed.call_types]
    await expect_error(
        call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )
    # The name is free again.
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))


async def test_delete_type_in_use_is_failed_precondition(call_types, calls, unique):
    name = name_for(unique)
    await call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name=name))
    call_id = unique("c")
    await calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type=name, id=call_id))
    details = await expect_error(
        call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_TYPE_IN_USE",
    )
    assert details.metadata.get("type") == name
    # A soft-deleted call still references the type.
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type=name, id=call_id))
    await expect_error(
        call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CALL_TYPE_IN_USE",
    )
    await call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name))
    await calls.DeleteCall(call_service_pb2.DeleteCallRequest(type=name, id=call_id, hard=True))
    await call_types.DeleteCallType(call_type_service_pb2.DeleteCallTypeRequest(name=name))
    await expect_error(
        call_types.GetCallType(call_type_service_pb2.GetCallTypeRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_call_of_unknown_type_is_not_found(calls, unique):
    await expect_error(
        calls.GetOrCreateCall(call_service_pb2.GetOrCreateCallRequest(type=name_for(unique), id="c1")),
        grpc.StatusCode.NOT_FOUND,
        "CALL_TYPE_NOT_FOUND",
    )
