"""What the managed-Mosquitto follower did, as plain numbers (``iotauth mosquitto follow --metrics-bind``).

The follower and its :class:`~iotauth.export.managed.enforce.Enforcer` bump these where they act; the
collector in :mod:`iotauth.export.metrics` reads them when Prometheus scrapes, on the follower's event
loop. No device id is kept here: kicks are counted by reason, syncs by action.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from iotauth.certs import TIMESTAMP_FORMAT
from iotauth.registry import AuditEvent


@dataclass
class FollowerStats:
    """Counters and moments (``time.time()``) of one follower.

    Attributes:
        kicks: sessions closed (kicked, or withdrawn: kicked and the client deleted) by reason: the event's
            (``certificate-revoked``, ``device-suspended``...), ``device-not-active``, ``reconcile``,
            ``crl-now-in-force``.
        syncs: dynamic-security clients and roles brought in step, by action (``created``, ``changed``).
        reconciles: full comparisons with the registry, by trigger (``start``, ``periodic``, ``reconnected``...).
        failures: failed units of work, retried, by kind (``mosquitto-unavailable``, ``control-error``,
            ``registry``).
        crl_writes, crl_unproven: CRLs published (signed, written, reloaded), and those Mosquitto was not
            seen enforcing.
        rebuilds: state files rewritten from the registry.
        behind_since: time of the oldest event read but not yet applied (None: the last read was caught up).
    """

    kicks: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    reconciles: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    crl_writes: int = 0
    crl_unproven: int = 0
    rebuilds: int = 0
    last_kick: float | None = None
    last_crl: float | None = None
    last_read: float | None = None
    behind_since: float | None = None

    def kicked(self, reason: str) -> None:
        self.kicks[reason] += 1
        self.last_kick = time.time()

    def read(self, pending: Sequence[AuditEvent]) -> None:
        """The change feed was read: ``pending`` is what it holds beyond the position (empty: caught up)."""
        self.last_read = time.time()
        self.behind_since = event_time(pending[0]) if pending else None

    def lag(self, now: float) -> float:
        """Seconds since the oldest event not yet applied was recorded; 0 when caught up."""
        return 0.0 if self.behind_since is None else max(0.0, now - self.behind_since)


def event_time(event: AuditEvent) -> float:
    return datetime.strptime(event.ts, TIMESTAMP_FORMAT).replace(tzinfo=UTC).timestamp()
