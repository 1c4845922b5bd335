"""A histogram kept as plain numbers by the part that observes it; the metrics layer renders it (so the
store and services need not know Prometheus, and several servers in one process keep their own)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Distribution:
    """Counts of observations per bucket (`bounds` are inclusive upper bounds, ascending), their sum
    and count, as a Prometheus histogram has them."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations at or below it), +Inf last."""
        running = 0
        buckets: list[tuple[str, int]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return buckets
