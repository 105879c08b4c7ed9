"""Operators' side of rotation: which certificates expire soon, ordering devices to renew now, and progress.

``iotauth rotate`` needs no MQTT identity: it records one order per device in
the registry (one transaction, one ``rotation.requested`` event each), and
the renewer, which follows the change feed, tells each device on
``devices/<id>/commands/rotate``. An open order lets the device renew before
its window (``renew_after``) opens; the order closes when a renewal of the
device is activated.

Progress is read back from the audit log, from the event the order was
recorded after: per device, its latest of ``rotation.refused`` (with the
code), ``certificate.issued`` of a renewal (issued, waiting for the device to
switch) and ``certificate.activated`` of a renewal (renewed, final).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from iotauth.errors import ConfigError
from iotauth.identity import validate_device_id
from iotauth.registry import EventKind, Registry
from iotauth.registry.renewal import Expiring, RotationOrder

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s`` (a bare number is days)."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        value += "d"
    found = _DURATION.fullmatch(value)
    if found is None:
        raise ConfigError(f"bad duration {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 2w")
    return timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])


def expiring_rows(found: Sequence[Expiring], now: datetime) -> list[dict[str, Any]]:
    """What ``iotauth devices expiring`` shows for each certificate (``days_left`` may be negative: expired)."""
    rows = []
    for item in found:
        not_after = datetime.fromisoformat(item.certificate.not_after.replace("Z", "+00:00"))
        rows.append({
            "device_id": item.device.device_id,
            "profile": item.device.profile,
            "serial": item.certificate.serial,
            "not_after": item.certificate.not_after,
            "days_left": round((not_after - now).total_seconds() / 86400, 1),
        })
    return rows


async def choose_devices(registry: Registry, device_ids: Sequence[str], profile: str | None,
                         expiring_within: timedelta | None, now: datetime, *, renewer_id: str) -> list[str]:
    """The devices an order names: the given ids, plus every active device of ``profile``, plus every device
    whose active certificate ends within ``expiring_within``. The renewer itself is never chosen: it renews its
    own certificate when its window opens, without asking anyone."""
    chosen = {validate_device_id(d) for d in device_ids}
    if profile is not None:
        chosen.update(await registry.active_devices_of_profile(profile))
    if expiring_within is not None:
        chosen.update(item.device.device_id for item in await registry.expiring(now + expiring_within))
    chosen.discard(renewer_id)
    return sorted(chosen)


@dataclass(frozen=True)
class Ordered:
    """What ``iotauth rotate`` recorded: the orders, the devices it could not order and why, and where the log stood."""

    orders: tuple[RotationOrder, ...]
    skipped: dict[str, str]
    mark: int


async def order_rotation(registry: Registry, device_ids: Sequence[str], *, actor: str) -> Ordered:
    mark = await registry.last_event_id()
    orders, skipped = await registry.order_rotations(device_ids, actor=actor)
    return Ordered(tuple(orders), skipped, mark)


RENEWED, ISSUED, REFUSED, WAITING = "renewed", "issued", "refused", "waiting"


@dataclass
class Progress:
    """Where each ordered device stands (see the module docstring)."""

    state: dict[str, str]
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return all(s == RENEWED for s in self.state.values())

    def counts(self) -> dict[str, int]:
        counted = Counter(self.state.values())
        return {name: counted.get(name, 0) for name in (RENEWED, ISSUED, REFUSED, WAITING)}

    def summary(self) -> dict[str, Any]:
        return {"requested": len(self.state), **self.counts(),
                "refusals": dict(sorted(self.refusals.items())),
                "not_renewed": sorted(d for d, s in self.state.items() if s != RENEWED)}


class ProgressWatch:
    """Follows the audit log from an order's mark and keeps :class:`Progress` up to date."""

    def __init__(self, registry: Registry, ordered: Ordered) -> None:
        self.registry = registry
        self.cursor = ordered.mark
        self.progress = Progress({o.device_id: WAITING for o in ordered.orders})

    async def poll(self) -> Progress:
        state, refusals = self.progress.state, self.progress.refusals
        while True:
            batch = await self.registry.events(after_id=self.cursor, limit=5000)
            if not batch:
                return self.progress
            self.cursor = batch[-1].id
            for event in batch:
                device = event.device_id
                if device is None or device not in state or state[device] == RENEWED:
                    continue
                if event.kind == EventKind.CERTIFICATE_ACTIVATED and event.data.get("renewal_of"):
                    state[device] = RENEWED
                    refusals.pop(device, None)
                elif event.kind == EventKind.CERTIFICATE_ISSUED and event.data.get("renewal_of"):
                    state[device] = ISSUED
                    refusals.pop(device, None)
                elif event.kind == EventKind.ROTATION_REFUSED:
                    state[device] = REFUSED
                    refusals[device] = str(event.data.get("reason", "?"))
