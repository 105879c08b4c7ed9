"""``iotauth serve`` as a process: a replaced registry file is reopened or fails closed, and /healthz says which."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable

import httpx
from cryptography import x509

from iotauth.authority import Authority
from iotauth.certs import pem
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from tests.fixtures.broker import iotauth_cli
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
ServiceFactory = Callable[..., RunningService]


def sh(command: str, home: Home) -> None:
    subprocess.run(["sh", "-c", command], cwd=home.root, check=True, timeout=30)


def poll(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def authn(client: httpx.Client, device_id: str, cert: x509.Certificate) -> httpx.Response:
    return client.post("/emqx/authn", json={"clientid": device_id, "cert_common_name": device_id,
                                            "cert_pem": pem(cert).decode()})


async def test_a_copied_registry_is_reopened_and_its_revocations_are_enforced(
    home: Home, authority: Authority, csr_factory: CsrFactory, service_factory: ServiceFactory
) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-9", actor="op")
    with service_factory(home).client() as client:
        assert authn(client, "sensor-9", issued.certificate).json()["result"] == "allow"
        sh("mv registry.db orphan.db && cp orphan.db registry.db", home)
        assert iotauth_cli(home, "revoke", "sensor-9").returncode == 0
        poll(lambda: authn(client, "sensor-9", issued.certificate).json()["result"] == "deny")
        assert client.get("/healthz").json()["ok"] is True


async def test_an_empty_registry_file_fails_closed_and_healthz_says_why(
    home: Home, authority: Authority, csr_factory: CsrFactory, service_factory: ServiceFactory
) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-8", actor="op")
    with sqlite3.connect(home.registry_db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with service_factory(home).client() as client:
        sh("mv registry.db kept.db && rm -f registry.db-wal registry.db-shm && : > registry.db", home)
        poll(lambda: client.get("/healthz").status_code == 503)
        health = client.get("/healthz").json()
        assert health["ok"] is False and "is an empty file, not an iotauth registry" in health["registry"]
        answer = authn(client, "sensor-8", issued.certificate)
        assert answer.status_code == 200 and answer.json()["result"] == "deny"  # fails closed (EMQX: 200 deny)
        assert client.get("/crl.pem").status_code == 503  # and no CRL without the revocations is signed
        sh("rm registry.db && mv kept.db registry.db", home)
        poll(lambda: client.get("/healthz").status_code == 200)
        assert authn(client, "sensor-8", issued.certificate).json()["result"] == "allow"
