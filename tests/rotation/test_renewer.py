"""The renewer's decisions, one message at a time, against a real registry and CA: each refusal and its reason.

Over MQTT these run in tests/rotation/test_end_to_end.py; here every refusal
the issue names has a test of its own, with the code the device receives, the
reason, and the ``rotation.refused`` record in the audit log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from iotauth.authority import Authority
from iotauth.certs import fingerprint, now_utc
from iotauth.errors import RefusalCode
from iotauth.pki.keys import PrivateKey, generate_private_key
from iotauth.registry import CertificateStatus, Registry, RevocationReason
from iotauth.registry.journal import EventJournal
from iotauth.rotation import messages
from iotauth.rotation.messages import Status
from iotauth.rotation.renewer import Answer, RefusalAudit, Renewer
from tests.fixtures.pki import make_csr


@dataclass
class Dev:
    """A device's side: its current key and certificate, and the requests it signs."""

    device_id: str
    key: PrivateKey
    cert: x509.Certificate

    def renew(self, new_key: PrivateKey | None = None, **kwargs: Any) -> bytes:
        csr = messages.make_csr(new_key or generate_private_key("p256"), self.device_id)
        return messages.make_renew(self.key, self.cert, csr, self.device_id, **kwargs).encode()

    def topic(self) -> str:
        return messages.request_topic(self.device_id)


async def enrol(authority: Authority, device_id: str, key_type: str = "p256", now: datetime | None = None,
                profile: str = "default") -> Dev:
    key = generate_private_key(key_type)
    issued = await authority.issue(make_csr(key), device_id, profile, actor="test", now=now)
    return Dev(device_id, key, issued.certificate)


def set_profile(authority: Authority, **changes: Any) -> None:
    settings = authority.settings
    profile = replace(settings.profile("default"), **changes)
    authority.settings = replace(settings, profiles=MappingProxyType({**settings.profiles, "default": profile}))


@pytest.fixture
def renewer(authority: Authority, registry: Registry) -> Renewer:
    set_profile(authority, renew_after=0.0)  # the window is open unless a test closes it
    return Renewer(authority, RefusalAudit(EventJournal(registry, "renewer@test")), actor="renewer@test")


async def refusal(renewer: Renewer, topic: str, payload: bytes, code: RefusalCode, needle: str) -> Answer:
    answer = await renewer.handle(topic, payload)
    assert answer is not None
    assert answer.response.status is Status.REFUSED, answer.response
    assert answer.response.error is code and needle in (answer.response.reason or ""), answer.response
    await renewer.audit.flush(everything=True)
    events = [e for e in await renewer.registry.events(device_id=answer.device_id) if e.kind == "rotation.refused"]
    assert events and events[-1].data["reason"] == code.value and needle in events[-1].data["detail"]
    return answer


async def issued_serial(renewer: Renewer, dev: Dev, new_key: PrivateKey) -> str:
    answer = await renewer.handle(dev.topic(), dev.renew(new_key))
    assert answer is not None and answer.response.status is Status.ISSUED, answer and answer.response
    assert answer.response.serial is not None
    return answer.response.serial


async def test_a_renewal_is_issued_then_confirmed(renewer: Renewer, authority: Authority, registry: Registry) -> None:
    dev = await enrol(authority, "ok-1")
    new_key = generate_private_key("p256")
    answer = await renewer.handle(dev.topic(), dev.renew(new_key))
    assert answer is not None and answer.topic == "devices/ok-1/rotation/response"
    response = answer.response
    assert response.status is Status.ISSUED and response.chain is not None
    chain = x509.load_pem_x509_certificates(response.chain.encode())
    assert chain[0].public_key() == new_key.public_key() and chain[1] == authority.ca.issuing_cert
    assert (await registry.get_certificate(response.serial or "")).status is CertificateStatus.PENDING
    confirm = messages.make_confirm(new_key, "ok-1", response.serial or "").encode()
    activated = await renewer.handle(dev.topic(), confirm)
    assert activated is not None and activated.response.status is Status.ACTIVATED
    states = {c.serial: c.status for c in await registry.certificates_of("ok-1")}
    assert states == {response.serial: CertificateStatus.ACTIVE, format(dev.cert.serial_number, "x"):
                      CertificateStatus.REVOKED}


async def test_refused_a_key_the_device_already_used(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "reuse-own")
    await refusal(renewer, dev.topic(), dev.renew(dev.key), RefusalCode.KEY_REUSED, "already used")


async def test_refused_another_devices_key(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "reuse-theirs")
    victim = await enrol(authority, "reuse-victim")
    await refusal(renewer, dev.topic(), dev.renew(victim.key), RefusalCode.KEY_REUSED, "already used")


