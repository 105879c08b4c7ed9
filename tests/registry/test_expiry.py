"""Stale pending certificates: revoked by whichever long-running process notices first, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta

from cryptography import x509

from iotauth.authority import open_authority
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import CertificateStatus, open_registry
from iotauth.registry.expiry import expire_pending_forever, expire_stale_pending

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
LATER = timedelta(hours=-1)  # a TTL that every certificate issued so far has outlived


async def test_two_processes_expiring_at_once_revoke_each_certificate_once(
        home: Home, registry_url: str, csr_factory: CsrFactory) -> None:
    async with await open_registry(registry_url) as first, await open_registry(registry_url) as second:
        authority = await open_authority(home, first)
        pending = [await authority.issue(csr_factory()[1], f"stale-{n}", activate=False, actor="station")
                   for n in range(20)]
        fresh = await authority.issue(csr_factory()[1], "fresh", activate=False, actor="station")
        cutoff_ttl = timedelta(0)
        outcomes = await asyncio.gather(*(expire_stale_pending(reg, cutoff_ttl, actor=name)
                                          for reg, name in ((first, "iotauth-broker"), (second, "iotauth-serve"))
                                          for _ in range(3)))
        revoked = [c.serial for outcome in outcomes for c in outcome]
        expected = sorted([*(p.record.serial for p in pending), fresh.record.serial])
        assert sorted(revoked) == expected  # every one exactly once, between all six sweeps
        events = [e for e in await first.events() if e.kind == "certificate.revoked"]
        assert sorted(e.data["serial"] for e in events) == expected
        assert {e.data["reason"] for e in events} == {"superseded"}
        assert (await first.verify_audit()).ok
        assert await expire_stale_pending(second, cutoff_ttl, actor="again") == []


async def test_young_pending_and_active_certificates_are_left_alone(
        home: Home, registry_url: str, csr_factory: CsrFactory) -> None:
    async with await open_registry(registry_url) as registry:
        authority = await open_authority(home, registry)
        young = await authority.issue(csr_factory()[1], "young", activate=False, actor="station")
        active = await authority.issue(csr_factory()[1], "active", actor="op")
        assert await expire_stale_pending(registry, timedelta(hours=1), actor="sweep") == []
        expired = await expire_stale_pending(registry, LATER, actor="sweep")
        assert [c.serial for c in expired] == [young.record.serial]
        assert (await registry.get_certificate(active.record.serial)).status is CertificateStatus.ACTIVE


async def test_the_long_running_sweep_revokes_without_a_provisioning_run(
        home: Home, registry_url: str, csr_factory: CsrFactory) -> None:
    async with await open_registry(registry_url) as registry:
        authority = await open_authority(home, registry)
        issued = await authority.issue(csr_factory()[1], "abandoned", activate=False, actor="station")
        task = asyncio.get_running_loop().create_task(
            expire_pending_forever(registry, LATER, actor="iotauth-serve", interval=0.05))
        try:
            for _ in range(200):  # bounded wait, no wall-clock assertion
                if (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        record = await registry.get_certificate(issued.record.serial)
        assert record.status is CertificateStatus.REVOKED
        [event] = [e for e in await registry.events() if e.kind == "certificate.revoked"]
        assert event.actor == "iotauth-serve"


def age_pending(home: Home, serial: str, hours: int = 3) -> None:
    """Make a pending certificate look issued ``hours`` ago (the home's SQLite registry), as a crash long ago would."""
    import sqlite3

    from iotauth.certs import now_utc, timestamp

    with contextlib.closing(sqlite3.connect(home.registry_db)) as db, db:
        db.execute("UPDATE certificates SET issued_at = ? WHERE serial = ?",
                   (timestamp(now_utc() - timedelta(hours=hours)), serial))
