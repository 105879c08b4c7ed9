"""A latency histogram kept as plain numbers by the code that measures, exported by a metrics collector.

The broker measures revocation -> disconnect on its own event loop; this is a
bisect-free loop over a dozen bounds and three additions, with no lock and no
``prometheus_client`` object on that path (:mod:`iotauth.metrics` turns it
into a Prometheus histogram when scraped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: from a fast local decision to a revocation that waited for a slow registry."""


@dataclass
class LatencyHistogram:
    """Observations per bucket (not cumulative), their sum and their count."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        value = max(seconds, 0.0)
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
                break
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ending with ``+Inf``."""
        pairs, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            pairs.append((repr(bound), running))
        pairs.append(("+Inf", self.count))
        return pairs


__all__ = ["LATENCY_BUCKETS", "LatencyHistogram"]
