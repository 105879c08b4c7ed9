"""What a provisioning run reports: its steps, live progress per port, and the traceability record per board."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from iotauth.certs import timestamp
from iotauth.registry import EventKind


class Step(IntEnum):
    IDENTIFY = 1
    CHECK = 2
    ASSIGN = 3
    KEY = 4
    ISSUE = 5
    WRITE = 6
    VERIFY = 7
    PROVE = 8
    COMMIT = 9
    ACTIVATE = 10

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def event(self) -> EventKind:
        """The journal event kind written when this step completes."""
        return _STEP_EVENTS[self]


_STEP_EVENTS = {
    Step.IDENTIFY: EventKind.PROVISIONING_IDENTIFIED,
    Step.CHECK: EventKind.PROVISIONING_CHECKED,
    Step.ASSIGN: EventKind.PROVISIONING_ASSIGNED,
    Step.KEY: EventKind.PROVISIONING_KEYED,
    Step.ISSUE: EventKind.PROVISIONING_ISSUED,
    Step.WRITE: EventKind.PROVISIONING_WRITTEN,
    Step.VERIFY: EventKind.PROVISIONING_VERIFIED,
    Step.PROVE: EventKind.PROVISIONING_PROVEN,
    Step.COMMIT: EventKind.PROVISIONING_COMMITTED,
    Step.ACTIVATE: EventKind.PROVISIONING_ACTIVATED,
}
STEP_COUNT = len(Step)


@dataclass(frozen=True)
class Progress:
    """A port's state, as the live view shows it."""

    port: str
    step: Step
    state: str  # "running", "done", "failed"
    hardware_id: str | None = None
    device_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class ProvisionResult:
    """The traceability record of one board on one port."""

    port: str
    station: str
    operator: str
    result: str  # "provisioned", "already-provisioned" or "failed"
    started_at: datetime
    finished_at: datetime
    step: Step
    device_id: str | None = None
    hardware_id: str | None = None
    serial: str | None = None
    fingerprint: str | None = None
    error: str | None = None
    resumed: bool = False
    bytes_exchanged: int = 0

    @property
    def ok(self) -> bool:
        return self.result != "failed"

    def as_row(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "hardware_id": self.hardware_id,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "port": self.port,
            "station": self.station,
            "operator": self.operator,
            "started_at": timestamp(self.started_at),
            "finished_at": timestamp(self.finished_at),
            "result": self.result,
            "error": self.error,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.as_row(), "step": self.step.label, "resumed": self.resumed,
                "bytes_exchanged": self.bytes_exchanged}
