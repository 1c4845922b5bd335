"""Dotted-path edits of custom data (`set` / `unset`)."""

from __future__ import annotations

import copy
import re
from typing import Any

from callplane_server.errors import ViolationCollector

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_DEPTH = 10


def split_path(path: str, field: str, problems: ViolationCollector) -> list[str] | None:
    segments = path.split(".")
    if len(segments) > MAX_DEPTH or not all(_SEGMENT.fullmatch(s) for s in segments):
        problems.add(field, f"{path!r} is not a dotted path of 1..{MAX_DEPTH} segments of A-Z a-z 0-9 _ -")
        return None
    return segments


def apply_set(document: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Returns a copy with `value` at `path`, creating objects on the way (and replacing non-objects)."""
    result = copy.deepcopy(document)
    node = result
    for segment in path[:-1]:
        child = node.get(segment)
        if not isinstance(child, dict):
            child = {}
            node[segment] = child
        node = child
    node[path[-1]] = value
    return result


def apply_unset(document: dict[str, Any], path: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(document)
    node: Any = result
    for segment in path[:-1]:
        node = node.get(segment) if isinstance(node, dict) else None
        if node is None:
            return result
    if isinstance(node, dict):
        node.pop(path[-1], None)
    return result
