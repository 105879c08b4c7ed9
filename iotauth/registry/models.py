"""Registry records: devices, their certificates and audit events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509


class DeviceStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class CertificateStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


class RevocationReason(StrEnum):
    """RFC 5280 reason codes, spelled as the CLI accepts them."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key-compromise"
    CA_COMPROMISE = "ca-compromise"
    AFFILIATION_CHANGED = "affiliation-changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation-of-operation"
    PRIVILEGE_WITHDRAWN = "privilege-withdrawn"

    @property
    def crl_reason(self) -> x509.ReasonFlags:
        return x509.ReasonFlags[self.value.replace("-", "_")]


CRL_REASONS: dict[str, x509.ReasonFlags] = {
    **{r.value: r.crl_reason for r in RevocationReason},
    "certificate-hold": x509.ReasonFlags.certificate_hold,
}
"""CRL reason codes by the names the registry stores (``certificate-hold``: pending or suspended)."""


@dataclass(frozen=True)
class Device:
    device_id: str
    hardware_id: str | None
    profile: str
    status: DeviceStatus
    created_at: str
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "hardware_id": self.hardware_id,
            "profile": self.profile,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    fingerprint: str
    device_id: str
    public_key_sha256: str
    not_before: str
    not_after: str
    status: CertificateStatus
    issued_at: str
    pem: str
    revoked_at: str | None = None
    revocation_reason: RevocationReason | None = None
    renewal_of: str | None = None
    """The serial of the certificate this one replaces, for a certificate issued by a renewal over MQTT."""

    def as_dict(self, *, include_pem: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "device_id": self.device_id,
            "public_key_sha256": self.public_key_sha256,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "status": self.status.value,
            "issued_at": self.issued_at,
            "revoked_at": self.revoked_at,
            "revocation_reason": self.revocation_reason.value if self.revocation_reason else None,
            "renewal_of": self.renewal_of,
        }
        if include_pem:
            data["pem"] = self.pem
        return data


@dataclass(frozen=True)
class Credential:
    """A certificate together with the device it belongs to (what the broker decides on)."""

    certificate: CertificateRecord
    device: Device

    @property
    def usable(self) -> bool:
        return self.certificate.status is CertificateStatus.ACTIVE and self.device.status is DeviceStatus.ACTIVE

    def activatable(self, now: datetime, ttl: timedelta) -> bool:
        """A pending renewal (issued over MQTT) of an active device, younger than ``ttl``.

        Its first authentication with the new key activates it (the registry re-checks inside that transaction).
        """
        cert = self.certificate
        if cert.status is not CertificateStatus.PENDING or cert.renewal_of is None or ttl <= timedelta(0):
            return False
        issued = datetime.fromisoformat(cert.issued_at.replace("Z", "+00:00"))
        return self.device.status is DeviceStatus.ACTIVE and now - issued < ttl


@dataclass(frozen=True)
class AuditEvent:
    id: int
    ts: str
    kind: str
    actor: str
    device_id: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "actor": self.actor,
            "device_id": self.device_id,
            "data": self.data,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class RevokedSerial:
    """A CRL entry as the registry knows it (suspensions appear as certificateHold)."""

    serial: str
    revoked_at: str
    reason: x509.ReasonFlags | None


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    events: int
    head_id: int
    head_hash: str
    first_bad_id: int | None = None
    problem: str | None = None
    notes: tuple[str, ...] = ()
    """What could not be checked (and why), for a log that otherwise verifies."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "head_id": self.head_id,
            "head_hash": self.head_hash,
            "first_bad_id": self.first_bad_id,
            "problem": self.problem,
            "notes": list(self.notes),
        }
