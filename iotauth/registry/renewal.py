"""Certificate rotation in the registry: renewals, activations and operator orders, decided where they can race.

A renewal over MQTT is checked twice: the renewer refuses what it can see
cheaply (shape, clock, signature) before it signs, and the rules that span
rows or processes are checked again *inside* the serialising write
transaction that records the new certificate, so two renewers, two requests
of one device or a request racing an activation can never break them:

* the request id was never seen (replay; ids are kept for the clock window);
* the device is active and the certificate the request names is its active,
  unexpired certificate;
* the new key was never used by any certificate of any device -- except that
  the *same* device re-sending the *same* key while that renewal is pending
  gets the same pending certificate again (a device that crashed before it
  stored the answer must not be locked out);
* at most one pending renewal per device (a stale one, past the pending TTL,
  is revoked on the spot, as the sweep would), and at most ``max_renewals``
  new certificates per device per ``rate_window``;
* before its renewal window opens a device may renew only while an
  operator's rotation order for it is open.

Activation (the device's confirmation, or its first authentication with the
new certificate) is one transaction: the renewal becomes active, the
certificate it replaces is revoked (superseded), the device's rotation order
is closed, and the events say which renewal, how it was activated and what
it superseded. Followers of the change feed then close sessions still on the
old certificate and republish CRLs.

Batched like issuance (:mod:`.issuance`): concurrent renewals are checked
with a few set-based lookups per batch, then handed to
:func:`~iotauth.registry.issuance.record_issuances` in the same transaction;
concurrent activations likewise (:mod:`.activation`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509

from iotauth.certs import cert_time, public_key_sha256, timestamp
from iotauth.errors import RefusalCode, RenewalRefused
from iotauth.registry import rows
from iotauth.registry.activation import Activation, ActivationRequest, activate_renewals
from iotauth.registry.backend import SqlConnection, Tx
from iotauth.registry.events import EventKind
from iotauth.registry.issuance import Coalescer, IssuanceRequest, lookup, record_issuances
from iotauth.registry.models import (
    CertificateRecord,
    CertificateStatus,
    Credential,
    Device,
    DeviceStatus,
    RevocationReason,
)

T = TypeVar("T")


@dataclass(frozen=True)
class RenewalRequest:
    """A signed renewal certificate and the facts the transaction must confirm before it is recorded.

    Attributes:
        cert: the new certificate (signed, not yet handed out).
        current_serial: the active certificate the device proved it holds (``renewal_of``).
        request_id: the request's id as sent (never accepted twice).
        window_opens: when the device may renew on its own (certificate time); None: any time.
        max_renewals, rate_window: at most this many renewal certificates per device per window.
        pending_ttl: a pending renewal older than this no longer blocks a new one (it is revoked).
    """

    cert: x509.Certificate
    device_id: str
    current_serial: str
    request_id: str
    window_opens: str | None
    max_renewals: int
    rate_window: timedelta
    pending_ttl: timedelta
    actor: str


@dataclass(frozen=True)
class RenewalIssued:
    """The pending renewal certificate recorded for a request (``reused``: an earlier one, same device and key)."""

    record: CertificateRecord
    reused: bool
    trigger: str
    """``window`` (the device's own time had come) or ``operator`` (an open rotation order)."""


@dataclass(frozen=True)
class RotationOrder:
    """An operator asked a device to renew now: open until a renewal of the device is activated."""

    device_id: str
    serial: str
    """The certificate to replace (a device whose certificate is already another one ignores the order)."""
    requested_at: str
    actor: str


@dataclass(frozen=True)
class Expiring:
    device: Device
    certificate: CertificateRecord


def _refuse(code: RefusalCode, message: str, retry_after: float | None = None) -> RenewalRefused:
    return RenewalRefused(code, message, None if retry_after is None else max(1, int(retry_after + 0.999)))


def _seconds_until(moment: str, now: str) -> float:
    """Seconds from ``now`` (a registry timestamp) to ``moment`` (a certificate time or a timestamp)."""
    return (_parse(moment) - _parse(now)).total_seconds()


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _shift(now: str, delta: timedelta) -> str:
    return timestamp(_parse(now) + delta)


class RenewalRecords:
    """The registry's rotation methods (a part of :class:`~iotauth.registry.Registry`)."""

    _reader: SqlConnection
    _renewals: Coalescer[RenewalRequest, RenewalIssued] | None = None
    _activations: Coalescer[ActivationRequest, Activation] | None = None
    _renewal_reads: Coalescer[str, CertificateRecord | None] | None = None
    _credential_reads: Coalescer[str, Credential | None] | None = None
    _order_reads: Coalescer[str, RotationOrder | None] | None = None

    async def write(self, op: Callable[[Tx], Awaitable[T]]) -> T:
        raise NotImplementedError  # the Registry's group-committed write

    # -- renewals --------------------------------------------------------------------------

    async def record_renewal(self, request: RenewalRequest) -> RenewalIssued:
        """Check ``request`` inside the write transaction and record its certificate *pending*.

        Returns only after the record is durable, so the certificate may then be
        handed to the device.

        Raises:
            RenewalRefused: with the protocol's code (see the module docstring).
        """
        if self._renewals is None:
            self._renewals = Coalescer(self._record_renewals)
        return await self._renewals.submit(request)

    async def _record_renewals(self, requests: list[RenewalRequest]) -> list[RenewalIssued | Exception]:
        return await self.write(lambda tx: record_renewals(tx, requests))

    async def activate_renewal(self, serial: str, *, device_id: str, actor: str, via: str,
                               max_age: timedelta | None = None, request_id: str | None = None) -> Activation:
        """Make the pending renewal ``serial`` of ``device_id`` active and revoke the certificate it replaces.

        Idempotent: a renewal already active answers with ``already`` set.

        Args:
            via: how the device showed it holds the new key (``confirm``, ``connect``), for the audit log
                and for followers that kick by client id (see :func:`~iotauth.registry.events.superseded_at_connect`).
            max_age: refuse a pending renewal issued longer ago than this (it is about to expire by TTL).
            request_id: the confirmation's id: refused if seen before (replay), else remembered like a request's.

        Raises:
            RenewalRefused: unknown or not a renewal of this device (``not-current-certificate``), revoked or
                too old (``renewal-expired``), device not active, or the replaced certificate is no longer active.
        """
        if self._activations is None:
            self._activations = Coalescer(self._activate_renewals)
        return await self._activations.submit(ActivationRequest(serial, device_id, actor, via, max_age, request_id))

    async def _activate_renewals(self, requests: list[ActivationRequest]) -> list[Activation | Exception]:
        return await self.write(lambda tx: activate_renewals(tx, requests))

    async def prune_rotation_requests(self, before: datetime) -> int:
        """Forget request ids seen before ``before`` (older requests are refused as stale anyway)."""

        async def op(tx: Tx) -> int:
            return await tx.execute("DELETE FROM rotation_requests WHERE seen_at < ?", (timestamp(before),))

        return await self.write(op)

    async def renewal_certificate(self, serial: str) -> CertificateRecord | None:
        """The certificate ``serial`` if it is a renewal, else None (concurrent lookups are one query)."""
        if self._renewal_reads is None:
            self._renewal_reads = Coalescer(self._renewal_certificates)
        return await self._renewal_reads.submit(serial)

    async def _renewal_certificates(self, serials: list[str]) -> list[CertificateRecord | Exception | None]:
        found = {record.serial: record for record in map(rows.certificate, await lookup(
            self._reader, f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE renewal_of IS NOT NULL AND serial IN "
            "({marks})", sorted(set(serials))))}
        return [found.get(serial) for serial in serials]

    async def renewal_credential(self, cert_fingerprint: str) -> Credential | None:
        """``find_credential`` for the renewer: a fleet renewing at once is looked up in few queries."""
        if self._credential_reads is None:
            self._credential_reads = Coalescer(self._credentials)
        return await self._credential_reads.submit(cert_fingerprint)

    async def _credentials(self, fingerprints: list[str]) -> list[Credential | Exception | None]:
        found = {credential.certificate.fingerprint: credential for credential in map(rows.credential, await lookup(
            self._reader, rows.CREDENTIAL_SELECT + "WHERE c.fingerprint IN ({marks})", sorted(set(fingerprints))))}
        return [found.get(fingerprint) for fingerprint in fingerprints]

    # -- operator orders -------------------------------------------------------------------

    async def order_rotations(self, device_ids: Sequence[str], *, actor: str
                              ) -> tuple[list[RotationOrder], dict[str, str]]:
        """Open (or renew) a rotation order for each device; returns the orders and, per skipped device, why.

        One transaction for all of them (with one audit event per order), so a
        fleet-wide order is recorded at once or not at all.
        """
        return await self.write(lambda tx: order_in_tx(tx, sorted(set(device_ids)), actor))

    async def open_order(self, device_id: str) -> RotationOrder | None:
        """The device's open rotation order, if any (concurrent lookups, a fleet ordered at once, are one query)."""
        if self._order_reads is None:
            self._order_reads = Coalescer(self._open_orders_of)
        return await self._order_reads.submit(device_id)

    async def _open_orders_of(self, device_ids: list[str]) -> list[RotationOrder | Exception | None]:
        found = {row[0]: RotationOrder(*row) for row in await lookup(
            self._reader, "SELECT device_id, serial, requested_at, actor FROM rotation_orders WHERE device_id IN "
            "({marks})", sorted(set(device_ids)))}
        return [found.get(device_id) for device_id in device_ids]

    async def open_orders(self) -> list[RotationOrder]:
        found = await self._reader.fetchall(
            "SELECT device_id, serial, requested_at, actor FROM rotation_orders ORDER BY device_id")
        return [RotationOrder(*row) for row in found]

    # -- selection -------------------------------------------------------------------------

    async def expiring(self, before: datetime) -> list[Expiring]:
        """Active certificates of active devices whose notAfter is before ``before``, soonest first."""
        found = await self._reader.fetchall(
            rows.CREDENTIAL_SELECT + "WHERE c.status = 'active' AND d.status = 'active' AND c.not_after < ? "
            "ORDER BY c.not_after, c.serial", (cert_time(before),))
        return [Expiring(found.device, found.certificate) for found in map(rows.credential, found)]

    async def active_devices_of_profile(self, profile: str) -> list[str]:
        found = await self._reader.fetchall(
            "SELECT device_id FROM devices WHERE profile = ? AND status = 'active' ORDER BY device_id", (profile,))
        return [row[0] for row in found]


# -- inside the write transaction ----------------------------------------------------------


@dataclass
class _Batch:
    """What one batch of renewal requests found in the database, updated as the batch is decided in order."""

    seen: set[str]
    devices: dict[str, Device]
    currents: dict[str, CertificateRecord]
    by_key: dict[str, list[CertificateRecord]]
    pending: dict[str, list[CertificateRecord]]
    recent: dict[str, list[str]]
    orders: set[str]


async def _load(tx: Tx, requests: list[RenewalRequest], key_hashes: list[str]) -> _Batch:
    device_ids = sorted({r.device_id for r in requests})
    certs = f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE "
    by_key: dict[str, list[CertificateRecord]] = {}
    for row in await lookup(tx, certs + "public_key_sha256 IN ({marks})", sorted(set(key_hashes))):
        record = rows.certificate(row)
        by_key.setdefault(record.public_key_sha256, []).append(record)
    pending: dict[str, list[CertificateRecord]] = {}
    for row in await lookup(tx, certs + "status = 'pending' AND renewal_of IS NOT NULL AND device_id IN ({marks})",
                            device_ids):
        record = rows.certificate(row)
        pending.setdefault(record.device_id, []).append(record)
    recent: dict[str, list[str]] = {}  # a few renewals per device and year: filtered by each request's window later
    for device_id, issued_at in await lookup(
            tx, "SELECT device_id, issued_at FROM certificates WHERE renewal_of IS NOT NULL AND device_id IN ({marks})",
            device_ids):
        recent.setdefault(device_id, []).append(issued_at)
    return _Batch(
        seen={row[0] for row in await lookup(tx, "SELECT request_id FROM rotation_requests WHERE request_id IN "
                                             "({marks})", sorted({r.request_id for r in requests}))},
        devices={row[0]: rows.device(row) for row in await lookup(
            tx, f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id IN ({{marks}})", device_ids)},
        currents={row[0]: rows.certificate(row) for row in await lookup(
            tx, certs + "serial IN ({marks})", sorted({r.current_serial for r in requests}))},
        by_key=by_key,
        pending=pending,
        recent=recent,
        orders={row[0] for row in await lookup(
            tx, "SELECT device_id FROM rotation_orders WHERE device_id IN ({marks})", device_ids)},
    )


async def record_renewals(tx: Tx, requests: list[RenewalRequest]) -> list[RenewalIssued | Exception]:
    """Decide a batch of renewals in order (see the module docstring) and record the accepted ones."""
    key_hashes = [public_key_sha256(r.cert.public_key()) for r in requests]
    batch = await _load(tx, requests, key_hashes)
    results: list[RenewalIssued | Exception | tuple[int, bool]] = []  # (index in ``accepted``, a retry of it)
    accepted: list[IssuanceRequest] = []
    in_batch: dict[tuple[str, str], int] = {}
    seen_rows: list[tuple[str, str, str]] = []
    for request, key_hash in zip(requests, key_hashes, strict=True):
        if request.request_id in batch.seen:
            results.append(_refuse(RefusalCode.REPLAYED, f"request {request.request_id} was already received"))
            continue
        batch.seen.add(request.request_id)
        seen_rows.append((request.request_id, request.device_id, tx.now))
        earlier = in_batch.get((request.device_id, key_hash))
        if earlier is not None:  # the same device sent the same key twice in one batch
            results.append((earlier, True))
            continue
        try:
            decided = await _decide(tx, request, key_hash, batch)
        except RenewalRefused as exc:
            results.append(exc)
            continue
        if isinstance(decided, RenewalIssued):
            results.append(decided)
            continue
        in_batch[(request.device_id, key_hash)] = len(accepted)
        results.append((len(accepted), False))
        accepted.append(IssuanceRequest(
            cert=request.cert, device_id=request.device_id, profile=batch.devices[request.device_id].profile,
            hardware_id=None, activate=False, actor=request.actor, renewal_of=request.current_serial,
            details={"renewal_of": request.current_serial, "request_id": request.request_id, "trigger": decided},
        ))
        placeholder = CertificateRecord("(this batch)", "", request.device_id, key_hash, "", "",
                                        CertificateStatus.PENDING, tx.now, "", renewal_of=request.current_serial)
        batch.pending.setdefault(request.device_id, []).append(placeholder)
        batch.by_key.setdefault(key_hash, []).append(placeholder)
        batch.recent.setdefault(request.device_id, []).append(tx.now)
    recorded = await record_issuances(tx, accepted) if accepted else []
    if seen_rows:
        await tx.executemany("INSERT INTO rotation_requests (request_id, device_id, seen_at) VALUES (?, ?, ?)",
                             seen_rows)
    final: list[RenewalIssued | Exception] = []
    for result in results:
        if isinstance(result, tuple):
            index, retry = result
            record = recorded[index]
            trigger = str(accepted[index].details["trigger"])
            final.append(record if isinstance(record, Exception) else RenewalIssued(record, retry, trigger))
        else:
            final.append(result)
    return final


async def _decide(tx: Tx, request: RenewalRequest, key_hash: str, batch: _Batch) -> RenewalIssued | str:
    """The trigger (``window``/``operator``) of an acceptable request, an earlier identical renewal, or a refusal."""
    device = batch.devices.get(request.device_id)
    current = batch.currents.get(request.current_serial)
    if device is None or current is None or current.device_id != request.device_id:
        raise _refuse(RefusalCode.NOT_CURRENT_CERTIFICATE, "the certificate named is not one of this device's")
    if device.status is not DeviceStatus.ACTIVE:
        raise _refuse(RefusalCode.DEVICE_NOT_ACTIVE, f"device {device.device_id!r} is {device.status.value}")
    if current.status is not CertificateStatus.ACTIVE:
        raise _refuse(RefusalCode.NOT_CURRENT_CERTIFICATE, f"certificate {current.serial} is {current.status.value}")
    now = tx.now[:19] + "Z"  # certificate time (seconds)
    if current.not_after <= now:
        raise _refuse(RefusalCode.CERTIFICATE_EXPIRED, f"certificate {current.serial} expired at {current.not_after}")
    ordered = request.device_id in batch.orders
    early = request.window_opens is not None and now < request.window_opens
    trigger = "operator" if ordered else "window"
    stale_before = _shift(tx.now, -request.pending_ttl)
    users = batch.by_key.get(key_hash, [])
    if users:
        same = [u for u in users if u.device_id == request.device_id and u.status is CertificateStatus.PENDING
                and u.renewal_of == request.current_serial and u.issued_at >= stale_before]
        if len(same) == len(users):  # a retry: the device did not get (or keep) the answer
            return RenewalIssued(same[-1], reused=True, trigger=trigger)
        raise _refuse(RefusalCode.KEY_REUSED, "the new key was already used by a certificate: make a new key")
    for other in list(batch.pending.get(request.device_id, [])):
        if other.issued_at >= stale_before:
            raise _refuse(RefusalCode.RENEWAL_PENDING, f"a renewal for another key is pending ({other.serial})",
                          _seconds_until(_shift(other.issued_at, request.pending_ttl), tx.now))
        await rows.revoke_in_tx(tx, other, RevocationReason.SUPERSEDED, request.actor, {"expired_pending": True})
        batch.pending[request.device_id].remove(other)
    window_start = _shift(tx.now, -request.rate_window)
    recent = sorted(t for t in batch.recent.get(request.device_id, []) if t >= window_start)
    if len(recent) >= request.max_renewals:
        raise _refuse(RefusalCode.RATE_LIMITED,
                      f"{len(recent)} renewals in the last {request.rate_window}; at most {request.max_renewals}",
                      _seconds_until(_shift(recent[0], request.rate_window), tx.now))
    if early and not ordered:
        assert request.window_opens is not None
        raise _refuse(RefusalCode.OUTSIDE_WINDOW, f"the renewal window opens at {request.window_opens}",
                      _seconds_until(request.window_opens, tx.now))
    return trigger


async def order_in_tx(tx: Tx, device_ids: list[str], actor: str) -> tuple[list[RotationOrder], dict[str, str]]:
    devices = {row[0]: rows.device(row) for row in await lookup(
        tx, f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id IN ({{marks}})", device_ids)}
    newest: dict[str, tuple[str, str]] = {}
    for device_id, serial, issued_at in await lookup(
        tx, "SELECT device_id, serial, issued_at FROM certificates WHERE status = 'active' AND device_id IN ({marks})",
        device_ids,
    ):
        if device_id not in newest or issued_at > newest[device_id][1]:
            newest[device_id] = (serial, issued_at)
    orders: list[RotationOrder] = []
    skipped: dict[str, str] = {}
    for device_id in device_ids:
        device = devices.get(device_id)
        if device is None:
            skipped[device_id] = "unknown device"
        elif device.status is not DeviceStatus.ACTIVE:
            skipped[device_id] = f"device is {device.status.value}"
        elif device_id not in newest:
            skipped[device_id] = "no active certificate"
        else:
            orders.append(RotationOrder(device_id, newest[device_id][0], tx.now, actor))
    if orders:
        await tx.executemany(
            "INSERT INTO rotation_orders (device_id, serial, requested_at, actor) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET serial = excluded.serial, requested_at = excluded.requested_at, "
            "actor = excluded.actor",
            [(o.device_id, o.serial, o.requested_at, o.actor) for o in orders],
        )
        for order in orders:
            tx.event(EventKind.ROTATION_REQUESTED, actor, order.device_id, {"serial": order.serial})
    return orders, skipped
