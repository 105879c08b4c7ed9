"""Rows to records: the column lists every query selects, and the mapping back to model objects.

Kept in one place so a column added to a table is added to every query that
reads it, in the order the mappers expect.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from iotauth.errors import NotFound
from iotauth.registry.backend import Row, Tx
from iotauth.registry.events import EventKind
from iotauth.registry.models import (
    AuditEvent,
    CertificateRecord,
    CertificateStatus,
    Credential,
    Device,
    DeviceStatus,
    RevocationReason,
)

DEVICE_COLUMNS = "device_id, hardware_id, profile, status, created_at, updated_at"
CERT_COLUMNS = (
    "serial, fingerprint, device_id, public_key_sha256, not_before, not_after, status, issued_at, pem, "
    "revoked_at, revocation_reason, renewal_of"
)
EVENT_COLUMNS = "id, ts, kind, actor, device_id, data, prev_hash, hash"
CERT_COLUMN_COUNT = len(CERT_COLUMNS.split(","))
CREDENTIAL_SELECT = (
    "SELECT " + ", ".join(f"c.{c.strip()}" for c in CERT_COLUMNS.split(",")) + ", "
    + ", ".join(f"d.{c.strip()}" for c in DEVICE_COLUMNS.split(","))
    + " FROM certificates c JOIN devices d ON d.device_id = c.device_id "
)
"""A certificate and its device in one row (:func:`credential`); the caller adds ``WHERE``."""


def device(row: Row) -> Device:
    return Device(row[0], row[1], row[2], DeviceStatus(row[3]), row[4], row[5])


def certificate(row: Row) -> CertificateRecord:
    reason = RevocationReason(row[10]) if row[10] else None
    return CertificateRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], CertificateStatus(row[6]), row[7], row[8], row[9], reason,
        row[11],
    )


def credential(row: Row) -> Credential:
    """A row of :data:`CREDENTIAL_SELECT`."""
    return Credential(certificate(row[:CERT_COLUMN_COUNT]), device(row[CERT_COLUMN_COUNT:]))


def event(row: Row) -> AuditEvent:
    return AuditEvent(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7])


async def device_in_tx(tx: Tx, device_id: str) -> Device:
    """The device as the open write transaction sees it, or :class:`NotFound`."""
    row = await tx.fetchone(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
    if row is None:
        raise NotFound(f"unknown device {device_id!r}")
    return device(row)


async def certificate_in_tx(tx: Tx, serial: str) -> CertificateRecord:
    """The certificate as the open write transaction sees it, or :class:`NotFound`."""
    row = await tx.fetchone(f"SELECT {CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
    if row is None:
        raise NotFound(f"unknown certificate serial {serial!r}")
    return certificate(row)


async def revoke_in_tx(
    tx: Tx, cert: CertificateRecord, reason: RevocationReason, actor: str, details: dict[str, Any] | None = None
) -> CertificateRecord:
    """Revoke ``cert`` in the open write transaction, with its ``certificate.revoked`` event (plus ``details``)."""
    await tx.execute(
        "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?",
        (tx.now, reason.value, cert.serial),
    )
    tx.event(
        EventKind.CERTIFICATE_REVOKED,
        actor,
        cert.device_id,
        {"serial": cert.serial, "fingerprint": cert.fingerprint, "reason": reason.value, **(details or {})},
    )
    return replace(cert, status=CertificateStatus.REVOKED, revoked_at=tx.now, revocation_reason=reason)
