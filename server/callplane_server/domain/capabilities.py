"""Capability and role names (Stream's vocabulary)."""

from __future__ import annotations

CAPABILITIES: tuple[str, ...] = (
    "create-call",
    "read-call",
    "join-call",
    "join-ended-call",
    "join-backstage",
    "update-call",
    "update-call-settings",
    "end-call",
    "change-max-duration",
    "send-audio",
    "send-video",
    "screenshare",
    "remove-call-member",
    "update-call-member",
    "update-call-permissions",
    "mute-users",
    "block-users",
    "kick-user",
    "pin-for-everyone",
    "create-reaction",
)
KNOWN_CAPABILITIES = frozenset(CAPABILITIES)

BUILTIN_ROLES: tuple[str, ...] = ("user", "moderator", "host", "admin", "call_member")
