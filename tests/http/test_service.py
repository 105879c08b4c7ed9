"""``iotauth serve``: CRL and OCSP (checked with openssl), the admin API and its protections."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.certs import pem
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason
from tests.fixtures.service import ADMIN_TOKEN, RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
ServiceFactory = Callable[..., RunningService]


def openssl_ocsp(home: Home, service: RunningService, cert: x509.Certificate, tmp_path: Path) -> str:
    leaf = tmp_path / f"{cert.serial_number:x}.pem"
    leaf.write_bytes(pem(cert))
    result = subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(home.issuing_cert),
            "-cert",
            str(leaf),
            "-url",
            f"{service.base_url}/ocsp",
            "-CAfile",
            str(home.chain_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Response verify OK" in result.stderr + result.stdout
    return result.stdout


async def test_openssl_ocsp_reports_good_revoked_hold_and_unknown(
    home: Home,
    authority: Authority,
    registry: Registry,
    csr_factory: CsrFactory,
    service_factory: ServiceFactory,
    tmp_path: Path,
) -> None:
    good = await authority.issue(csr_factory()[1], "good-1", actor="op")
    gone = await authority.issue(csr_factory()[1], "gone-1", actor="op")
    pending = await authority.issue(csr_factory()[1], "pending-1", activate=False, actor="op")
    await registry.revoke("gone-1", RevocationReason.KEY_COMPROMISE, actor="op")
    service = service_factory(home)

    assert ": good" in openssl_ocsp(home, service, good.certificate, tmp_path)
    revoked = openssl_ocsp(home, service, gone.certificate, tmp_path)
    assert ": revoked" in revoked and "keyCompromise" in revoked
    held = openssl_ocsp(home, service, pending.certificate, tmp_path)
    assert ": revoked" in held and "certificateHold" in held
    foreign = authority.ca.issue(csr_factory()[1], "never-recorded", authority.settings.profile("default"))
    assert ": unknown" in openssl_ocsp(home, service, foreign, tmp_path)

    await registry.suspend("good-1", actor="op")  # live state, no restart
    assert "certificateHold" in openssl_ocsp(home, service, good.certificate, tmp_path)


async def test_crl_is_fresh_after_every_revocation(
    home: Home, authority: Authority, registry: Registry, csr_factory: CsrFactory, service_factory: ServiceFactory
) -> None:
    issued = [await authority.issue(csr_factory()[1], f"d{n}", actor="op") for n in range(3)]
    service = service_factory(home)
    with service.client() as client:
        assert len(x509.load_der_x509_crl(client.get("/crl.der").content)) == 0
        for n, item in enumerate(issued):
            await registry.revoke(f"d{n}", RevocationReason.CESSATION_OF_OPERATION, actor="op")
            crl = x509.load_pem_x509_crl(client.get("/crl.pem").content)
            assert crl.get_revoked_certificate_by_serial_number(int(item.record.serial, 16)) is not None
            assert len(crl) == n + 1
            assert crl.is_signature_valid(authority.ca.issuing_cert.public_key())  # type: ignore[arg-type]


async def test_admin_api_requires_a_token(
    home: Home, authority: Authority, csr_factory: CsrFactory, service_factory: ServiceFactory
) -> None:
    await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    service = service_factory(home)
    with service.client() as anonymous:
        assert anonymous.get("/admin/devices").status_code == 403
    with service.client("wrong-token") as guesser:
        assert guesser.get("/admin/devices").status_code == 403
        assert guesser.post("/admin/devices/sensor-1/revoke", json={}).status_code == 403
    with service.client(ADMIN_TOKEN) as operator:
        assert [d["device_id"] for d in operator.get("/admin/devices").json()] == ["sensor-1"]
        answer = operator.post("/admin/devices/sensor-1/revoke", json={"reason": "key-compromise"})
        assert answer.status_code == 200 and len(answer.json()["revoked_serials"]) == 1
        assert operator.get("/admin/devices/sensor-1").json()["device"]["status"] == "revoked"
        assert operator.get("/admin/devices/ghost").status_code == 404
        assert operator.post("/admin/devices/ghost/suspend").status_code == 404
        assert operator.post("/admin/devices/sensor-1/suspend").status_code == 409


async def test_admin_actions_are_audited_with_the_token_identity(
    home: Home, authority: Authority, registry: Registry, csr_factory: CsrFactory, service_factory: ServiceFactory
) -> None:
    await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    with service_factory(home).client(ADMIN_TOKEN) as operator:
        operator.post("/admin/devices/sensor-1/suspend")
    events = await registry.events(device_id="sensor-1")
    assert events[-1].kind == "device.suspended" and events[-1].actor.startswith("api:")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"reason": "because"}', "unknown reason 'because'"),
    ],
)
async def test_bad_input_is_a_400_with_a_message(
    home: Home, authority: Authority, csr_factory: CsrFactory, service_factory: ServiceFactory, body: bytes, needle: str
) -> None:
    await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    with service_factory(home).client(ADMIN_TOKEN) as operator:
        answer = operator.post("/admin/devices/sensor-1/revoke", content=body)
    assert answer.status_code == 400 and needle in answer.json()["error"]


def test_bodies_are_bounded(home: Home, service_factory: ServiceFactory) -> None:
    with service_factory(home).client(ADMIN_TOKEN) as operator:
        answer = operator.post("/admin/devices/sensor-1/revoke", content=b"x" * (1024 * 1024))
    assert answer.status_code == 413


def test_plain_http_never_accepts_admin_tokens(home: Home, service_factory: ServiceFactory) -> None:
    service = service_factory(home, tls=False)
    with service.client(ADMIN_TOKEN) as operator:
        assert operator.get("/admin/devices").status_code == 403
        assert operator.get("/crl.pem").status_code == 200


JSON_ENDPOINTS = ["/mosquitto/user", "/mosquitto/superuser", "/mosquitto/acl", "/admin/devices/sensor-1/revoke"]
EMQX_ENDPOINTS = ["/emqx/authn", "/emqx/authz"]  # EMQX reads any non-200 as "ignore": they answer 200 deny


def test_deeply_nested_json_is_a_400_on_every_json_endpoint(home: Home, service_factory: ServiceFactory) -> None:
    """The reported attack: '[' * 1000 + ']' * 1000 (2 KB) gave a 500 and a RecursionError in the log."""
    service = service_factory(home)
    with service.client(ADMIN_TOKEN) as client:
        for path in JSON_ENDPOINTS:
            answer = client.post(path, content=b"[" * 1000 + b"]" * 1000)
            assert answer.status_code == 400, (path, answer.text)
            assert "nested deeper than 16 levels" in answer.json()["error"]
            large = client.post(path, content=b'{"clientid": "' + b"x" * 20000 + b'"}')
            assert large.status_code == 400 and "too large" in large.json()["error"]
        for path in EMQX_ENDPOINTS:
            for body in (b"[" * 1000 + b"]" * 1000, b'{"clientid": "' + b"x" * 20000 + b'"}'):
                answer = client.post(path, content=body, headers={"content-type": "application/json"})
                assert (answer.status_code, answer.json()) == (200, {"result": "deny"}), (path, answer.text)
        assert client.get("/healthz").status_code == 200
    service.process.terminate()
    output = service.process.communicate(timeout=30)[0].decode()
    assert "Traceback" not in output and "RecursionError" not in output


async def test_serve_revokes_stale_pending_certificates_without_a_provisioning_run(
        home: Home, authority: Authority, registry: Registry, csr_factory: CsrFactory,
        service_factory: ServiceFactory) -> None:
    import asyncio

    from iotauth.registry import CertificateStatus
    from tests.registry.test_expiry import age_pending

    issued = await authority.issue(csr_factory()[1], "abandoned", activate=False, actor="station")
    age_pending(home, issued.record.serial)
    service_factory(home)
    for _ in range(200):  # bounded wait; the first sweep runs when serve starts
        if (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED:
            break
        await asyncio.sleep(0.1)
    assert (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED
    [event] = [e for e in await registry.events() if e.kind == "certificate.revoked"]
    assert event.actor == "iotauth-serve"
