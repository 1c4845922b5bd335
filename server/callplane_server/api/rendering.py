"""Replies built once per state: the service layer hands out the same state objects (a cached call's
record, a cached page of members) until the state changes, and building a reply costs more than
serializing it. Kept here, in the API layer, beside the object the state is anchored on: an entry lives
exactly as long as its anchor (a weak reference drops it), so replies go with the cache entry that made
them, and the anchors of one-off states (a write's result) take their replies with them."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Renderings:
    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[Any], dict[Hashable, Any]]] = {}

    def get(self, anchor: object, key: Hashable, build: Callable[[], T]) -> T:
        """The reply for `key` of the state `anchor` stands for, built with `build` the first time."""
        slot = id(anchor)
        found = self._entries.get(slot)
        if found is None or found[0]() is not anchor:
            found = (weakref.ref(anchor, self._forget(slot)), {})
            self._entries[slot] = found
        replies = found[1]
        if key in replies:
            reply: T = replies[key]
            return reply
        reply = replies[key] = build()
        return reply

    def _forget(self, slot: int) -> Callable[[weakref.ref[Any]], None]:
        def forget(reference: weakref.ref[Any]) -> None:
            found = self._entries.get(slot)
            if found is not None and found[0] is reference:  # not a newer anchor at the same address
                del self._entries[slot]

        return forget
