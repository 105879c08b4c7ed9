"""The guard in-process, against a real SQLite registry: races and failure modes the socket tests can't time.

The registry wrapper below forwards every call to the real registry; it only
adds a hook to run code at a precise point inside a lookup (to land a
revocation *between* the registry read and the registration of the binding).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotauth.authority import Authority
from iotauth.broker.audit import BrokerAudit
from iotauth.broker.binding import Binding, Denial, GuardOptions
from iotauth.broker.guard import Guard
from iotauth.broker.mqtt import Connect, Will
from iotauth.config import Home, load_settings
from iotauth.pki.keys import generate_private_key
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.policy import PolicySet
from iotauth.registry import Credential, Registry, RevocationReason
from tests.fixtures.pki import make_csr


class HookedRegistry:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.after_lookup: Callable[[], Awaitable[None]] | None = None

    async def find_credential(self, cert_fingerprint: str) -> Credential | None:
        found = await self.registry.find_credential(cert_fingerprint)
        if self.after_lookup is not None:
            hook, self.after_lookup = self.after_lookup, None
            await hook()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)


class NoHost:
    def bound(self, device_id: str | None = None) -> list[Binding]:
        return []

    async def forget(self, device_id: str, fingerprint: str | None) -> None:
        self.forgotten = (device_id, fingerprint)

    def prune(self, bindings: object) -> int:
        return 0


def make_guard(home: Home, registry: Any, expire_pending: Callable[[], Awaitable[object]] | None = None,
               **options: Any) -> Guard:
    settings = load_settings(home)
    root = x509.load_pem_x509_certificate(home.root_cert.read_bytes())
    issuing = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())
    return Guard(
        registry=registry,
        verifier=ClientCertificateVerifier([root], [issuing], settings.trust_domain),
        policies=PolicySet.from_profiles(settings.profiles.values()),
        audit=BrokerAudit(registry, flush_interval=0.05),
        options=GuardOptions(**options),
        expire_pending=expire_pending,
    )


async def through(guard: Guard, der: bytes, connect: Connect, peer: str, listener: str,
                  close: Callable[[], None]) -> Binding | Denial:
    """What the gate does: the certificate is checked when the handshake ends, then the CONNECT is admitted."""
    pre = await guard.precheck(der, peer, listener)
    if isinstance(pre, Denial):
        return pre
    return await guard.admit(pre, connect, peer, listener, close)


async def issue(authority: Authority, device_id: str) -> bytes:
    issued = await authority.issue(make_csr(generate_private_key("p256")), device_id, actor="test")
    return issued.certificate.public_bytes(serialization.Encoding.DER)


async def test_revocation_landing_during_the_lookup_is_not_missed(home: Home, registry: Registry,
                                                                  authority: Authority) -> None:
    der = await issue(authority, "racer")
    hooked = HookedRegistry(registry)
    guard = make_guard(home, hooked)
    await guard.start(NoHost())
    try:
        async def revoke_and_apply() -> None:
            await registry.revoke("racer", RevocationReason.KEY_COMPROMISE, actor="test")
            await guard.apply(await registry.events(after_id=guard.cursor))

        hooked.after_lookup = revoke_and_apply  # the lookup saw "active"; the revocation lands right after
        decision = await through(guard, der, Connect("racer", True, 30), "peer:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "revoked-during-connect"
        assert guard.connections("racer") == []
    finally:
        await guard.close()


async def test_revocation_after_admission_kicks_before_the_session_exists(home: Home, registry: Registry,
                                                                          authority: Authority) -> None:
    der = await issue(authority, "late-kick")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    closed: list[bool] = []
    try:
        binding = await through(guard, der, Connect("late-kick", True, 30), "peer:1", "mqtts",
                                    lambda: closed.append(True))
        assert isinstance(binding, Binding)
        await registry.revoke("late-kick", RevocationReason.UNSPECIFIED, actor="test")
        await guard.apply(await registry.events(after_id=guard.cursor))
        assert closed == [True] and binding.revoked in ("certificate-revoked", "device-revoked")
        assert not binding.allows("publish", "devices/late-kick/state")  # no rights, socket or not
        assert not guard.attach(binding, object(), "late-kick", None)  # amqtt's auth step refuses it too
    finally:
        await guard.close()


async def test_attach_refuses_what_amqtt_parsed_differently(home: Home, registry: Registry,
                                                            authority: Authority) -> None:
    der = await issue(authority, "parsed")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        binding = await through(guard, der, Connect("parsed", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(binding, Binding)
        assert not guard.attach(binding, object(), "someone-else", None)
        assert not guard.attach(binding, object(), "parsed", "devices/someone-else/commands/x")
        assert guard.attach(binding, object(), "parsed", "devices/parsed/state")
    finally:
        await guard.close()


async def test_unhealthy_registry_refuses_and_then_drops_sessions(home: Home, registry: Registry,
                                                                  authority: Authority) -> None:
    der, other = await issue(authority, "outage-live"), await issue(authority, "outage-new")
    guard = make_guard(home, registry, registry_grace=0.0)
    await guard.start(NoHost())
    closed: list[str] = []
    try:
        live = await through(guard, der, Connect("outage-live", True, 30), "p:1", "mqtts",
                             lambda: closed.append("live"))
        assert isinstance(live, Binding)
        guard.feed.unhealthy(OSError("disk gone"))  # what the feed loop does when a poll fails
        refused = await through(guard, other, Connect("outage-new", True, 30), "p:2", "mqtts", lambda: None)
        assert isinstance(refused, Denial) and (refused.reason, refused.return_code) == ("registry-unavailable", 3)
        guard.feed.unhealthy(OSError("still gone"))  # grace (0 s) is over: fail closed
        assert closed == ["live"] and live.revoked == "registry-unavailable"
        guard.feed.recovered()
        back = await through(guard, other, Connect("outage-new", True, 30), "p:2", "mqtts", lambda: None)
        assert isinstance(back, Binding)
    finally:
        await guard.close()


async def test_will_outside_policy_and_unknown_profile(home: Home, registry: Registry, authority: Authority) -> None:
    der = await issue(authority, "willful")
    guard = make_guard(home, registry)
    await guard.start(NoHost())
    try:
        bad_will = Connect("willful", True, 30, Will("devices/other/commands/x", b"", 0, False))
        decision = await through(guard, der, bad_will, "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "will-topic-denied"
        guard.policies = PolicySet.from_profiles([])  # the device's profile vanished from the config
        decision = await through(guard, der, Connect("willful", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(decision, Denial) and decision.reason == "unknown-profile"
    finally:
        await guard.close()


async def test_denial_floods_are_aggregated_not_lost(registry: Registry) -> None:
    audit = BrokerAudit(registry, flush_interval=60, topic_interval=0)
    for n in range(500):
        audit.denied("tls-no-client-certificate", None, {"peer": f"10.0.0.1:{n}"})
        if n == 250:  # a stolen, revoked certificate hidden in the flood
            audit.denied("certificate-revoked", "stolen", {"peer": "10.0.0.1:9999", "fingerprint": "ab" * 32})
    for n in range(200):
        audit.denied("tls-no-client-certificate", None, {"peer": f"10.0.0.2:{n}"})
    for n in range(1000):
        audit.topic_denied("dev1", "publish", "no publish rule matches the topic", f"devices/dev2/x/{n}")
    await audit.flush()
    events = await registry.events(after_id=0)
    denied = {(e.data["reason"], e.data["peer"].split(":")[0]): e for e in events if e.kind == "broker.connect.denied"}
    assert set(denied) == {("tls-no-client-certificate", "10.0.0.1"), ("certificate-revoked", "10.0.0.1"),
                           ("tls-no-client-certificate", "10.0.0.2")}
    assert denied["tls-no-client-certificate", "10.0.0.1"].data["count"] == 500
    assert denied["tls-no-client-certificate", "10.0.0.2"].data["count"] == 200
    stolen = denied["certificate-revoked", "10.0.0.1"]
    assert (stolen.device_id, stolen.data["fingerprint"], stolen.data["count"]) == ("stolen", "ab" * 32, 1)
    publish = [e for e in events if e.kind == "broker.publish.denied"]
    assert publish[0].data["count"] == 1000 and publish[0].data["first_topic"] == "devices/dev2/x/0"
    for n in range(100):  # the flood goes on: counted now, written at the next interval (or at close)
        audit.denied("tls-no-client-certificate", None, {"peer": f"10.0.0.1:{n}"})
    await audit.flush()
    assert len([e for e in await registry.events(after_id=0) if e.kind == "broker.connect.denied"]) == 3
    await audit.close()
    last = [e for e in await registry.events(after_id=0) if e.kind == "broker.connect.denied"][-1]
    assert (last.data["count"], last.data["total"]) == (100, 600)
    assert (await registry.verify_audit()).ok


async def test_policy_checks_never_touch_the_registry(home: Home, registry: Registry, authority: Authority) -> None:
    der = await issue(authority, "hot-path")
    calls: list[str] = []

    class Counting(HookedRegistry):
        async def find_credential(self, cert_fingerprint: str) -> Credential | None:
            calls.append(cert_fingerprint)
            return await super().find_credential(cert_fingerprint)

    guard = make_guard(home, Counting(registry))
    await guard.start(NoHost())
    try:
        binding = await through(guard, der, Connect("hot-path", True, 30), "p:1", "mqtts", lambda: None)
        assert isinstance(binding, Binding) and len(calls) == 1
        for n in range(1000):
            binding.allows("publish", f"devices/hot-path/telemetry/{n}")
        await asyncio.sleep(0)
        assert len(calls) == 1
    finally:
        await guard.close()


async def test_the_guard_sweep_revokes_stale_pending_certificates(home: Home, registry: Registry,
                                                                   authority: Authority) -> None:
    from datetime import timedelta
    from functools import partial

    from iotauth.registry import CertificateStatus
    from iotauth.registry.expiry import expire_stale_pending

    issued = await authority.issue(make_csr(generate_private_key("p256")), "abandoned", activate=False, actor="st")
    guard = make_guard(home, registry, partial(expire_stale_pending, registry, timedelta(hours=-1),
                                               actor="iotauth-broker"))
    await guard.start(NoHost())
    try:
        await guard.sweep()
    finally:
        await guard.close()
    assert (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED


async def test_the_broker_runtime_sweeps_stale_pending_certificates(home: Home, registry: Registry,
                                                                    authority: Authority) -> None:
    """``iotauth broker`` wires the sweep with the home's pending TTL: an abandoned delivery is revoked."""
    from iotauth.broker.runtime import BrokerOptions, open_runtime
    from iotauth.registry import CertificateStatus
    from tests.registry.test_expiry import age_pending

    stale = await authority.issue(make_csr(generate_private_key("p256")), "abandoned", activate=False, actor="st")
    young = await authority.issue(make_csr(generate_private_key("p256")), "in-flight", activate=False, actor="st")
    age_pending(home, stale.record.serial)
    runtime = await open_runtime(BrokerOptions(home=str(home.root), bind=None, watch_config=0), registry)
    await runtime.guard.start(NoHost())
    try:
        await runtime.guard.sweep()
    finally:
        await runtime.close()
    assert (await registry.get_certificate(stale.record.serial)).status is CertificateStatus.REVOKED
    assert (await registry.get_certificate(young.record.serial)).status is CertificateStatus.PENDING
    [event] = [e for e in await registry.events() if e.kind == "certificate.revoked"]
    assert event.actor == "iotauth-broker"
