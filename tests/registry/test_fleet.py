"""The fleet summary on every backend: counts by status, devices expiring by their newest active certificate."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from cryptography import x509

from iotauth.authority import Authority, open_authority
from iotauth.certs import cert_time, now_utc
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason, open_registry
from iotauth.registry.backend import Tx

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


async def ends(registry: Registry, serial: str, when: str) -> None:
    """Make a certificate's recorded notAfter ``when`` (the certificate itself is not re-signed)."""

    async def op(tx: Tx) -> None:
        await tx.execute("UPDATE certificates SET not_after = ? WHERE serial = ?", (when, serial))

    await registry.write(op)


async def issue(authority: Authority, csr_factory: CsrFactory, device_id: str, *, activate: bool = True) -> str:
    return (await authority.issue(csr_factory()[1], device_id, activate=activate, actor="op")).record.serial


async def test_devices_expiring_count_the_newest_active_certificate(home: Home, registry_url: str,
                                                                    csr_factory: CsrFactory) -> None:
    now = now_utc()
    at = {days: cert_time(now + timedelta(days=days)) for days in (-1, 1, 2, 3, 20, 100, 300)}
    async with await open_registry(registry_url) as registry:
        authority = await open_authority(home, registry)
        plan = {"soon": 3, "month": 20, "later": 100, "lapsed": -1, "revoked": 1, "suspended": 1}
        serials = {name: await issue(authority, csr_factory, name) for name in plan}
        for name, days in plan.items():
            await ends(registry, serials[name], at[days])
        old = await issue(authority, csr_factory, "renewed")
        new = await issue(authority, csr_factory, "renewed")
        await ends(registry, old, at[2])  # its old certificate runs out, the renewed one does not
        await ends(registry, new, at[300])
        await ends(registry, await issue(authority, csr_factory, "waiting", activate=False), at[1])
        await authority.revoke_device("revoked", RevocationReason.KEY_COMPROMISE, actor="op")
        await authority.suspend_device("suspended", actor="op")

        summary = await registry.summary(now)
        assert summary.devices == {"pending": 1, "active": 5, "suspended": 1, "revoked": 1}
        assert summary.certificates == {"pending": 1, "active": 7, "revoked": 1}
        assert summary.expiring == {7: 1, 30: 2}
        assert summary.lapsed == 1
        assert [(e.device_id, e.not_after) for e in summary.soonest] == [("soon", at[3]), ("month", at[20])]
        [head] = await registry.events(after_id=await registry.last_event_id() - 1)
        assert summary.head is not None and (summary.head.id, summary.head.hash) == (head.id, head.hash)
        assert (await registry.summary(now, (1, 400))).expiring == {1: 0, 400: 4}
        data = summary.as_dict()
        assert data["expiring_within_days"] == {"7": 1, "30": 2} and data["audit_head"]["id"] == head.id


async def test_an_empty_registry_summarises_to_zeros(registry: Registry) -> None:
    summary = await registry.summary(now_utc())
    assert summary.expiring == {7: 0, 30: 0} and summary.lapsed == 0 and summary.soonest == []
    assert set(summary.devices.values()) == {0} and set(summary.certificates.values()) == {0}
    last = await registry.last_event_id()
    assert (summary.head.id if summary.head is not None else 0) == last