@pytest.mark.parametrize("status", ["revoked", "suspended"])
async def test_refused_a_device_that_is_not_active(renewer: Renewer, authority: Authority, registry: Registry,
                                                   status: str) -> None:
    dev = await enrol(authority, f"barred-{status}")
    if status == "revoked":
        await registry.revoke(dev.device_id, RevocationReason.KEY_COMPROMISE, actor="alice")
    else:
        await registry.suspend(dev.device_id, actor="alice")
    await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.DEVICE_NOT_ACTIVE, f"device is {status}")


async def test_refused_a_pending_device(renewer: Renewer, authority: Authority) -> None:
    key = generate_private_key("p256")
    issued = await authority.issue(make_csr(key), "barred-pending", activate=False, actor="station")
    dev = Dev("barred-pending", key, issued.certificate)  # delivered but never committed: pending
    await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.DEVICE_NOT_ACTIVE, "device is pending")


async def test_refused_an_expired_current_certificate(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "expired-1", now=now_utc() - timedelta(days=366))
    await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.CERTIFICATE_EXPIRED, "expired at")


async def test_refused_a_wrong_proof_signature(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "sig-wrong")
    thief = Dev(dev.device_id, generate_private_key("p256"), dev.cert)  # knows the certificate, not its key
    await refusal(renewer, dev.topic(), thief.renew(), RefusalCode.BAD_SIGNATURE, "does not verify")


async def test_refused_a_missing_proof_signature(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "sig-missing")
    data = json.loads(dev.renew())
    del data["signature"]
    await refusal(renewer, dev.topic(), json.dumps(data).encode(), RefusalCode.BAD_SIGNATURE, "no signature")


async def test_refused_a_replayed_request(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "replay-1")
    payload = dev.renew()
    first = await renewer.handle(dev.topic(), payload)
    assert first is not None and first.response.status is Status.ISSUED
    await refusal(renewer, dev.topic(), payload, RefusalCode.REPLAYED, "already received")


async def test_refused_a_stale_request(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "stale-1")
    old = int(now_utc().timestamp()) - 3600
    await refusal(renewer, dev.topic(), dev.renew(timestamp=old), RefusalCode.STALE, "away from the renewer's clock")


async def test_refused_a_request_published_for_another_device(renewer: Renewer, authority: Authority,
                                                             registry: Registry) -> None:
    attacker = await enrol(authority, "other-attacker")
    victim = await enrol(authority, "other-victim")
    # The attacker signs a perfectly valid request of its own but publishes it on the victim's topic (a broker
    # without per-device ACLs would let it): refused, and the answer goes to the topic's device only.
    answer = await refusal(renewer, victim.topic(), attacker.renew(), RefusalCode.BAD_REQUEST,
                           "was published on the topic of 'other-victim'")
    assert answer.topic == "devices/other-victim/rotation/response"
    assert len(await registry.certificates_of("other-attacker")) == 1  # nothing issued for anyone


async def test_refused_outside_the_window_unless_an_operator_ordered_it(renewer: Renewer, authority: Authority,
                                                                       registry: Registry) -> None:
    set_profile(authority, renew_after=0.66)
    renewer.settings = authority.settings
    dev = await enrol(authority, "window-1")
    answer = await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.OUTSIDE_WINDOW, "renewal window opens")
    retry = answer.response.retry_after or 0
    assert 0.66 * 365 * 86400 - 600 < retry < 0.66 * 365 * 86400 + 600
    await registry.order_rotations(["window-1"], actor="alice")
    ordered = await renewer.handle(dev.topic(), dev.renew())
    assert ordered is not None and ordered.response.status is Status.ISSUED
    issued = [e for e in await registry.events(device_id="window-1") if e.kind == "certificate.issued"][-1]
    assert issued.data["trigger"] == "operator"


async def test_refused_a_key_type_the_profile_does_not_allow(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "keytype-1")
    await refusal(renewer, dev.topic(), dev.renew(generate_private_key("ed25519")), RefusalCode.KEY_TYPE_NOT_ALLOWED,
                  "ed25519 is not allowed")


async def test_refused_a_second_renewal_while_one_is_pending(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "pending-1")
    await issued_serial(renewer, dev, generate_private_key("p256"))
    answer = await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.RENEWAL_PENDING, "pending")
    assert (answer.response.retry_after or 0) > 3000


async def test_refused_past_the_hourly_rate(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "rate-1")
    for _ in range(authority.settings.rotation.max_renewals_per_hour):
        new_key = generate_private_key("p256")
        serial = await issued_serial(renewer, dev, new_key)
        confirm = messages.make_confirm(new_key, dev.device_id, serial).encode()
        assert (await renewer.handle(dev.topic(), confirm)) is not None
        dev = Dev(dev.device_id, new_key, x509.load_pem_x509_certificate(
            (await renewer.registry.get_certificate(serial)).pem.encode()))
    await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.RATE_LIMITED, "renewals in the last")


