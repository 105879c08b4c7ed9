"""Admission of a pending renewal: activated by the device's first CONNECT with it, and only then.

In-process against a real registry, so the races and limits can be placed
exactly: a CONNECT that fails its own checks activates nothing, a renewal
past its TTL or of a barred device is refused like any pending certificate,
and the registry's transaction has the last word.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization

from iotauth.authority import Authority
from iotauth.broker.binding import Binding, Denial
from iotauth.broker.mqtt import Connect
from iotauth.config import Home
from iotauth.pki.keys import generate_private_key
from iotauth.registry import CertificateStatus, Registry, RevocationReason
from tests.broker.test_guard import NoHost, make_guard, through
from tests.fixtures.pki import make_csr
from tests.fixtures.rotation import pending_renewal


async def statuses(registry: Registry, device_id: str) -> dict[str, CertificateStatus]:
    return {c.serial: c.status for c in await registry.certificates_of(device_id)}


async def test_the_first_connect_activates_the_renewal(home: Home, registry: Registry, authority: Authority) -> None:
    current, der = await pending_renewal(authority, "adm-ok")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        binding = await through(guard, der, Connect("adm-ok", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(binding, Binding)
        states = await statuses(registry, "adm-ok")
        assert states.pop(current.serial) is CertificateStatus.REVOKED
        assert list(states.values()) == [CertificateStatus.ACTIVE]
        events = await registry.events(device_id="adm-ok")
        activated = next(e for e in events if e.kind == "certificate.activated")
        assert activated.data["via"] == "connect" and activated.actor == guard.audit.actor
    finally:
        await guard.close()


async def test_a_connect_that_fails_its_own_checks_activates_nothing(home: Home, registry: Registry,
                                                                     authority: Authority) -> None:
    current, der = await pending_renewal(authority, "adm-spoof")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        decision = await through(guard, der, Connect("someone-else", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "client-id-mismatch"
        assert CertificateStatus.PENDING in (await statuses(registry, "adm-spoof")).values()
        assert (await statuses(registry, "adm-spoof"))[current.serial] is CertificateStatus.ACTIVE
    finally:
        await guard.close()


async def test_a_renewal_past_its_ttl_is_refused_like_any_pending_certificate(home: Home, registry: Registry,
                                                                              authority: Authority) -> None:
    _, der = await pending_renewal(authority, "adm-old")
    guard = make_guard(home, registry, renewal_ttl=0.0)
    await guard.start(NoHost())
    try:
        decision = await through(guard, der, Connect("adm-old", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "certificate-pending"
    finally:
        await guard.close()


async def test_a_provisioning_delivery_that_is_pending_is_still_refused(home: Home, registry: Registry,
                                                                        authority: Authority) -> None:
    issued = await authority.issue(make_csr(generate_private_key("p256")), "adm-station", activate=False,
                                   actor="station")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        der = issued.certificate.public_bytes(serialization.Encoding.DER)
        decision = await through(guard, der, Connect("adm-station", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "certificate-pending"
    finally:
        await guard.close()


async def test_a_suspended_device_cannot_activate_its_renewal(home: Home, registry: Registry,
                                                              authority: Authority) -> None:
    _, der = await pending_renewal(authority, "adm-suspended")
    await registry.suspend("adm-suspended", actor="alice")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        decision = await through(guard, der, Connect("adm-suspended", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "certificate-pending"
    finally:
        await guard.close()


async def test_the_registry_has_the_last_word(home: Home, registry: Registry, authority: Authority) -> None:
    current, der = await pending_renewal(authority, "adm-race")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        pre = await guard.precheck(der, "p:1", "mqtts")
        assert not isinstance(pre, Denial) and pre.renewal is not None
        # Between the handshake and the CONNECT an operator revokes the certificate the renewal replaces.
        await registry.revoke_certificate(current.serial, RevocationReason.KEY_COMPROMISE, actor="alice")
        decision = await guard.admit(pre, Connect("adm-race", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "renewal-not-current-certificate"
        assert CertificateStatus.ACTIVE not in (await statuses(registry, "adm-race")).values()
    finally:
        await guard.close()
