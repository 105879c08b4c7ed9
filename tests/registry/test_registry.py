"""Registry invariants: durable issuance, uniqueness, status transitions, schema handling."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.certs import now_utc
from iotauth.errors import Conflict, NotFound, RegistryError
from iotauth.pki.keys import PrivateKey
from iotauth.registry import CertificateStatus, DeviceStatus, Registry, RevocationReason, open_registry
from iotauth.registry.sqlite import SCHEMA_VERSION

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


async def test_issue_records_device_certificate_and_events(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-1", hardware_id="HW-1", actor="op")
    device = await registry.get_device("sensor-1")
    assert (device.status, device.hardware_id, device.profile) == (DeviceStatus.ACTIVE, "HW-1", "default")
    stored = await registry.get_certificate(issued.record.serial)
    assert stored.status is CertificateStatus.ACTIVE
    assert stored.fingerprint == issued.record.fingerprint
    assert "PRIVATE" not in stored.pem
    kinds = [e.kind for e in await registry.events(device_id="sensor-1")]
    assert kinds == ["device.created", "certificate.issued"]


async def test_pending_issue_then_activation(authority: Authority, registry: Registry, csr_factory: CsrFactory) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-1", activate=False, actor="station")
    assert (await registry.get_device("sensor-1")).status is DeviceStatus.PENDING
    credential = await registry.find_credential(issued.record.fingerprint)
    assert credential is not None and not credential.usable
    await registry.activate("sensor-1", issued.record.serial, actor="station")
    credential = await registry.find_credential(issued.record.fingerprint)
    assert credential is not None and credential.usable


async def test_hardware_id_belongs_to_one_device(authority: Authority, csr_factory: CsrFactory) -> None:
    await authority.issue(csr_factory()[1], "sensor-1", hardware_id="HW-1", actor="op")
    with pytest.raises(Conflict, match="already bound to device 'sensor-1'"):
        await authority.issue(csr_factory()[1], "sensor-2", hardware_id="HW-1", actor="op")
    with pytest.raises(Conflict, match="bound to hardware id 'HW-1'"):
        await authority.issue(csr_factory()[1], "sensor-1", hardware_id="HW-2", actor="op")


async def test_a_public_key_belongs_to_one_device(authority: Authority, csr_factory: CsrFactory) -> None:
    _, csr = csr_factory()
    await authority.issue(csr, "sensor-1", actor="op")
    with pytest.raises(Conflict, match="duplicate public key"):
        await authority.issue(csr, "sensor-2", actor="op")
    await authority.issue(csr, "sensor-1", actor="op")  # renewal with the same key is the same device


async def test_conflicts_inside_one_group_commit_are_isolated(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    _, shared = csr_factory()
    results = await asyncio.gather(
        authority.issue(csr_factory()[1], "a", hardware_id="HW-A", actor="op"),
        authority.issue(csr_factory()[1], "b", hardware_id="HW-A", actor="op"),  # same hardware id as "a"
        authority.issue(shared, "c", actor="op"),
        authority.issue(shared, "d", actor="op"),  # same key as "c"
        authority.issue(csr_factory()[1], "e", actor="op"),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results] == ["Issued", "Conflict", "Issued", "Conflict", "Issued"]
    assert {d.device_id for d in await registry.list_devices()} == {"a", "c", "e"}
    assert (await registry.verify_audit()).ok


async def test_profile_must_exist_and_match(authority: Authority, csr_factory: CsrFactory) -> None:
    with pytest.raises(Exception, match="unknown profile 'nope'"):
        await authority.issue(csr_factory()[1], "sensor-1", "nope", actor="op")
    await authority.issue(csr_factory()[1], "svc-1", "ingest", actor="op")
    with pytest.raises(Conflict, match="has profile 'ingest'"):
        await authority.issue(csr_factory()[1], "svc-1", "default", actor="op")


async def test_revocation_is_final_and_idempotent(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    first = await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    second = await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    revoked = await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    assert {c.serial for c in revoked} == {first.record.serial, second.record.serial}
    assert all(c.revocation_reason is RevocationReason.KEY_COMPROMISE for c in revoked)
    assert await registry.revoke("sensor-1", RevocationReason.UNSPECIFIED, actor="op") == []
    with pytest.raises(Conflict, match="revoked"):
        await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    with pytest.raises(Conflict, match="permanent"):
        await registry.suspend("sensor-1", actor="op")
    with pytest.raises(Conflict):
        await registry.activate("sensor-1", first.record.serial, actor="op")


async def test_suspend_and_resume(authority: Authority, registry: Registry, csr_factory: CsrFactory) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    assert (await registry.suspend("sensor-1", actor="op")).status is DeviceStatus.SUSPENDED
    credential = await registry.find_credential(issued.record.fingerprint)
    assert credential is not None and not credential.usable
    assert (await registry.resume("sensor-1", actor="op")).status is DeviceStatus.ACTIVE
    with pytest.raises(Conflict, match="not suspended"):
        await registry.resume("sensor-1", actor="op")


async def test_expire_pending_revokes_only_old_pending(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    old = await authority.issue(csr_factory()[1], "sensor-1", activate=False, actor="station")
    live = await authority.issue(csr_factory()[1], "sensor-2", actor="op")
    assert (
        await registry.expire_pending(now_utc() - timedelta(minutes=1), RevocationReason.SUPERSEDED, actor="ttl") == []
    )
    expired = await registry.expire_pending(now_utc() + timedelta(seconds=1), RevocationReason.SUPERSEDED, actor="ttl")
    assert [c.serial for c in expired] == [old.record.serial]
    assert (await registry.get_certificate(live.record.serial)).status is CertificateStatus.ACTIVE


async def test_unknown_things_are_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound, match="unknown device 'ghost'"):
        await registry.get_device("ghost")
    with pytest.raises(NotFound):
        await registry.get_certificate("abc")
    assert await registry.find_credential("00" * 32) is None


async def test_commits_are_durable_by_configuration(registry_url: str, registry: Registry) -> None:
    """SQLite: WAL with synchronous=FULL on every connection; PostgreSQL: synchronous_commit on for writes."""
    if registry_url.startswith("postgresql://"):
        assert (await registry._writer.fetchone("SHOW synchronous_commit"))[0] == "on"  # type: ignore[index]
        return
    for conn in (registry._writer, registry._reader):
        assert (await conn.fetchone("PRAGMA journal_mode"))[0] == "wal"  # type: ignore[index]
        assert (await conn.fetchone("PRAGMA synchronous"))[0] == 2  # type: ignore[index]  # FULL


async def test_schema_is_versioned_and_newer_schemas_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await open_registry(path, create=True):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RegistryError, match="newer than this iotauth supports"):
        await open_registry(path)


async def test_missing_and_corrupt_databases_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        await open_registry(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(RegistryError, match="corrupt or not an SQLite database"):
        await open_registry(garbage)


async def test_follower_cursors_persist_and_never_move_back(registry_url: str, registry: Registry) -> None:
    """A push follower's cursor survives a restart, and the furthest replica wins (it only moves forward)."""
    assert await registry.follower_cursor("push:emqx") is None
    await registry.save_follower_cursor("push:emqx", 7)
    await registry.save_follower_cursor("push:emqx", 12)
    await registry.save_follower_cursor("push:emqx", 9)  # a slower replica
    await registry.save_follower_cursor("push:rabbitmq", 3)
    assert await registry.follower_cursor("push:emqx") == 12
    await registry.close()
    async with await open_registry(registry_url) as reopened:
        assert await reopened.follower_cursor("push:emqx") == 12
        assert await reopened.follower_cursor("push:rabbitmq") == 3
        assert (await reopened.verify_audit()).ok  # cursors are bookkeeping, not audit events
        with pytest.raises(ValueError, match="invalid follower name"):
            await reopened.follower_cursor("x' OR 1=1 --")
