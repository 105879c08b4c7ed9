"""What a station's runs share (:class:`RunContext`), and what one board's run knows and reports (:class:`RunState`).

Every step of a run reports the same way: a live progress line when it
starts and ends, a journal record when it completes (committed while the next
step talks to the board), and, at the end, one :class:`ProvisionResult`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from iotauth.authority import Authority
from iotauth.certs import fingerprint, now_utc, serial_hex
from iotauth.errors import ProvisioningError, Rejection
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.provisioning.ids import IdSource
from iotauth.provisioning.messages import Info
from iotauth.provisioning.objects import spki_der
from iotauth.provisioning.planner import PlanOptions
from iotauth.provisioning.results import Progress, ProvisionResult, Step
from iotauth.provisioning.session import RetryPolicy, Session
from iotauth.provisioning.transport import Link
from iotauth.registry import CertificateRecord, EventKind, RevocationReason
from iotauth.registry.journal import EventJournal


@dataclass(frozen=True)
class RunContext:
    """What every run on one station shares.

    Attributes:
        station, operator: names for the journal and the report.
        options: the choices the planner needs (profile, modes, pending TTL).
        rsa_min_bits: the profile's RSA floor, for CSRs.
        journal: the station's step journal (submitted at every record).
        progress: the live view's callback (never raises).
        open_link: opens a port.
    """

    authority: Authority
    station: str
    operator: str
    options: PlanOptions
    rsa_min_bits: int
    policy: RetryPolicy
    baudrate: int
    ids: IdSource
    journal: EventJournal
    verifier: ClientCertificateVerifier
    progress: Callable[[Progress], None]
    open_link: Callable[[str], Awaitable[Link]]


class RunState:
    """What one board's run knows so far, and how it reports: progress, journal records, the result."""

    def __init__(self, context: RunContext, port: str) -> None:
        self.context = context
        self.registry = context.authority.registry
        self.journal = context.journal
        self.port = port
        self.started_at = now_utc()
        self.step = Step.IDENTIFY
        self.session: Session | None = None
        self.info: Info | None = None
        self.hardware_id: str | None = None
        self.device_id: str | None = None
        self.resumed = False
        self.public_key: PublicKeyTypes | None = None
        self.cert: x509.Certificate | None = None
        self._t0 = time.monotonic()
        self._step_started = self._t0

    def begin(self, step: Step, detail: str = "") -> None:
        self.step = step
        self._step_started = time.monotonic()
        self.context.progress(Progress(self.port, step, "running", self.hardware_id, self.device_id, detail))

    def record(self, kind: EventKind, data: dict[str, Any]) -> None:
        """Journal a record about this board; it is committed while the run goes on."""
        self.journal.record(kind, self.device_id, data)
        self.journal.submit()

    def done(self, data: dict[str, Any] | None = None, detail: str = "") -> None:
        elapsed_ms = round((time.monotonic() - self._step_started) * 1000, 1)
        self.record(self.step.event, {"hardware_id": self.hardware_id, "station": self.context.station,
                                       "port": self.port, "elapsed_ms": elapsed_ms, **(data or {})})
        self.context.progress(Progress(self.port, self.step, "done", self.hardware_id, self.device_id, detail))

    def result(self, outcome: str, error: str | None = None) -> ProvisionResult:
        session = self.session
        return ProvisionResult(
            port=self.port,
            station=self.context.station,
            operator=self.context.operator,
            result=outcome,
            started_at=self.started_at,
            finished_at=now_utc(),
            step=self.step,
            device_id=self.device_id,
            hardware_id=self.hardware_id,
            serial=serial_hex(self.cert) if self.cert is not None else None,
            fingerprint=fingerprint(self.cert) if self.cert is not None else None,
            error=error,
            resumed=self.resumed,
            bytes_exchanged=session.bytes_sent + session.bytes_received if session else 0,
        )

    def identified(self) -> Info:
        if self.info is None:
            raise ProvisioningError("device not identified")
        return self.info

    def assigned_id(self) -> str:
        if self.device_id is None:
            raise ProvisioningError("no device id assigned")
        return self.device_id

    def certificate(self) -> x509.Certificate:
        if self.cert is None:
            raise ProvisioningError("no certificate")
        return self.cert

    async def supersede(self, records: tuple[CertificateRecord, ...] | list[CertificateRecord]) -> list[str]:
        """Revoke certificates this run replaces (reason: superseded); return their serials."""
        for record in records:
            await self.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED,
                                                   actor=self.context.operator)
        return [record.serial for record in records]

    def check_issued(self, cert: x509.Certificate) -> None:
        """The certificate about to be (or already) on the board verifies, names this device and its key."""
        try:
            identity = self.context.verifier.verify(cert)
        except Rejection as exc:
            raise ProvisioningError(f"the issued certificate does not verify ({exc.code}): {exc}") from None
        if identity.device_id != self.device_id:
            raise ProvisioningError(f"the certificate names {identity.device_id!r}, not {self.device_id!r}")
        if self.public_key is not None and spki_der(cert.public_key()) != spki_der(self.public_key):
            raise ProvisioningError("the certificate's key is not the board's key")
