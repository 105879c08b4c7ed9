"""How a device should retry a broker: exponential backoff with full jitter, longer after "server busy".

After a broker restart or an outage every device of a fleet reconnects at once. If each retried on a fixed
timer they would arrive in synchronised waves and the broker's admission control would refuse most of each
wave. Full jitter (each delay drawn uniformly from zero to an exponentially growing ceiling) spreads them out,
so a fleet comes back at the rate the broker can admit it.

What counts as "server busy": CONNACK 0x03 (server unavailable: the broker cannot read its registry or audit
log, or is at capacity), and a connection closed before the TLS handshake or before CONNACK without a return
code (admission control refused it before it could say why). Both double the ceiling twice, so a busy server
sees the device less often. A refusal with CONNACK 0x05 (not authorised) is not busy: the device's
certificate is revoked, suspended or unknown, and retrying quickly will not change that; it waits the cap.

This module is the policy the reference agent (``firmware_tools.agent``), ``examples/sensor.py`` and the
fleet benchmarks use; firmware in C implements the same three rules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    CONNECTED = "connected"
    NETWORK = "network"  # no route, refused, timed out, TLS failure of our own
    BUSY = "busy"  # CONNACK 0x03, or closed by the server before CONNACK
    REFUSED = "refused"  # CONNACK 0x01, 0x02, 0x04, 0x05: retrying soon will not help


@dataclass
class Backoff:
    """Delays for the next attempt. ``base`` and ``cap`` in seconds; ``rng`` for reproducible tests."""

    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def delay(self, outcome: Outcome) -> float:
        """Seconds to wait before the next attempt, after an attempt that ended with ``outcome``."""
        if outcome is Outcome.CONNECTED:
            self.attempt = 0
            return 0.0
        if outcome is Outcome.REFUSED:
            self.attempt += 1
            return self.cap
        self.attempt += 2 if outcome is Outcome.BUSY else 1
        ceiling = min(self.cap, self.base * 2 ** (self.attempt - 1))
        return self.rng.uniform(0.0, ceiling)


def outcome_of(return_code: int | None) -> Outcome:
    """Classify a connection attempt by its CONNACK code (``None``: closed before any CONNACK)."""
    if return_code == 0:
        return Outcome.CONNECTED
    if return_code is None or return_code == 0x03:
        return Outcome.BUSY
    return Outcome.REFUSED