async def test_refused_a_request_flood_before_any_cryptography(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "flood-1")
    junk = Dev(dev.device_id, generate_private_key("p256"), dev.cert)
    for _ in range(renewer.rate.per_minute):
        await renewer.handle(dev.topic(), junk.renew())
    answer = await refusal(renewer, dev.topic(), dev.renew(), RefusalCode.RATE_LIMITED, "requests a minute")
    assert 0 < (answer.response.retry_after or 0) <= 60


async def test_refused_a_certificate_the_device_does_not_hold(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "notcur-1")
    other = await enrol(authority, "notcur-2")
    # Signed with notcur-1's key, but naming notcur-2's certificate.
    request = messages.make_renew(dev.key, other.cert, messages.make_csr(generate_private_key("p256"), "x"),
                                  dev.device_id)
    await refusal(renewer, dev.topic(), request.encode(), RefusalCode.NOT_CURRENT_CERTIFICATE, "no certificate")


async def test_refused_a_csr_for_a_key_the_device_does_not_hold(renewer: Renewer, authority: Authority,
                                                                 registry: Registry) -> None:
    """A CSR carrying someone else's public key (its self-signature cannot verify), in a request properly signed by
    the device's current key: no proof of possession of the new key, nothing issued."""
    dev = await enrol(authority, "pop-1")
    own, victim = generate_private_key("p256"), generate_private_key("p256")
    spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    csr = messages.make_csr(own, dev.device_id).replace(own.public_key().public_bytes(*spki),
                                                        victim.public_key().public_bytes(*spki))
    assert x509.load_der_x509_csr(csr).public_key() == victim.public_key()
    request = messages.make_renew(dev.key, dev.cert, csr, dev.device_id)
    await refusal(renewer, dev.topic(), request.encode(), RefusalCode.BAD_REQUEST, "does not verify")
    assert [c.serial for c in await registry.certificates_of("pop-1")] == [format(dev.cert.serial_number, "x")]


async def test_malformed_messages(renewer: Renewer, authority: Authority, registry: Registry) -> None:
    dev = await enrol(authority, "junk-1")
    signed_junk = messages.make_renew(dev.key, dev.cert, b"not a csr", dev.device_id)  # signed, but no CSR
    await refusal(renewer, dev.topic(), signed_junk.encode(), RefusalCode.BAD_REQUEST, "not a valid DER")
    assert await renewer.handle(dev.topic(), b"\x00garbage") is None  # no request id: nobody to answer
    assert await renewer.handle("devices/junk-1/telemetry/x", dev.renew()) is None  # not a request topic
    await renewer.audit.flush(everything=True)
    refusals = [e for e in await registry.events(device_id="junk-1") if e.kind == "rotation.refused"]
    assert {e.data["reason"] for e in refusals} == {"bad-request"} and len(refusals) == 2


async def test_confirmations(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "confirm-1")
    new_key = generate_private_key("p256")
    serial = await issued_serial(renewer, dev, new_key)
    wrong = messages.make_confirm(dev.key, dev.device_id, serial).encode()  # the OLD key cannot confirm
    await refusal(renewer, dev.topic(), wrong, RefusalCode.BAD_SIGNATURE, "new certificate's key")
    unknown = messages.make_confirm(new_key, dev.device_id, format(dev.cert.serial_number, "x")).encode()
    await refusal(renewer, dev.topic(), unknown, RefusalCode.NOT_CURRENT_CERTIFICATE, "not a renewal")
    good = messages.make_confirm(new_key, dev.device_id, serial).encode()
    assert (await renewer.handle(dev.topic(), good)).response.status is Status.ACTIVATED  # type: ignore[union-attr]
    await refusal(renewer, dev.topic(), good, RefusalCode.REPLAYED, "already received")


async def test_a_retry_after_a_lost_answer_gets_the_same_certificate(renewer: Renewer, authority: Authority) -> None:
    dev = await enrol(authority, "lost-1")
    new_key = generate_private_key("p256")
    first = await issued_serial(renewer, dev, new_key)
    assert await issued_serial(renewer, dev, new_key) == first  # a new request id, the same key
    assert renewer.stats["reissued"] == 1


async def test_registry_failures_are_answered_internal_with_a_retry(renewer: Renewer, authority: Authority,
                                                                    registry: Registry) -> None:
    dev = await enrol(authority, "down-1")
    await registry.close()
    answer = await renewer.handle(dev.topic(), dev.renew())
    assert answer is not None and answer.response.error is RefusalCode.INTERNAL
    assert answer.response.retry_after == 30
    assert fingerprint(dev.cert)  # the device keeps its certificate: nothing changed
