"""The device registry: the source of truth for devices, certificates and the audit log.

Every state change and its audit event are written in one transaction, so the
log can never disagree with the tables. Invariants that span rows (a hardware
id belongs to one device, a public key to one device, revoked is final) are
checked inside the serialising write transaction, which makes them hold across
processes and hosts, not just within this one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from cryptography import x509

from iotauth.certs import cert_time, timestamp
from iotauth.errors import Conflict, NotFound, RegistryError, RegistryReplaced
from iotauth.identity import validate_device_id, validate_hardware_id, validate_profile_name
from iotauth.registry import rows
from iotauth.registry.backend import SqlConnection, Tx, WriteBatcher
from iotauth.registry.cursors import advance_cursor, read_cursor
from iotauth.registry.events import EventKind, device_status_changed
from iotauth.registry.feed import EventFeed
from iotauth.registry.fleet import HORIZONS, FleetSummary, fleet_summary
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
from iotauth.registry.renewal import RenewalRecords
from iotauth.registry.store import Connections, Store, Unavailable

T = TypeVar("T")
RecordOnCursor = tuple[EventKind, str | None, dict[str, Any]]  # (kind, device id, data) of a follower's record
log = logging.getLogger("iotauth.registry")


class Registry(EventFeed, RenewalRecords):
    """Async registry API over a storage backend. Use as an async context manager.

    Reading the audit log and following it as a change feed come from :class:`EventFeed`;
    renewals over MQTT, their activation and operators' rotation orders from :class:`RenewalRecords`.
    """

    def __init__(self, store: Store, connections: Connections) -> None:
        super().__init__(connections.reader, connections.wait_change)
        self._store = store
        self._connections: Connections | None = connections
        self._writer: SqlConnection = connections.writer
        self._batcher = WriteBatcher(connections.writer, store.dialect)
        self.location = store.location
        self.instance_id = connections.instance_id
        """The id this registry was created with; a copy of the database (a backup) keeps it."""
        self._lost: str | None = None
        self._reopening = asyncio.Lock()
        self.generation = 0
        """How many times the database was reopened; caches of what was read before are stale when it moves."""
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
        if self._connections is not None:
            connections, self._connections = self._connections, None
            await connections.close()

    # -- identity --------------------------------------------------------------------------

    @property
    def lost(self) -> str | None:
        """Why the database was given up (replaced by a foreign one, removed), or None while it is in use."""
        return self._lost

    async def identity_changed(self) -> str | None:
        """What changed about the database at :attr:`location` since it was opened, or None.

        Cheap enough to ask on every poll: SQLite compares the path's device
        and inode with the open file and re-reads the instance id; PostgreSQL
        checks its connection and re-reads the instance id. A database that was
        given up (see :meth:`reopen`) keeps answering why, until a reopen works.

        Raises:
            RegistryError: the check itself could not read the database.
        """
        if self._lost is not None or self._connections is None:
            return self._lost or "the registry is closed"
        return await self._store.changed(self._connections)

    async def ensure_identity(self) -> bool:
        """Reopen the database if it was replaced by a copy of itself; return whether it was reopened.

        For long-running users (``iotauth serve``, the broker): call it on every
        poll. Changes are logged once, when they happen.

        Raises:
            RegistryError: the database is gone, empty, foreign or another
                registry; every read and write fails until it is back.
        """
        change = await self.identity_changed()
        if change is None:
            return False
        if self._lost is None:
            log.error("%s: reopening it", change)
        await self.reopen()
        log.warning("registry %s reopened (instance %s); reads and writes go to it from now on",
                    self.location, self.instance_id)
        return True

    async def reopen(self) -> None:
        """Use the database now at :attr:`location` in place of the one open (which was replaced).

        Only a database with this registry's instance id is adopted: a copy of
        it (``mv registry.db x; cp x registry.db``, a restored backup). Writes
        in flight finish on the old connection first; every later read and write
        uses the new one. If the database is gone, empty, foreign or another
        registry, this registry gives it up instead: every read and write then
        fails with the reason (so its users fail closed) until a later
        ``reopen()`` finds the right database again.

        Raises:
            RegistryError: the database at the location is missing or not this registry.
        """
        async with self._reopening:
            try:
                fresh = await self._store.connect(create=False)
            except RegistryError as exc:
                await self._give_up(str(exc))
                raise
            if fresh.instance_id != self.instance_id:
                await fresh.close()
                error = RegistryReplaced(
                    f"registry {self.location} is now another registry (instance id {fresh.instance_id}, "
                    f"expected {self.instance_id}); refusing it"
                )
                await self._give_up(str(error))
                raise error
            await self._batcher.swap(fresh.writer)
            old, self._connections = self._connections, fresh
            self._use(fresh.writer, fresh.reader, fresh.wait_change)
            self._lost = None
            self.generation += 1
            if old is not None:
                await _close_quietly(old)

    async def _give_up(self, reason: str) -> None:
        if self._lost is None:
            log.error("giving up registry %s, failing closed (every read and write is refused until the "
                      "database is back): %s", self.location, reason)
        refusing = Unavailable(reason)
        await self._batcher.swap(refusing)
        self._use(refusing, refusing, None)
        self._lost = reason
        self.generation += 1
        old, self._connections = self._connections, None
        if old is not None:
            await _close_quietly(old)

    def _use(
        self, writer: SqlConnection, reader: SqlConnection, wait_change: Callable[[float], Awaitable[None]] | None
    ) -> None:
        self._writer, self._reader, self._wait_change = writer, reader, wait_change

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
        row = await self._reader.fetchone(rows.CREDENTIAL_SELECT + "WHERE c.fingerprint = ?", (cert_fingerprint,))
        return rows.credential(row) if row is not None else None

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
        reuse: bool = False,
        exclusive: bool = False,
    ) -> CertificateRecord:
        """Durably record a newly issued certificate (creating the device if new).

        Returns only after the record is committed to disk, so the caller may then
        hand the certificate out: every certificate in the field can be revoked.
        Concurrent calls are recorded together in one transaction and one commit.

        Args:
            reuse: if the device already has an unexpired, unrevoked certificate
                for the same public key, record nothing and return that one (a
                retried request must not leave two certificates in the field);
                a Conflict names it if its status is not the one asked for.
            exclusive: (the station's issuance) refuse, inside that transaction,
                a device that still has an unrevoked certificate of another key:
                two boards claiming one hardware id never both get a certificate.
        """
        request = IssuanceRequest(
            cert=cert,
            device_id=validate_device_id(device_id),
            profile=validate_profile_name(profile),
            hardware_id=validate_hardware_id(hardware_id) if hardware_id is not None else None,
            activate=activate,
            actor=actor,
            details=details or {},
            reuse=reuse,
            exclusive=exclusive,
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
            revoked = [await rows.revoke_in_tx(tx, rows.certificate(r), reason, actor) for r in found]
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
            return await rows.revoke_in_tx(tx, cert, reason, actor)

        return await self.write(op)

    async def expire_pending(
        self, issued_before: datetime, reason: RevocationReason, *, actor: str
    ) -> list[CertificateRecord]:
        """Revoke every pending certificate issued before ``issued_before`` (delivery never completed).

        Idempotent under concurrency: the certificates are selected inside the
        serialising write transaction, so two processes expiring at once revoke
        each certificate once. A read first keeps an idle sweep off the write lock.
        """
        cutoff = timestamp(issued_before)
        if await self._reader.fetchone(
            "SELECT 1 FROM certificates WHERE status = 'pending' AND issued_at < ? LIMIT 1", (cutoff,)
        ) is None:
            return []

        async def op(tx: Tx) -> list[CertificateRecord]:
            found = await tx.fetchall(
                f"SELECT {rows.CERT_COLUMNS} FROM certificates WHERE status = 'pending' AND issued_at < ?", (cutoff,)
            )
            return [await rows.revoke_in_tx(tx, rows.certificate(r), reason, actor) for r in found]

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

    async def summary(self, now: datetime, horizons: Sequence[int] = HORIZONS) -> FleetSummary:
        """Devices and certificates by status, devices expiring within ``horizons`` days, the audit head."""
        return await fleet_summary(self._reader, now, horizons)

    # -- followers' cursors ------------------------------------------------------------------

    async def follower_cursor(self, name: str) -> int | None:
        """The last event id the follower ``name`` (``push:emqx``) applied, or None before its first start."""
        return await read_cursor(self._reader, name)

    async def save_follower_cursor(
        self, name: str, event_id: int, *, actor: str = "", records: Sequence[RecordOnCursor] = ()
    ) -> None:
        """Record that ``name`` applied every event up to ``event_id``; a cursor never moves back.

        Replicas following the same feed share the cursor: the furthest one wins,
        and the others re-apply what they have not seen, which followers must
        tolerate (their calls are idempotent). ``records`` (the follower's own
        audit events, by ``actor``: its kicks, its syncs) are appended in the
        same commit, so the log says what was done exactly when the cursor says so.
        """

        async def op(tx: Tx) -> None:
            await advance_cursor(tx, name, event_id)
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


async def _set_device_status(
    tx: Tx, device_id: str, status: DeviceStatus, actor: str, data: dict[str, Any] | None = None
) -> None:
    await tx.execute(
        "UPDATE devices SET status = ?, updated_at = ? WHERE device_id = ?", (status.value, tx.now, device_id)
    )
    tx.event(device_status_changed(status.value), actor, device_id, data)


async def _close_quietly(connections: Connections) -> None:
    """Close connections to a database that was replaced (errors there no longer matter)."""
    try:
        await connections.close()
    except Exception as exc:
        log.warning("closing the replaced registry database: %s", exc)
