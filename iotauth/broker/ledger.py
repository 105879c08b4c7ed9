"""Refusals aggregated per identity and source, so that a flood cannot thin out the audit trail.

The first refusal of a kind (an event kind, a certificate fingerprint or none,
a reason, a source address) is written at the next audit flush with everything
known about it: device id, fingerprint, client id, peer, detail. Repeats are
*counted*, never dropped: the entry is written again with the number of
refusals since its last write and the first and last time seen, at an
interval that starts at one second and doubles (up to a minute) while the
refusals continue. A connect with a stolen, revoked certificate hidden in a
cheap TCP flood therefore still leaves an event naming its device,
fingerprint and peer, and the flood itself costs one event per source per
interval, not one per connection.

Memory is bounded: at ``max_keys`` distinct keys, further new keys are folded
into one ``overflow`` entry per event kind and reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from iotauth.registry.events import EventKind

FIRST_INTERVAL = 1.0
MAX_INTERVAL = 60.0
IDLE_EXPIRY = 300.0
Key = tuple[EventKind, str | None, str, str]  # (event kind, fingerprint, reason, source)


@dataclass
class _Entry:
    kind: EventKind
    device_id: str | None
    data: dict[str, Any]
    first_seen: float
    last_seen: float
    total: int = 0
    unwritten: int = 0
    written_at: float | None = None
    interval: float = FIRST_INTERVAL


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def source_of(peer: str) -> str:
    """``1.2.3.4:5678`` -> ``1.2.3.4``; ``[::1]:5678`` -> ``::1``."""
    if peer.startswith("["):
        return peer[1 : peer.find("]")] if "]" in peer else peer
    return peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer


class DenialLedger:
    """See the module docstring. ``record`` is cheap (a dict lookup); ``due`` yields the events to write."""

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._wall = wall
        self._entries: dict[Key, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, kind: EventKind, reason: str, device_id: str | None, data: dict[str, Any]) -> bool:
        """Count one refusal; ``True`` if it is the first of its key (worth a log line of its own)."""
        fingerprint = data.get("fingerprint")
        key: Key = (kind, fingerprint, reason, source_of(str(data.get("peer") or "")))
        entry = self._entries.get(key)
        wall = self._wall()
        if entry is None:
            if len(self._entries) >= self.max_keys:
                key = (kind, None, reason, "overflow")
                entry = self._entries.get(key)
            if entry is None:
                details = dict(data) if key[3] != "overflow" else {"peer": "(many sources)", "overflow": True}
                entry = self._entries[key] = _Entry(kind, device_id if key[3] != "overflow" else None,
                                                    {"reason": reason, **details}, wall, wall)
                entry.total = entry.unwritten = 1
                return key[3] != "overflow"
        entry.total += 1
        entry.unwritten += 1
        entry.last_seen = wall
        return False

    def due(self, *, everything: bool = False) -> Iterator[tuple[EventKind, str | None, dict[str, Any]]]:
        """Events to write now: new keys, and repeats whose interval has passed (all of them if ``everything``)."""
        now = self._clock()
        idle: list[Key] = []
        for key, entry in self._entries.items():
            if entry.unwritten and (everything or entry.written_at is None or now - entry.written_at >= entry.interval):
                data = {**entry.data, "count": entry.unwritten, "total": entry.total,
                        "first_seen": _iso(entry.first_seen), "last_seen": _iso(entry.last_seen)}
                if entry.written_at is not None:
                    entry.interval = min(MAX_INTERVAL, entry.interval * 2)
                entry.unwritten = 0
                entry.written_at = now
                yield entry.kind, entry.device_id, data
            elif not entry.unwritten and entry.written_at is not None and now - entry.written_at > IDLE_EXPIRY:
                idle.append(key)
        for key in idle:
            del self._entries[key]

    @property
    def unwritten(self) -> int:
        return sum(entry.unwritten for entry in self._entries.values())
