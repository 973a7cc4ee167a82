"""A Prometheus histogram the broker's thread writes with no lock: bucket counts and a sum.

prometheus_client's own Histogram takes a lock per observation; the broker observes on its one
loop thread (a task's dispatch, its result) and scrapes only read, so a bisect and two additions
are enough (docs/design.md#scaling-and-losing-peers).
"""

from __future__ import annotations

import bisect

# Seconds: from a trivial warm call (~1 ms) to an LLM chain (minutes).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


class Histogram:
    """Bucket counts and a sum, written by the broker's thread only; read by scrapes."""

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` per bucket, ``+Inf`` last, as HistogramMetricFamily takes them."""
        counts = list(self.counts)
        total = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets
