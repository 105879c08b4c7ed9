"""Activating renewals: the pending certificate becomes active and supersedes the one it replaces, in batches.

A renewal is activated by the device's confirmation (the renewer) or by its
first authentication with the new certificate (a broker, ``iotauth serve``).
A fleet renewing at once activates hundreds a second, and one activation read
and wrote row by row costs about ten thread round trips through aiosqlite, far
more than its SQL. So concurrent activations are gathered by a
:class:`~iotauth.registry.issuance.Coalescer` and decided here in one write
operation: four set-based lookups, then each activation in order against
what the batch has changed so far (the same serial twice, a replayed
confirmation id, two renewals of one device), then bulk writes.

Each activation is checked exactly as one alone would be: the certificate is
a renewal of *this* device; already active answers ``already``; revoked or
past the pending TTL is ``renewal-expired``; the device is active; the
certificate it replaces is still active; a confirmation's id was never seen.
It then makes the renewal active, revokes the replaced certificate
(superseded), closes the device's rotation order, and writes
``certificate.activated`` then ``certificate.revoked``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from iotauth.certs import timestamp
from iotauth.errors import RefusalCode, RenewalRefused
from iotauth.registry import rows
from iotauth.registry.backend import Tx
from iotauth.registry.events import EventKind
from iotauth.registry.issuance import lookup
from iotauth.registry.models import CertificateRecord, CertificateStatus, Device, DeviceStatus, RevocationReason


@dataclass(frozen=True)
class Activation:
    """A renewal made active; ``superseded`` is the certificate it revoked (None if it was active already)."""

    certificate: CertificateRecord
    superseded: CertificateRecord | None
    ordered: bool = False
    """An operator's rotation order for the device was open, and is now closed."""

    @property
    def already(self) -> bool:
        return self.superseded is None


@dataclass(frozen=True)
class ActivationRequest:
    """One activation to decide (see :meth:`~iotauth.registry.renewal.RenewalRecords.activate_renewal`)."""

    serial: str
    device_id: str
    actor: str
    via: str
    max_age: timedelta | None = None
    request_id: str | None = None


@dataclass
class _State:
    """What the batch found, updated as each activation is decided."""

    seen: set[str]
    certificates: dict[str, CertificateRecord]
    devices: dict[str, Device]
    orders: set[str]


def _refuse(code: RefusalCode, message: str) -> RenewalRefused:
    return RenewalRefused(code, message, None)


def _before(now: str, age: timedelta) -> str:
    """The registry timestamp ``age`` before ``now`` (a registry timestamp)."""
    return timestamp(datetime.fromisoformat(now.replace("Z", "+00:00")) - age)


