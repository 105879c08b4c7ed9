"""The fleet at a glance: devices and certificates by status, devices whose certificate runs out soon, the audit head.

``iotauth status`` prints it, and ``iotauth broker --metrics-bind`` exports it
(refreshed every few minutes, never per scrape: it reads every active
certificate). A device counts as *expiring within N days* when the newest
notAfter among its active certificates falls in ``(now, now + N days]``: a
device that already holds a renewed certificate is not expiring, whatever its
old one does. Active devices with no unexpired active certificate are counted
apart (*lapsed*): they can no longer connect anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from iotauth.certs import cert_time
from iotauth.registry.backend import SqlConnection
from iotauth.registry.models import CertificateStatus, DeviceStatus

HORIZONS = (7, 30)
"""Days ahead that ``iotauth status`` and the broker's metrics report (``devices expiring within``)."""

# Each active device's newest notAfter among its active certificates (one row per device, computed in SQL).
_NEWEST = ("SELECT MAX(c.not_after) AS newest, c.device_id AS device_id FROM certificates c "
           "JOIN devices d ON d.device_id = c.device_id "
           "WHERE d.status = 'active' AND c.status = 'active' GROUP BY c.device_id")


@dataclass(frozen=True)
class Expiring:
    device_id: str
    not_after: str


@dataclass(frozen=True)
class AuditHead:
    id: int
    ts: str
    kind: str
    hash: str


@dataclass(frozen=True)
class FleetSummary:
    """What :func:`fleet_summary` read (``expiring`` maps a horizon in days to a device count)."""

    at: datetime
    devices: dict[str, int]
    certificates: dict[str, int]
    expiring: dict[int, int]
    lapsed: int
    soonest: list[Expiring] = field(default_factory=list)
    head: AuditHead | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": cert_time(self.at),
            "devices": dict(self.devices),
            "certificates": dict(self.certificates),
            "expiring_within_days": {str(days): count for days, count in self.expiring.items()},
            "lapsed": self.lapsed,
            "soonest": [{"device_id": e.device_id, "not_after": e.not_after} for e in self.soonest],
            "audit_head": None if self.head is None else {"id": self.head.id, "ts": self.head.ts,
                                                          "kind": self.head.kind, "hash": self.head.hash},
        }


async def fleet_summary(reader: SqlConnection, now: datetime, horizons: Sequence[int] = HORIZONS, *,
                        soonest: int = 10) -> FleetSummary:
    """Read the summary in a handful of queries (counts in SQL, never a row per device into Python)."""
    devices = {s.value: 0 for s in DeviceStatus}
    for status, count in await reader.fetchall("SELECT status, COUNT(*) FROM devices GROUP BY status"):
        devices[str(status)] = int(count)
    certificates = {s.value: 0 for s in CertificateStatus}
    for status, count in await reader.fetchall("SELECT status, COUNT(*) FROM certificates GROUP BY status"):
        certificates[str(status)] = int(count)
    days = sorted(set(horizons))
    start = cert_time(now)
    limits = [cert_time(now + timedelta(days=d)) for d in days]
    sums = ", ".join("COALESCE(SUM(CASE WHEN newest > ? AND newest <= ? THEN 1 ELSE 0 END), 0)" for _ in days)
    params: list[Any] = [value for limit in limits for value in (start, limit)]
    row = await reader.fetchone(
        f"SELECT {sums + ', ' if sums else ''}COALESCE(SUM(CASE WHEN newest <= ? THEN 1 ELSE 0 END), 0) "
        f"FROM ({_NEWEST}) AS latest", [*params, start])
    counts = [int(v) for v in row] if row is not None else [0] * (len(days) + 1)
    listed: list[Expiring] = []
    if soonest and days:
        found = await reader.fetchall(
            f"SELECT device_id, newest FROM ({_NEWEST}) AS latest WHERE newest > ? AND newest <= ? "
            "ORDER BY newest, device_id LIMIT ?", [start, limits[-1], soonest])
        listed = [Expiring(str(device_id), str(not_after)) for device_id, not_after in found]
    head_row = await reader.fetchone("SELECT id, ts, kind, hash FROM events ORDER BY id DESC LIMIT 1")
    head = None if head_row is None else AuditHead(int(head_row[0]), str(head_row[1]), str(head_row[2]),
                                                   str(head_row[3]))
    return FleetSummary(now, devices, certificates, dict(zip(days, counts[:-1], strict=True)), counts[-1],
                        listed, head)


__all__ = ["HORIZONS", "AuditHead", "Expiring", "FleetSummary", "fleet_summary"]
