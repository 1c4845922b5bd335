"""Configurable size limits for custom data (bytes of compact JSON)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_call_custom_bytes: int = 16_384
    max_member_custom_bytes: int = 5_120
    max_user_custom_bytes: int = 5_120
    max_participant_custom_bytes: int = 4_096
    max_session_custom_bytes: int = 102_400
    max_custom_event_bytes: int = 5_120
