"""Input rules shared by the services: identifiers, sizes and list bounds."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from typing import Any

from callplane_server.errors import ViolationCollector

CALL_TYPE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER_ID = re.compile(r"[A-Za-z0-9@_.-]{1,128}")
ROLE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
TEAM_NAME = re.compile(r"[A-Za-z0-9@_.:-]{1,64}")

MAX_BATCH = 100
MAX_MEMBERS_LIMIT = 100
DEFAULT_MEMBERS_LIMIT = 25
DEFAULT_PAGE_LIMIT = 25
# Levels of objects and lists in custom data and filters (the document itself is level 1). protobuf's
# decoders stop at 100 nested messages, and each level costs up to three (Value, Struct, map entry): at
# 32, custom data still decodes inside the deepest response that carries it (an event's member's user).
MAX_CUSTOM_DEPTH = 32
TOO_DEEP = f"custom data and filters may nest at most {MAX_CUSTOM_DEPTH} levels of objects and lists"


def check_pattern(
    value: str, pattern: re.Pattern[str], field: str, what: str, problems: ViolationCollector
) -> None:
    if not value:
        problems.add(field, "is required")
    elif not pattern.fullmatch(value):
        problems.add(field, f"{value!r} is not a valid {what}")


def check_call_key(
    call_type: str, call_id: str, problems: ViolationCollector, *, generated_if_empty: bool = False
) -> None:
    """`generated_if_empty`: an empty id asks the server to make one (see new_call_id)."""
    check_pattern(call_type, CALL_TYPE_NAME, "type", "call type (1..64 of a-z 0-9 _ -)", problems)
    if call_id or not generated_if_empty:
        check_pattern(call_id, CALL_ID, "id", "call id (1..64 of A-Z a-z 0-9 _ -)", problems)


def new_call_id() -> str:
    """A call id made by the server: a random UUID (122 random bits, URL-safe, a valid CALL_ID)."""
    return str(uuid.uuid4())


def custom_size(custom: dict[str, Any]) -> int:
    """Bytes of the compact JSON encoding: what is stored and what the limit is about."""
    return len(json.dumps(custom, separators=(",", ":"), ensure_ascii=False).encode())


def check_custom_size(custom: dict[str, Any], limit: int, field: str, problems: ViolationCollector) -> None:
    size = custom_size(custom)
    if size > limit:
        problems.add(field, f"custom data is {size} bytes; the limit is {limit}")


def custom_depth(value: Any) -> int:
    """Levels of objects and lists in a JSON-shaped value (a scalar: 0)."""
    children: Iterable[Any]
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return 0
    return 1 + max((custom_depth(child) for child in children), default=0)


def check_custom_depth(custom: dict[str, Any], field: str, problems: ViolationCollector) -> None:
    """For documents built by dotted-path edits, whose parts were each within the depth limit."""
    if custom_depth(custom) > MAX_CUSTOM_DEPTH:
        problems.add(field, TOO_DEEP)


def resolve_limit(value: int, field: str, problems: ViolationCollector, *, default: int, maximum: int) -> int:
    if value == 0:
        return default
    if value < 0 or value > maximum:
        problems.add(field, f"must be between 0 and {maximum}")
    return value
