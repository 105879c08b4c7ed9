"""The device registry: the source of truth for devices, certificates and the audit log.

Every state change and its audit event are written in one transaction, so the
log can never disagree with the tables. Invariants that span rows (a hardware
id belongs to one device, a public key to one device, revoked is final) are
checked inside the serialising write transaction, which makes them hold across
processes and hosts, not just within this one.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from cryptography import x509

from iotauth.certs import cert_time, timestamp
from iotauth.errors import Conflict, NotFound, RegistryError
from iotauth.identity import validate_device_id, validate_hardware_id, validate_profile_name
from iotauth.registry import rows
from iotauth.registry.backend import SqlConnection, Tx, WriteBatcher
from iotauth.registry.events import EventKind, device_status_changed
from iotauth.registry.feed import EventFeed
from iotauth.registry.issuance import Coalescer, IssuanceRequest, record_issuances
from iotauth.registry.models import (
    CRL_REASONS,
    CertificateRecord,
    CertificateStatus,
    Credential,
    Device,
    DeviceStatus,
    RevocationReason,
    RevokedSerial,
)

T = TypeVar("T")


class Registry(EventFeed):
    """Async registry API over a storage backend. Use as an async context manager.

    Reading the audit log and following it as a change feed come from :class:`EventFeed`.
    """

    def __init__(
        self,
        writer: SqlConnection,
        reader: SqlConnection,
        batcher: WriteBatcher,
        closers: Sequence[Callable[[], Awaitable[None]]],
        wait_change: Callable[[float], Awaitable[None]] | None = None,
        location: str = "",
    ) -> None:
        super().__init__(reader, wait_change)
        self._writer = writer
        self._batcher = batcher
        self._closers = closers
        self.location = location
        self._issuance: Coalescer[IssuanceRequest, CertificateRecord] = Coalescer(self._record_batch)

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
            f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (validate_device_id(device_id),)
        )
        if row is None:
            raise NotFound(f"unknown device {device_id!r}")
        return rows.device(row)

    async def find_device_by_hardware_id(self, hardware_id: str) -> Device | None:
        row = await self._reader.fetchone(
            f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE hardware_id = ?", (validate_hardware_id(hardware_id),)
        )
        return rows.device(row) if row else None

    async def list_devices(self, status: DeviceStatus | None = None, limit: int | None = None) -> list[Device]:
        sql = f"SELECT {rows.DEVICE_COLUMNS} FROM devices"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status.value)
        sql += " ORDER BY device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [rows.device(r) for r in await self._reader.fetchall(sql, params)]

    # -- certificates ----------------------------------------------------------------------

    async def certificates_of(self, device_id: str) -> list[CertificateRecord]:
        found = await self._reader.fetchall(
            f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE device_id = ? ORDER BY issued_at, serial",
            (validate_device_id(device_id),),
        )
        return [rows.certificate(r) for r in found]

    async def get_certificate(self, serial: str) -> CertificateRecord:
        row = await self._reader.fetchone(f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
        if row is None:
            raise NotFound(f"unknown certificate serial {serial!r}")
        return rows.certificate(row)

    async def certificates_with_key(self, public_key_sha256: str) -> list[CertificateRecord]:
        found = await self._reader.fetchall(
            f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE public_key_sha256 = ?", (public_key_sha256,)
        )
        return [rows.certificate(r) for r in found]

    async def find_credential(self, cert_fingerprint: str) -> Credential | None:
        """The certificate with this fingerprint and its device, in one indexed read."""
        cert_cols = ", ".join(f"c.{c.strip()}" for c in rows.CERT_COLUMNS.split(","))
        dev_cols = ", ".join(f"d.{c.strip()}" for c in rows.DEVICE_COLUMNS.split(","))
        row = await self._reader.fetchone(
            f"SELECT {cert_cols}, {dev_cols} FROM certificates c JOIN devices d ON d.device_id = c.device_id "
            "WHERE c.fingerprint = ?",
            (cert_fingerprint,),
        )
        if row is None:
            return None
        count = rows.CERT_COLUMN_COUNT
        return Credential(rows.certificate(row[:count]), rows.device(row[count:]))

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
        request = IssuanceRequest(
            cert=cert,
            device_id=validate_device_id(device_id),
            profile=validate_profile_name(profile),
            hardware_id=validate_hardware_id(hardware_id) if hardware_id is not None else None,
            activate=activate,
            actor=actor,
            details=details or {},
        )
        return await self._issuance.submit(request)

    async def _record_batch(self, requests: list[IssuanceRequest]) -> list[CertificateRecord | Exception]:
        return await self.write(lambda tx: record_issuances(tx, requests))

    async def activate(self, device_id: str, serial: str, *, actor: str) -> CertificateRecord:
        """Mark a delivered certificate (and its device) active."""
        device_id = validate_device_id(device_id)

        async def op(tx: Tx) -> CertificateRecord:
            cert = await rows.certificate_in_tx(tx, serial)
            if cert.device_id != device_id:
                raise Conflict(f"certificate {serial} belongs to {cert.device_id!r}, not {device_id!r}")
            if cert.status is CertificateStatus.REVOKED:
                raise Conflict(f"certificate {serial} is revoked and cannot be activated")
            device = await rows.device_in_tx(tx, device_id)
            if device.status is DeviceStatus.REVOKED:
                raise Conflict(f"device {device_id!r} is revoked")
            if cert.status is CertificateStatus.PENDING:
                await tx.execute(
                    "UPDATE certificates SET status = 'active', activated_at = ? WHERE serial = ?", (tx.now, serial)
                )
                tx.event(EventKind.CERTIFICATE_ACTIVATED, actor, device_id, {"serial": serial})
            if device.status is DeviceStatus.PENDING:
                await _set_device_status(tx, device_id, DeviceStatus.ACTIVE, actor)
            return await rows.certificate_in_tx(tx, serial)

        return await self.write(op)

    async def revoke(self, device_id: str, reason: RevocationReason, *, actor: str) -> list[CertificateRecord]:
        """Revoke a device for good: the device and every unrevoked certificate it has.

        Idempotent: revoking a revoked device changes nothing and returns ``[]``.
        """
        device_id = validate_device_id(device_id)

        async def op(tx: Tx) -> list[CertificateRecord]:
            device = await rows.device_in_tx(tx, device_id)
            found = await tx.fetchall(
                f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE device_id = ? AND status <> 'revoked'",
                (device_id,),
            )
            revoked = [await _revoke_certificate(tx, rows.certificate(r), reason, actor) for r in found]
            if device.status is not DeviceStatus.REVOKED:
                await _set_device_status(tx, device_id, DeviceStatus.REVOKED, actor, {"reason": reason.value})
            return revoked

        return await self.write(op)

    async def revoke_certificate(self, serial: str, reason: RevocationReason, *, actor: str) -> CertificateRecord:
        """Revoke one certificate and leave its device's status alone (supersession, rework)."""

        async def op(tx: Tx) -> CertificateRecord:
            cert = await rows.certificate_in_tx(tx, serial)
            if cert.status is CertificateStatus.REVOKED:
                return cert
            return await _revoke_certificate(tx, cert, reason, actor)

        return await self.write(op)

    async def expire_pending(
        self, issued_before: datetime, reason: RevocationReason, *, actor: str
    ) -> list[CertificateRecord]:
        """Revoke every pending certificate issued before ``issued_before`` (delivery never completed)."""
        cutoff = timestamp(issued_before)

        async def op(tx: Tx) -> list[CertificateRecord]:
            found = await tx.fetchall(
                f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE status = 'pending' AND issued_at < ?", (cutoff,)
            )
            return [await _revoke_certificate(tx, rows.certificate(r), reason, actor) for r in found]

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
            device = await rows.device_in_tx(tx, device_id)
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
            return await rows.device_in_tx(tx, device_id)

        return await self.write(op)

    # -- CRL -------------------------------------------------------------------------------

    async def crl_entries(self, now: datetime) -> list[RevokedSerial]:
        """Unexpired certificates that relying parties must refuse.

        Revoked certificates carry their reason. Certificates that are pending
        (never delivered) or belong to a suspended device are listed as
        certificateHold, so brokers that only read the CRL refuse them too.
        """
        cutoff = cert_time(now)
        found = await self._reader.fetchall(
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
        return [RevokedSerial(serial, when, CRL_REASONS[reason]) for serial, when, reason in found]

    async def next_crl_number(self) -> int:
        async def op(tx: Tx) -> int:
            row = await tx.fetchone("SELECT value FROM meta WHERE key = 'crl_number'")
            number = int(row[0]) + 1 if row else 1
            await tx.execute("UPDATE meta SET value = ? WHERE key = 'crl_number'", (str(number),))
            return number

        return await self.write(op)

    # -- followers of the change feed -------------------------------------------------------

    async def follower_cursor(self, name: str) -> int | None:
        """The id of the last event the follower ``name`` applied, or None if it never saved one."""
        row = await self._reader.fetchone(
            "SELECT event_id FROM follower_cursors WHERE name = ?", (_follower_name(name),)
        )
        return int(row[0]) if row else None

    async def save_follower_cursor(
        self,
        name: str,
        event_id: int,
        *,
        actor: str,
        records: Sequence[tuple[EventKind, str | None, dict[str, Any]]] = (),
    ) -> None:
        """Move follower ``name`` to ``event_id`` and append its audit ``records`` in the same transaction.

        So what a follower did (its kicks, its syncs) is in the log exactly when
        its position says those events were applied.
        """
        name = _follower_name(name)

        async def op(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO follower_cursors (name, event_id) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET event_id = excluded.event_id",
                (name, event_id),
            )
            for kind, device_id, data in records:
                tx.event(kind, actor, device_id, data)

        await self.write(op)

    # -- audit log -------------------------------------------------------------------------

    async def record_event(
        self, kind: EventKind, *, actor: str, device_id: str | None = None, data: dict[str, Any] | None = None
    ) -> int:
        """Append a free-standing audit event (broker decisions, station steps)."""

        async def op(tx: Tx) -> int:
            return tx.event(kind, actor, device_id, data)

        return await self.write(op)


_FOLLOWER_NAME = re.compile(r"[a-z][a-z0-9:._-]{0,63}", re.ASCII)


def _follower_name(name: str) -> str:
    if not isinstance(name, str) or _FOLLOWER_NAME.fullmatch(name) is None:
        raise RegistryError(f"invalid follower name {name!r}: 1-64 of a-z 0-9 : . _ -, starting with a letter")
    return name


async def _set_device_status(
    tx: Tx, device_id: str, status: DeviceStatus, actor: str, data: dict[str, Any] | None = None
) -> None:
    await tx.execute(
        "UPDATE devices SET status = ?, updated_at = ? WHERE device_id = ?", (status.value, tx.now, device_id)
    )
    tx.event(device_status_changed(status.value), actor, device_id, data)


async def _revoke_certificate(
    tx: Tx, cert: CertificateRecord, reason: RevocationReason, actor: str
) -> CertificateRecord:
    await tx.execute(
        "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?",
        (tx.now, reason.value, cert.serial),
    )
    tx.event(
        EventKind.CERTIFICATE_REVOKED,
        actor,
        cert.device_id,
        {"serial": cert.serial, "fingerprint": cert.fingerprint, "reason": reason.value},
    )
    return replace(cert, status=CertificateStatus.REVOKED, revoked_at=tx.now, revocation_reason=reason)