async def _load(tx: Tx, requests: list[ActivationRequest]) -> _State:
    certs = f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE serial IN ({{marks}})"
    certificates = {row[0]: rows.certificate(row) for row in await lookup(tx, certs,
                                                                          sorted({r.serial for r in requests}))}
    replaced = sorted({c.renewal_of for c in certificates.values() if c.renewal_of} - set(certificates))
    certificates.update((row[0], rows.certificate(row)) for row in await lookup(tx, certs, replaced))
    device_ids = sorted({r.device_id for r in requests})
    ids = sorted({r.request_id for r in requests if r.request_id is not None})
    return _State(
        seen={row[0] for row in await lookup(
            tx, "SELECT request_id FROM rotation_requests WHERE request_id IN ({marks})", ids)},
        certificates=certificates,
        devices={row[0]: rows.device(row) for row in await lookup(
            tx, f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id IN ({{marks}})", device_ids)},
        orders={row[0] for row in await lookup(
            tx, "SELECT device_id FROM rotation_orders WHERE device_id IN ({marks})", device_ids)},
    )


async def activate_renewals(tx: Tx, requests: list[ActivationRequest]) -> list[Activation | Exception]:
    """Decide a batch of activations in order (see the module docstring) and write the accepted ones."""
    state = await _load(tx, requests)
    results: list[Activation | Exception] = []
    activated: list[tuple[str, str]] = []
    revoked: list[tuple[str, str, str]] = []
    closed: list[tuple[str]] = []
    seen_rows: list[tuple[str, str, str]] = []
    for request in requests:
        try:
            result = _decide(tx, request, state)
        except RenewalRefused as exc:
            results.append(exc)
            continue
        if request.request_id is not None:
            state.seen.add(request.request_id)
            seen_rows.append((request.request_id, request.device_id, tx.now))
        if result.superseded is not None:
            activated.append((tx.now, result.certificate.serial))
            revoked.append((tx.now, RevocationReason.SUPERSEDED.value, result.superseded.serial))
            if result.ordered:
                closed.append((request.device_id,))
        results.append(result)
    if activated:
        await tx.executemany("UPDATE certificates SET status = 'active', activated_at = ? WHERE serial = ?",
                             activated)
        await tx.executemany(
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?",
            revoked)
    if closed:
        await tx.executemany("DELETE FROM rotation_orders WHERE device_id = ?", closed)
    if seen_rows:
        await tx.executemany("INSERT INTO rotation_requests (request_id, device_id, seen_at) VALUES (?, ?, ?)",
                             seen_rows)
    return results


def _decide(tx: Tx, request: ActivationRequest, state: _State) -> Activation:
    """One activation against the batch's state; records its events and updates the state, or refuses."""
    serial, device_id = request.serial, request.device_id
    if request.request_id is not None and request.request_id in state.seen:
        raise _refuse(RefusalCode.REPLAYED, f"confirmation {request.request_id} was already received")
    cert = state.certificates.get(serial)
    if cert is None:
        raise _refuse(RefusalCode.NOT_CURRENT_CERTIFICATE, f"no certificate {serial}")
    if cert.device_id != device_id or cert.renewal_of is None:
        raise _refuse(RefusalCode.NOT_CURRENT_CERTIFICATE, f"certificate {serial} is not a renewal of this device")
    if cert.status is CertificateStatus.ACTIVE:
        return Activation(cert, None)
    if cert.status is CertificateStatus.REVOKED:
        raise _refuse(RefusalCode.RENEWAL_EXPIRED, f"renewal {serial} was revoked ({cert.revocation_reason}): "
                      "renew again with a new key")
    if request.max_age is not None and cert.issued_at < _before(tx.now, request.max_age):
        raise _refuse(RefusalCode.RENEWAL_EXPIRED, f"renewal {serial} is older than the pending TTL")
    device = state.devices.get(device_id)
    if device is None or device.status is not DeviceStatus.ACTIVE:
        status = device.status.value if device is not None else "unknown"
        raise _refuse(RefusalCode.DEVICE_NOT_ACTIVE, f"device {device_id!r} is {status}")
    old = state.certificates.get(cert.renewal_of)
    if old is None or old.status is not CertificateStatus.ACTIVE:
        status = old.status.value if old is not None else "unknown"
        raise _refuse(RefusalCode.NOT_CURRENT_CERTIFICATE,
                      f"certificate {cert.renewal_of}, which this renewal replaces, is {status}")
    ordered = device_id in state.orders
    tx.event(EventKind.CERTIFICATE_ACTIVATED, request.actor, device_id,
             {"serial": serial, "renewal_of": old.serial, "via": request.via, "order": ordered})
    reason = RevocationReason.SUPERSEDED
    tx.event(EventKind.CERTIFICATE_REVOKED, request.actor, old.device_id,
             {"serial": old.serial, "fingerprint": old.fingerprint, "reason": reason.value, "superseded_by": serial,
              "via": request.via})
    superseded = replace(old, status=CertificateStatus.REVOKED, revoked_at=tx.now, revocation_reason=reason)
    activated = replace(cert, status=CertificateStatus.ACTIVE)
    state.certificates[old.serial], state.certificates[serial] = superseded, activated
    state.orders.discard(device_id)
    return Activation(activated, superseded, ordered)
