"""Recording issued certificates: the registry's busiest write, checked and inserted in batches.

Concurrent issuances (a station provisioning sixteen ports, a bulk import) are
gathered by a :class:`Coalescer` and recorded by :func:`record_issuances` in
one write operation: three set-based lookups, every cross-row invariant
checked in order, then bulk inserts. A thread round trip through aiosqlite
costs far more than the SQL it carries, so this is what makes issuance reach
thousands per second with durable commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from cryptography import x509

from iotauth.certs import cert_time, fingerprint, pem, public_key_sha256, serial_hex
from iotauth.errors import Conflict, ProfileMismatch
from iotauth.registry import rows
from iotauth.registry.backend import Row, SqlConnection, Tx
from iotauth.registry.events import EventKind
from iotauth.registry.models import CertificateRecord, CertificateStatus, Device, DeviceStatus

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(frozen=True)
class IssuanceRequest:
    cert: x509.Certificate
    device_id: str
    profile: str
    hardware_id: str | None
    activate: bool
    actor: str
    details: dict[str, Any]
    reuse: bool = False
    """An unexpired, unrevoked certificate of this device for this key is the answer (a retry), not a new one."""
    exclusive: bool = False  # one board per hardware id: refuse while the device has a live certificate of another key
    renewal_of: str | None = None
    """A renewal over MQTT: the serial of the certificate this one replaces (checked by :mod:`.renewal`)."""


class Coalescer(Generic[Req, Res]):
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


async def lookup(tx: Tx | SqlConnection, sql: str, values: list[str]) -> list[Row]:
    """Rows of ``sql`` (with ``{marks}`` for the IN list) over ``values``, in chunks of bound parameters."""
    found: list[Row] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        found += await tx.fetchall(sql.format(marks=", ".join("?" * len(chunk))), chunk)
    return found


async def record_issuances(tx: Tx, requests: list[IssuanceRequest]) -> list[CertificateRecord | Exception]:
    """Check and record a batch of issuances: three lookups, then bulk inserts.

    Every cross-row invariant (hardware id and public key each belong to one
    device; revoked is final; profile and hardware id of an existing device
    match; an exclusive request's device has no unrevoked certificate of
    another key) is checked against the database *and* against the earlier
    requests of the same batch, in order, before anything is written.
    """
    device_ids = sorted({r.device_id for r in requests})
    hardware_ids = sorted({r.hardware_id for r in requests if r.hardware_id is not None})
    key_hashes = {id(r): public_key_sha256(r.cert.public_key()) for r in requests}
    devices = {
        row[0]: rows.device(row)
        for row in await lookup(
            tx, f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id IN ({{marks}})", device_ids
        )
    }
    hardware_owner = {
        row[0]: row[1]
        for row in await lookup(
            tx, "SELECT hardware_id, device_id FROM devices WHERE hardware_id IN ({marks})", hardware_ids
        )
    }
    key_owner = {
        row[0]: row[1]
        for row in await lookup(
            tx,
            "SELECT public_key_sha256, device_id FROM certificates WHERE public_key_sha256 IN ({marks})",
            sorted(set(key_hashes.values())),
        )
    }
    reusable = await _reusable(tx, requests, key_hashes)
    exclusive_ids = sorted({r.device_id for r in requests if r.exclusive})
    live: dict[str, list[tuple[str, str, str]]] = {}
    for device_id, serial, key_sha256, status in await lookup(
        tx,
        "SELECT device_id, serial, public_key_sha256, status FROM certificates "
        "WHERE device_id IN ({marks}) AND status <> 'revoked'",
        exclusive_ids,
    ):
        live.setdefault(device_id, []).append((serial, key_sha256, status))
    new_devices: list[tuple[Any, ...]] = []
    new_certs: list[tuple[Any, ...]] = []
    updates: list[tuple[str, tuple[Any, ...]]] = []
    results: list[CertificateRecord | Exception] = []
    for request in requests:
        key_hash = key_hashes[id(request)]
        try:
            _check_issuance(request, key_hash, devices.get(request.device_id), hardware_owner, key_owner)
            if request.exclusive:
                _check_one_board(request, key_hash, live.get(request.device_id, []))
        except Conflict as exc:
            results.append(exc)
            continue
        existing = reusable.get((request.device_id, key_hash)) if request.reuse else None
        if existing is not None:
            wanted = CertificateStatus.ACTIVE if request.activate else CertificateStatus.PENDING
            if existing.status is wanted:
                results.append(existing)
            else:
                results.append(Conflict(f"device {request.device_id!r} already has {existing.status.value} "
                                        f"certificate {existing.serial} for this public key"))
            continue
        device = devices.get(request.device_id)
        status = DeviceStatus.ACTIVE if request.activate else DeviceStatus.PENDING
        if device is None:
            new_devices.append((request.device_id, request.hardware_id, request.profile, status.value, tx.now, tx.now))
            tx.event(
                EventKind.DEVICE_CREATED,
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
                tx.event(EventKind.DEVICE_ACTIVE, request.actor, request.device_id)
                device = replace(device, status=DeviceStatus.ACTIVE)
        devices[request.device_id] = device
        if request.hardware_id is not None:
            hardware_owner[request.hardware_id] = request.device_id
        key_owner.setdefault(key_hash, request.device_id)
        cert_status = CertificateStatus.ACTIVE if request.activate else CertificateStatus.PENDING
        live.setdefault(request.device_id, []).append((serial_hex(request.cert), key_hash, cert_status.value))
        record = CertificateRecord(
            serial=serial_hex(request.cert),
            fingerprint=fingerprint(request.cert),
            device_id=request.device_id,
            public_key_sha256=key_hash,
            not_before=cert_time(request.cert.not_valid_before_utc),
            not_after=cert_time(request.cert.not_valid_after_utc),
            status=cert_status,
            issued_at=tx.now,
            pem=pem(request.cert).decode(),
            renewal_of=request.renewal_of,
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
                request.renewal_of,
            )
        )
        tx.event(
            EventKind.CERTIFICATE_ISSUED,
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
        reusable[(request.device_id, key_hash)] = record  # a retry in the same batch gets this one
    if new_devices:
        await tx.executemany(f"INSERT INTO devices ({rows.DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", new_devices)
    for sql, params in updates:
        await tx.execute(sql, params)
    if new_certs:
        await tx.executemany(
            "INSERT INTO certificates (serial, fingerprint, device_id, public_key_sha256, not_before, not_after, "
            "status, issued_at, activated_at, pem, renewal_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            new_certs,
        )
    return results


async def _reusable(
    tx: Tx, requests: list[IssuanceRequest], key_hashes: dict[int, str]
) -> dict[tuple[str, str], CertificateRecord]:
    """The newest unexpired, unrevoked certificate per (device, key) among the keys of requests that allow reuse."""
    keys = sorted({key_hashes[id(r)] for r in requests if r.reuse})
    if not keys:
        return {}
    found: dict[tuple[str, str], CertificateRecord] = {}
    rows_found = await lookup(
        tx, f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE status <> 'revoked' AND public_key_sha256 IN "
        "({marks}) ORDER BY issued_at, serial", keys)
    now = tx.now[:19] + "Z"  # the certificate time format (seconds)
    for row in rows_found:
        record = rows.certificate(row)
        if record.not_after > now:
            found[(record.device_id, record.public_key_sha256)] = record
    return found


def _check_issuance(
    request: IssuanceRequest,
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
        raise ProfileMismatch(device_id, device.profile, request.profile)


def _check_one_board(request: IssuanceRequest, key_hash: str, live: list[tuple[str, str, str]]) -> None:
    """One board per hardware id: a live certificate of another key means a second board claims this identity.

    The station supersedes what it may replace (expired deliveries, or
    everything with ``--force``) before it issues; whatever is still live here
    belongs to a board that is still in flight or in service.
    """
    for serial, other_key, status in live:
        if other_key != key_hash:
            raise Conflict(
                f"hardware id {request.hardware_id!r}: device {request.device_id!r} already has certificate "
                f"{serial} ({status}) for another key; two boards claim this hardware id"
            )
