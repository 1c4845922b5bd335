"""Call settings: the schema with its reference ranges, defaults, merging, and the built-in call types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callplane_server.domain.capabilities import CAPABILITIES, KNOWN_CAPABILITIES
from callplane_server.domain.validation import ROLE_NAME
from callplane_server.errors import ViolationCollector

RingTimeoutMs = Annotated[int, Field(ge=5_000, le=180_000)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AudioSettings(_Section):
    enabled: bool | None = None
    access_request_enabled: bool | None = None
    mic_default_on: bool | None = None
    speaker_default_on: bool | None = None
    opus_dtx_enabled: bool | None = None
    redundant_coding_enabled: bool | None = None
    default_device: Literal["speaker", "earpiece"] | None = None


class VideoSettings(_Section):
    enabled: bool | None = None
    access_request_enabled: bool | None = None
    camera_default_on: bool | None = None
    camera_facing: Literal["front", "back"] | None = None
    target_width: Annotated[int, Field(ge=240, le=3840)] | None = None
    target_height: Annotated[int, Field(ge=240, le=2160)] | None = None
    target_bitrate: Annotated[int, Field(ge=0, le=100_000_000)] | None = None


class ScreensharingSettings(_Section):
    enabled: bool | None = None
    access_request_enabled: bool | None = None


class BackstageSettings(_Section):
    enabled: bool | None = None
    join_ahead_time_seconds: Annotated[int, Field(ge=0, le=86_400)] | None = None


class RingSettings(_Section):
    incoming_call_timeout_ms: RingTimeoutMs | None = None
    auto_cancel_timeout_ms: RingTimeoutMs | None = None
    missed_call_timeout_ms: RingTimeoutMs | None = None


class SessionSettings(_Section):
    inactivity_timeout_seconds: Annotated[int, Field(ge=5, le=900)] | None = None


class LimitsSettings(_Section):
    max_participants: Annotated[int, Field(ge=0, le=100_000)] | None = None
    max_duration_seconds: Annotated[int, Field(ge=0, le=604_800)] | None = None


class CallSettingsModel(_Section):
    """Validates a (possibly partial) settings document against the reference ranges."""

    audio: AudioSettings | None = None
    video: VideoSettings | None = None
    screensharing: ScreensharingSettings | None = None
    backstage: BackstageSettings | None = None
    ring: RingSettings | None = None
    session: SessionSettings | None = None
    limits: LimitsSettings | None = None


DEFAULT_SETTINGS: dict[str, Any] = {
    "audio": {
        "enabled": True,
        "access_request_enabled": False,
        "mic_default_on": True,
        "speaker_default_on": True,
        "opus_dtx_enabled": True,
        "redundant_coding_enabled": True,
        "default_device": "speaker",
    },
    "video": {
        "enabled": True,
        "access_request_enabled": False,
        "camera_default_on": True,
        "camera_facing": "front",
        "target_width": 1280,
        "target_height": 720,
        "target_bitrate": 0,
    },
    "screensharing": {"enabled": True, "access_request_enabled": False},
    "backstage": {"enabled": False, "join_ahead_time_seconds": 0},
    "ring": {
        "incoming_call_timeout_ms": 15_000,
        "auto_cancel_timeout_ms": 15_000,
        "missed_call_timeout_ms": 15_000,
    },
    "session": {"inactivity_timeout_seconds": 30},
    "limits": {"max_participants": 0, "max_duration_seconds": 0},
}


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: every field set in `override` replaces the one in `base`."""
    merged: dict[str, Any] = _copy_json(base)
    for section, values in override.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(_copy_json(values))
    return merged


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, scalars): what deepcopy does here, several times
    faster, and this runs for every call rendered."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def validate_settings(settings: dict[str, Any], field_prefix: str, problems: ViolationCollector) -> None:
    try:
        CallSettingsModel.model_validate(settings)
    except ValidationError as error:
        for item in error.errors():
            path = ".".join(str(part) for part in item["loc"] if not str(part).startswith(("int", "bool")))
            problems.add(f"{field_prefix}.{path}" if path else field_prefix, item["msg"])


