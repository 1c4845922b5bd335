"""Replies built once per state: the service layer hands out the same state objects (a cached call's
record, a cached page of members) until the state changes, and building a reply costs more than
serializing it. Kept here, in the API layer, keyed by the identity of the object the state is anchored on
(held with the reply, so the identity cannot be reused while the entry lives)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Renderings:
    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[int, Hashable], tuple[object, Any]] = OrderedDict()

    def get(self, anchor: object, key: Hashable, build: Callable[[], T]) -> T:
        """The reply for `key` of the state `anchor` stands for, built with `build` the first time."""
        slot = (id(anchor), key)
        found = self._entries.get(slot)
        if found is not None and found[0] is anchor:
            self._entries.move_to_end(slot)
            reply: T = found[1]
            return reply
        reply = build()
        self._entries[slot] = (anchor, reply)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return reply
