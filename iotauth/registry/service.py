"""The device registry: the source of truth for devices, certificates and the audit log.

Every state change and its audit event are written in one transaction, so the
log can never disagree with the tables. Invariants that span rows (a hardware
id belongs to one device, a public key to one device, revoked is final) are
checked inside the serialising write transaction, which makes them hold across
processes and hosts, not just within this one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

from cryptography import x509

from iotauth.errors import Conflict, NotFound
from iotauth.identity import validate_device_id, validate_hardware_id, validate_profile_name
from iotauth.pki.ca import fingerprint, pem, serial_hex
from iotauth.pki.keys import public_key_sha256
from iotauth.registry.audit import verify_chain
from iotauth.registry.backend import TIMESTAMP_FORMAT, Row, SqlConnection, Tx, WriteBatcher
from iotauth.registry.models import (
    AuditEvent,
    AuditReport,
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceStatus,
    RevocationReason,
    RevokedSerial,
)

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")
_DEVICE_COLUMNS = "device_id, hardware_id, profile, status, created_at, updated_at"
_CERT_COLUMNS = (
    "serial, fingerprint, device_id, public_key_sha256, not_before, not_after, status, issued_at, pem, "
    "revoked_at, revocation_reason"
)
_EVENT_COLUMNS = "id, ts, kind, actor, device_id, data, prev_hash, hash"
CRL_REASONS: dict[str, x509.ReasonFlags] = {
    **{r.value: r.crl_reason for r in RevocationReason},
    "certificate-hold": x509.ReasonFlags.certificate_hold,
}


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _device(row: Row) -> Device:
    return Device(row[0], row[1], row[2], DeviceStatus(row[3]), row[4], row[5])


def _certificate(row: Row) -> CertificateRecord:
    reason = RevocationReason(row[10]) if row[10] else None
    return CertificateRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], CertificateStatus(row[6]), row[7], row[8], row[9], reason
    )


def _event(row: Row) -> AuditEvent:
    return AuditEvent(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7])


@dataclass(frozen=True)
class Credential:
    """A certificate together with the device it belongs to (what the broker decides on)."""

    certificate: CertificateRecord
    device: Device

    @property
    def usable(self) -> bool:
        return self.certificate.status is CertificateStatus.ACTIVE and self.device.status is DeviceStatus.ACTIVE


class Registry:
    """Async registry API over a storage backend. Use as an async context manager."""

    def __init__(
        self,
        writer: SqlConnection,
        reader: SqlConnection,
        batcher: WriteBatcher,
        closers: Sequence[Callable[[], Awaitable[None]]],
        wait_change: Callable[[float], Awaitable[None]] | None = None,
        location: str = "",
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._batcher = batcher
        self._closers = closers
        self._wait_change = wait_change
        self.location = location
        self._issuance: _Coalescer[_IssuanceRequest, CertificateRecord] = _Coalescer(self._record_batch)

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush pending writes and close the connections (deterministically)."""
        await self._batcher.close()
        for closer in self._closers:
            await closer()

    async def write(self, op: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``op`` in a durable, serialised write transaction (group-committed)."""
        return await self._batcher.submit(op)

    # -- devices ---------------------------------------------------------------------------

    async def get_device(self, device_id: str) -> Device:
        row = await self._reader.fetchone(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (validate_device_id(device_id),)
        )
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return _device(row)

    async def find_device_by_hardware_id(self, hardware_id: str) -> Device | None:
        row = await self._reader.fetchone(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE hardware_id = ?", (validate_hardware_id(hardware_id),)
        )
        return _device(row) if row else None

    async def list_devices(self, status: DeviceStatus | None = None, limit: int | None = None) -> list[Device]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status.value)
        sql += " ORDER BY device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_device(r) for r in await self._reader.fetchall(sql, params)]

    # -- certificates ----------------------------------------------------------------------

    async def certificates_of(self, device_id: str) -> list[CertificateRecord]:
        rows = await self._reader.fetchall(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE device_id = ? ORDER BY issued_at, serial",
            (validate_device_id(device_id),),
        )
        return [_certificate(r) for r in rows]

    async def get_certificate(self, serial: str) -> CertificateRecord:
        row = await self._reader.fetchone(f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
        if row is None:
            raise NotFound(f"unknown certificate serial {serial!r}")
        return _certificate(row)

    async def certificates_with_key(self, public_key_sha256: str) -> list[CertificateRecord]:
        rows = await self._reader.fetchall(
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE public_key_sha256 = ?", (public_key_sha256,)
        )
        return [_certificate(r) for r in rows]

    async def find_credential(self, cert_fingerprint: str) -> Credential | None:
        """The certificate with this fingerprint and its device, in one indexed read."""
        cert_cols = ", ".join(f"c.{c.strip()}" for c in _CERT_COLUMNS.split(","))
        dev_cols = ", ".join(f"d.{c.strip()}" for c in _DEVICE_COLUMNS.split(","))
        row = await self._reader.fetchone(
            f"SELECT {cert_cols}, {dev_cols} FROM certificates c JOIN devices d ON d.device_id = c.device_id "
            "WHERE c.fingerprint = ?",
            (cert_fingerprint,),
        )
        if row is None:
            return None
        return Credential(_certificate(row[:11]), _device(row[11:]))

    async def record_issuance(
        self,
        cert: x509.Certificate,
        *,
        device_id: str,
        profile: str,
        hardware_id: str | None = None,
        activate: bool = False,
        actor: str,
        details: dict[str, Any] | None = None,
    ) -> CertificateRecord:
        """Durably record a newly issued certificate (creating the device if new).

        Returns only after the record is committed to disk, so the caller may then
        hand the certificate out: every certificate in the field can be revoked.
        Concurrent calls are recorded together in one transaction and one commit.
        """
        request = _IssuanceRequest(
            cert=cert,
            device_id=validate_device_id(device_id),
            profile=validate_profile_name(profile),
            hardware_id=validate_hardware_id(hardware_id) if hardware_id is not None else None,
            activate=activate,
            actor=actor,
            details=details or {},
        )
        return await self._issuance.submit(request)

    async def _record_batch(self, requests: list[_IssuanceRequest]) -> list[CertificateRecord | Exception]:
        return await self.write(lambda tx: _record_issuances(tx, requests))

    async def activate(self, device_id: str, serial: str, *, actor: str) -> CertificateRecord:
        """Mark a delivered certificate (and its device) active."""
        device_id = validate_device_id(device_id)

        async def op(tx: Tx) -> CertificateRecord:
            cert = await _certificate_in_tx(tx, serial)
            if cert.device_id != device_id:
                raise Conflict(f"certificate {serial} belongs to {cert.device_id!r}, not {device_id!r}")
            if cert.status is CertificateStatus.REVOKED:
                raise Conflict(f"certificate {serial} is revoked and cannot be activated")
            device = await _device_in_tx(tx, device_id)
            if device.status is DeviceStatus.REVOKED:
                raise Conflict(f"device {device_id!r} is revoked")
            if cert.status is CertificateStatus.PENDING:
                await tx.execute(
                    "UPDATE certificates SET status = 'active', activated_at = ? WHERE serial = ?", (tx.now, serial)
                )
                tx.event("certificate.activated", actor, device_id, {"serial": serial})
            if device.status is DeviceStatus.PENDING:
                await _set_device_status(tx, device_id, DeviceStatus.ACTIVE, actor)
            return await _certificate_in_tx(tx, serial)

        return await self.write(op)

    async def revoke(self, device_id: str, reason: RevocationReason, *, actor: str) -> list[CertificateRecord]:
        """Revoke a device for good: the device and every unrevoked certificate it has.

        Idempotent: revoking a revoked device changes nothing and returns ``[]``.
        """
        device_id = validate_device_id(device_id)

        async def op(tx: Tx) -> list[CertificateRecord]:
            device = await _device_in_tx(tx, device_id)
            rows = await tx.fetchall(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE device_id = ? AND status <> 'revoked'", (device_id,)
            )
            revoked = [await _revoke_certificate(tx, _certificate(r), reason, actor) for r in rows]
            if device.status is not DeviceStatus.REVOKED:
                await _set_device_status(tx, device_id, DeviceStatus.REVOKED, actor, {"reason": reason.value})
            return revoked

        return await self.write(op)

    async def revoke_certificate(self, serial: str, reason: RevocationReason, *, actor: str) -> CertificateRecord:
        """Revoke one certificate and leave its device's status alone (supersession, rework)."""

        async def op(tx: Tx) -> CertificateRecord:
            cert = await _certificate_in_tx(tx, serial)
            if cert.status is CertificateStatus.REVOKED:
                return cert
            return await _revoke_certificate(tx, cert, reason, actor)

        return await self.write(op)

    async def expire_pending(
        self, issued_before: datetime, reason: RevocationReason, *, actor: str
    ) -> list[CertificateRecord]:
        """Revoke every pending certificate issued before ``issued_before`` (delivery never completed)."""
        cutoff = issued_before.strftime(TIMESTAMP_FORMAT)

        async def op(tx: Tx) -> list[CertificateRecord]:
            rows = await tx.fetchall(
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE status = 'pending' AND issued_at < ?", (cutoff,)
            )
            return [await _revoke_certificate(tx, _certificate(r), reason, actor) for r in rows]

        return await self.write(op)

    async def suspend(self, device_id: str, *, actor: str, reason: str | None = None) -> Device:
        """Temporarily bar a device; its certificates stay issued and appear on hold in the CRL."""
        return await self._change_status(device_id, DeviceStatus.SUSPENDED, actor, reason)

    async def resume(self, device_id: str, *, actor: str) -> Device:
        """Lift a suspension."""
        return await self._change_status(device_id, DeviceStatus.ACTIVE, actor, None)

    async def _change_status(self, device_id: str, target: DeviceStatus, actor: str, reason: str | None) -> Device:
        device_id = validate_device_id(device_id)

        async def op(tx: Tx) -> Device:
            device = await _device_in_tx(tx, device_id)
            if device.status is DeviceStatus.REVOKED:
                raise Conflict(f"device {device_id!r} is revoked; revocation is permanent")
            if target is DeviceStatus.ACTIVE and device.status is not DeviceStatus.SUSPENDED:
                raise Conflict(f"device {device_id!r} is {device.status.value}, not suspended")
            if device.status is target:
                return device
            new_status = target
            if target is DeviceStatus.ACTIVE:
                active = await tx.fetchone(
                    "SELECT 1 FROM certificates WHERE device_id = ? AND status = 'active' LIMIT 1", (device_id,)
                )
                new_status = DeviceStatus.ACTIVE if active else DeviceStatus.PENDING
            await _set_device_status(tx, device_id, new_status, actor, {"reason": reason} if reason else None)
            return await _device_in_tx(tx, device_id)

        return await self.write(op)

    # -- CRL -------------------------------------------------------------------------------

    async def crl_entries(self, now: datetime) -> list[RevokedSerial]:
        """Unexpired certificates that relying parties must refuse.

        Revoked certificates carry their reason. Certificates that are pending
        (never delivered) or belong to a suspended device are listed as
        certificateHold, so brokers that only read the CRL refuse them too.
        """
        cutoff = iso(now)
        rows = await self._reader.fetchall(
            "SELECT serial, COALESCE(revoked_at, issued_at), "
            "CASE WHEN status = 'revoked' THEN revocation_reason ELSE 'certificate-hold' END "
            "FROM certificates WHERE status <> 'active' AND not_after > ? "
            "UNION ALL "
            # CROSS JOIN makes SQLite start from the (few) non-active devices, not every active certificate.
            "SELECT c.serial, c.issued_at, 'certificate-hold' FROM devices d CROSS JOIN certificates c "
            "WHERE d.status IN ('pending', 'suspended', 'revoked') AND c.device_id = d.device_id "
            "AND c.status || '' = 'active' AND c.not_after > ?",  # an expression: look up by device, not status
            (cutoff, cutoff),
        )
        return [RevokedSerial(serial, when, CRL_REASONS[reason]) for serial, when, reason in rows]

    async def next_crl_number(self) -> int:
        async def op(tx: Tx) -> int:
            row = await tx.fetchone("SELECT value FROM meta WHERE key = 'crl_number'")
            number = int(row[0]) + 1 if row else 1
            await tx.execute("UPDATE meta SET value = ? WHERE key = 'crl_number'", (str(number),))
            return number

        return await self.write(op)

    # -- audit log -------------------------------------------------------------------------

    async def record_event(
        self, kind: str, *, actor: str, device_id: str | None = None, data: dict[str, Any] | None = None
    ) -> int:
        """Append a free-standing audit event (broker decisions, station steps)."""

        async def op(tx: Tx) -> int:
            return tx.event(kind, actor, device_id, data)

        return await self.write(op)

    async def events(
        self,
        *,
        after_id: int = 0,
        since: str | None = None,
        device_id: str | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(validate_device_id(device_id))
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_event(r) for r in await self._reader.fetchall(sql, params)]

    async def has_events(self, *, after_id: int, kind_prefixes: Sequence[str]) -> bool:
        """Whether any event after ``after_id`` has a kind starting with one of ``kind_prefixes``."""
        if not kind_prefixes:
            return False
        condition = " OR ".join("kind LIKE ?" for _ in kind_prefixes)
        row = await self._reader.fetchone(
            f"SELECT 1 FROM events WHERE id > ? AND ({condition}) LIMIT 1",
            (after_id, *(f"{prefix}%" for prefix in kind_prefixes)),
        )
        return row is not None

    async def last_event_id(self) -> int:
        row = await self._reader.fetchone("SELECT MAX(id) FROM events")
        return int(row[0]) if row and row[0] is not None else 0

    async def wait_for_change(self, interval: float) -> None:
        """Return when a commit may have added events (PostgreSQL NOTIFY), or after ``interval`` seconds.

        For consumers that poll :meth:`events` themselves (the broker times
        every read, to fail closed) but still want push wake-ups where the
        backend has them. SQLite has none: this just sleeps.
        """
        if self._wait_change is not None:
            await self._wait_change(interval)
        else:
            await asyncio.sleep(interval)

    async def follow(self, after_id: int, poll_interval: float = 0.05) -> AsyncIterator[list[AuditEvent]]:
        """Yield batches of new events forever: the registry's change feed.

        Backends with push notification (PostgreSQL LISTEN) wake up at once;
        SQLite is polled every ``poll_interval`` seconds with one indexed query.
        """
        cursor = after_id
        while True:
            batch = await self.events(after_id=cursor, limit=1000)
            if batch:
                cursor = batch[-1].id
                yield batch
                continue
            await self.wait_for_change(poll_interval)

    async def verify_audit(self) -> AuditReport:
        """Recompute the whole chain; report the first event that fails."""
        # The counter first: both only grow, so events read afterwards always cover it. Read the other
        # way round, a commit landing in between would look like a deleted tail.
        allocated = await self._reader.fetchone("SELECT value FROM meta WHERE key = 'audit_allocated'")
        rows = await self._reader.fetchall(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id")
        events = []
        for row in rows:
            try:
                events.append(_event(row))
            except (ValueError, TypeError):
                return AuditReport(False, len(events), len(events), "", row[0], "event data is not valid JSON")
        return verify_chain(events, [r[5] for r in rows], int(allocated[0]) if allocated else 0)


async def _device_in_tx(tx: Tx, device_id: str) -> Device:
    row = await tx.fetchone(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
    if row is None:
        raise NotFound(f"unknown device {device_id!r}")
    return _device(row)


async def _certificate_in_tx(tx: Tx, serial: str) -> CertificateRecord:
    row = await tx.fetchone(f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
    if row is None:
        raise NotFound(f"unknown certificate serial {serial!r}")
    return _certificate(row)


@dataclass(frozen=True)
class _IssuanceRequest:
    cert: x509.Certificate
    device_id: str
    profile: str
    hardware_id: str | None
    activate: bool
    actor: str
    details: dict[str, Any]


class _Coalescer(Generic[Req, Res]):
    """Gather concurrent requests and hand them to ``handler`` as one batch.

    A thread round trip through aiosqlite costs far more than the SQL it
    carries, so issuance checks and inserts run set-based, once per batch.
    """

    def __init__(self, handler: Callable[[list[Req]], Awaitable[list[Res | Exception]]]) -> None:
        self._handler = handler
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._flushing = False

    async def submit(self, request: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)
                batch, self._pending = self._pending, []
                results: list[Res | BaseException]
                try:
                    results = list(await self._handler([request for request, _ in batch]))
                except BaseException as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flushing = False


_CHUNK = 300


async def _lookup(tx: Tx, sql: str, values: list[str]) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        rows += await tx.fetchall(sql.format(marks=", ".join("?" * len(chunk))), chunk)
    return rows


async def _record_issuances(tx: Tx, requests: list[_IssuanceRequest]) -> list[CertificateRecord | Exception]:
    """Check and record a batch of issuances: three lookups, then bulk inserts.

    Every cross-row invariant (hardware id and public key each belong to one
    device; revoked is final; profile and hardware id of an existing device
    match) is checked against the database *and* against the earlier requests
    of the same batch, in order, before anything is written.
    """
    device_ids = sorted({r.device_id for r in requests})
    hardware_ids = sorted({r.hardware_id for r in requests if r.hardware_id is not None})
    key_hashes = {id(r): public_key_sha256(r.cert.public_key()) for r in requests}
    devices = {
        row[0]: _device(row)
        for row in await _lookup(
            tx, f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id IN ({{marks}})", device_ids
        )
    }
    hardware_owner = {
        row[0]: row[1]
        for row in await _lookup(
            tx, "SELECT hardware_id, device_id FROM devices WHERE hardware_id IN ({marks})", hardware_ids
        )
    }
    key_owner = {
        row[0]: row[1]
        for row in await _lookup(
            tx,
            "SELECT public_key_sha256, device_id FROM certificates WHERE public_key_sha256 IN ({marks})",
            sorted(set(key_hashes.values())),
        )
    }
    new_devices: list[tuple[Any, ...]] = []
    new_certs: list[tuple[Any, ...]] = []
    updates: list[tuple[str, tuple[Any, ...]]] = []
    results: list[CertificateRecord | Exception] = []
    for request in requests:
        key_hash = key_hashes[id(request)]
        try:
            _check_issuance(request, key_hash, devices.get(request.device_id), hardware_owner, key_owner)
        except Conflict as exc:
            results.append(exc)
            continue
        device = devices.get(request.device_id)
        status = DeviceStatus.ACTIVE if request.activate else DeviceStatus.PENDING
        if device is None:
            new_devices.append((request.device_id, request.hardware_id, request.profile, status.value, tx.now, tx.now))
            tx.event(
                "device.created",
                request.actor,
                request.device_id,
                {"hardware_id": request.hardware_id, "profile": request.profile},
            )
            device = Device(request.device_id, request.hardware_id, request.profile, status, tx.now, tx.now)
        else:
            if request.hardware_id is not None and device.hardware_id is None:
                updates.append(
                    (
                        "UPDATE devices SET hardware_id = ?, updated_at = ? WHERE device_id = ?",
                        (request.hardware_id, tx.now, request.device_id),
                    )
                )
                device = replace(device, hardware_id=request.hardware_id)
            if request.activate and device.status is DeviceStatus.PENDING:
                updates.append(
                    (
                        "UPDATE devices SET status = 'active', updated_at = ? WHERE device_id = ?",
                        (tx.now, request.device_id),
                    )
                )
                tx.event("device.active", request.actor, request.device_id)
                device = replace(device, status=DeviceStatus.ACTIVE)
        devices[request.device_id] = device
        if request.hardware_id is not None:
            hardware_owner[request.hardware_id] = request.device_id
        key_owner.setdefault(key_hash, request.device_id)
        cert_status = CertificateStatus.ACTIVE if request.activate else CertificateStatus.PENDING
        record = CertificateRecord(
            serial=serial_hex(request.cert),
            fingerprint=fingerprint(request.cert),
            device_id=request.device_id,
            public_key_sha256=key_hash,
            not_before=iso(request.cert.not_valid_before_utc),
            not_after=iso(request.cert.not_valid_after_utc),
            status=cert_status,
            issued_at=tx.now,
            pem=pem(request.cert).decode(),
        )
        new_certs.append(
            (
                record.serial,
                record.fingerprint,
                record.device_id,
                key_hash,
                record.not_before,
                record.not_after,
                cert_status.value,
                tx.now,
                tx.now if request.activate else None,
                record.pem,
            )
        )
        tx.event(
            "certificate.issued",
            request.actor,
            request.device_id,
            {
                "serial": record.serial,
                "fingerprint": record.fingerprint,
                "profile": request.profile,
                "status": cert_status.value,
                "not_after": record.not_after,
                "public_key_sha256": key_hash,
                **request.details,
            },
        )
        results.append(record)
    if new_devices:
        await tx.executemany(f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", new_devices)
    for sql, params in updates:
        await tx.execute(sql, params)
    if new_certs:
        await tx.executemany(
            "INSERT INTO certificates (serial, fingerprint, device_id, public_key_sha256, not_before, not_after, "
            "status, issued_at, activated_at, pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            new_certs,
        )
    return results


def _check_issuance(
    request: _IssuanceRequest,
    key_hash: str,
    device: Device | None,
    hardware_owner: dict[str, str],
    key_owner: dict[str, str],
) -> None:
    device_id, hardware_id = request.device_id, request.hardware_id
    if hardware_id is not None and hardware_owner.get(hardware_id, device_id) != device_id:
        raise Conflict(f"hardware id {hardware_id!r} is already bound to device {hardware_owner[hardware_id]!r}")
    if key_owner.get(key_hash, device_id) != device_id:
        raise Conflict(f"duplicate public key: it already belongs to device {key_owner[key_hash]!r}")
    if device is None:
        return
    if device.status is DeviceStatus.REVOKED:
        raise Conflict(f"device {device_id!r} is revoked; a revoked device id cannot be issued again")
    if hardware_id is not None and device.hardware_id not in (None, hardware_id):
        raise Conflict(f"device {device_id!r} is bound to hardware id {device.hardware_id!r}, not {hardware_id!r}")
    if device.profile != request.profile:
        raise Conflict(f"device {device_id!r} has profile {device.profile!r}; issue with --profile {device.profile}")


async def _set_device_status(
    tx: Tx, device_id: str, status: DeviceStatus, actor: str, data: dict[str, Any] | None = None
) -> None:
    await tx.execute(
        "UPDATE devices SET status = ?, updated_at = ? WHERE device_id = ?", (status.value, tx.now, device_id)
    )
    tx.event(f"device.{status.value}", actor, device_id, data)


async def _revoke_certificate(
    tx: Tx, cert: CertificateRecord, reason: RevocationReason, actor: str
) -> CertificateRecord:
    await tx.execute(
        "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?",
        (tx.now, reason.value, cert.serial),
    )
    tx.event(
        "certificate.revoked",
        actor,
        cert.device_id,
        {"serial": cert.serial, "fingerprint": cert.fingerprint, "reason": reason.value},
    )
    return replace(cert, status=CertificateStatus.REVOKED, revoked_at=tx.now, revocation_reason=reason)