def validate_grants(grants: dict[str, list[str]], field_prefix: str, problems: ViolationCollector) -> None:
    for role, capabilities in grants.items():
        if not ROLE_NAME.fullmatch(role):
            problems.add(f"{field_prefix}.{role}", "role names are 1..64 of a-z 0-9 _ -")
        for capability in capabilities:
            if capability not in KNOWN_CAPABILITIES:
                problems.add(f"{field_prefix}.{role}", f"unknown capability {capability!r}")


def normalize_grants(grants: dict[str, list[str]]) -> dict[str, list[str]]:
    """Deduplicated, in the canonical capability order, roles sorted: stable for comparison and display."""
    order = {name: index for index, name in enumerate(CAPABILITIES)}
    return {
        role: sorted(set(capabilities), key=lambda name: order.get(name, len(order)))
        for role, capabilities in sorted(grants.items())
        if capabilities
    }


@dataclass(frozen=True)
class BuiltinCallType:
    settings: dict[str, Any]
    grants: dict[str, list[str]]


_ALL = list(CAPABILITIES)
_MEDIA = ["send-audio", "send-video", "screenshare", "create-reaction"]
_MODERATION = [
    "join-backstage",
    "update-call",
    "update-call-member",
    "remove-call-member",
    "update-call-permissions",
    "mute-users",
    "block-users",
    "kick-user",
    "pin-for-everyone",
]
_HOST = [
    *_MODERATION,
    "read-call",
    "join-call",
    "join-ended-call",
    "end-call",
    "update-call-settings",
    "change-max-duration",
    *_MEDIA,
]


def _grants(user: list[str], call_member: list[str], moderator: list[str]) -> dict[str, list[str]]:
    return normalize_grants(
        {
            "user": user,
            "call_member": call_member,
            "moderator": ["read-call", "join-call", *moderator, *_MODERATION],
            "host": _HOST,
            "admin": _ALL,
        }
    )


BUILTIN_CALL_TYPES: dict[str, BuiltinCallType] = {
    # Meetings and 1:1 calls: anyone may create, read and join; members publish audio, video, screen.
    "default": BuiltinCallType(
        settings=DEFAULT_SETTINGS,
        grants=_grants(
            user=["create-call", "read-call", "join-call", *_MEDIA],
            call_member=["read-call", "join-call", *_MEDIA],
            moderator=_MEDIA,
        ),
    ),
    # One-to-many: calls start in backstage; viewers watch, only hosts publish.
    "livestream": BuiltinCallType(
        settings=merge_settings(
            DEFAULT_SETTINGS,
            {
                "audio": {"access_request_enabled": True},
                "video": {"access_request_enabled": True},
                "backstage": {"enabled": True},
                "screensharing": {"access_request_enabled": True},
            },
        ),
        grants=_grants(
            user=["read-call", "join-call", "create-reaction"],
            call_member=["read-call", "join-call", "create-reaction"],
            moderator=_MEDIA,
        ),
    ),
    # Audio-only rooms: listeners ask to speak; backstage until the host goes live.
    "audio_room": BuiltinCallType(
        settings=merge_settings(
            DEFAULT_SETTINGS,
            {
                "audio": {"access_request_enabled": True, "mic_default_on": False},
                "video": {"enabled": False, "camera_default_on": False},
                "screensharing": {"enabled": False},
                "backstage": {"enabled": True},
            },
        ),
        grants=_grants(
            user=["read-call", "join-call", "create-reaction"],
            call_member=["read-call", "join-call", "create-reaction"],
            moderator=["send-audio", "create-reaction"],
        ),
    ),
    # Local development: plain users may do nearly everything (not change others' permissions).
    "development": BuiltinCallType(
        settings=DEFAULT_SETTINGS,
        grants=_grants(
            user=[c for c in _ALL if c != "update-call-permissions"],
            call_member=[c for c in _ALL if c != "update-call-permissions"],
            moderator=_MEDIA,
        ),
    ),
}
