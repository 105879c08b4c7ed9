"""The offline root, end to end: init exports it; ceremonies sign a new issuing CA and the root's CRL from it.

Across the rollover, devices with certificates from the old and from the new
issuing CA both connect to the broker, both get OCSP answers, and revoking
an old device yields a CRL from the old CA; once the root's CRL revokes the
old issuing CA, only the new one's devices get in.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from iotauth.authority import open_authority
from iotauth.castore import previous_issuing, trusted_issuing
from iotauth.config import Home, load_settings
from iotauth.errors import ConnectRefused
from iotauth.export.mosquitto import export
from iotauth.pki.keys import generate_private_key, load_private_key, private_key_pem
from iotauth.pki.signer import OFFLINE
from iotauth.policy import PolicySet
from iotauth.registry import open_registry
from iotauth.testing import free_port
from tests.fixtures.broker import BrokerProcess, DeviceCreds, Pki, connect, wait_for
from tests.fixtures.cli import one_line_error, operator_cli
from tests.fixtures.keyscan import private_key_material
from tests.fixtures.pki import TRUST_DOMAIN
from tests.fixtures.service import RunningService, ocsp_status
from tests.fixtures.softhsm import PIN, SoftHsm

ROOT_PASSPHRASE = "correct horse battery staple"


def cli(home: Home, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return operator_cli(home.root, *args, env=env, ok=ok)


def cert_of(creds: DeviceCreds) -> x509.Certificate:
    return x509.load_pem_x509_certificate(creds.cert.read_bytes())


def pem_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    marker = b"-----BEGIN X509 CRL-----"
    return [x509.load_pem_x509_crl(marker + part) for part in data.split(marker)[1:]]


@pytest.fixture
def offline_home(tmp_path: Path) -> tuple[Home, Path]:
    vault = tmp_path / "vault"
    vault.mkdir()
    home = Home(tmp_path / "home")
    init = json.loads(cli(home, "init", "--trust-domain", TRUST_DOMAIN, "--offline-root", "--root-key-out",
                          str(vault / "root.key"), "--json", env={"IOTAUTH_ROOT_PASSPHRASE": ROOT_PASSPHRASE}).stdout)
    assert init["root_key"] == OFFLINE and init["root_key_exported"] == str(vault / "root.key")
    return home, vault / "root.key"


@pytest.mark.timeout(300)
def test_rollover_with_the_exported_root(offline_home: tuple[Home, Path], tmp_path: Path,
                                         service_factory: Callable[..., RunningService]) -> None:
    home, exported = offline_home
    env = {"IOTAUTH_ROOT_PASSPHRASE": ROOT_PASSPHRASE}

    # init left no root key in the home: only the export holds it, encrypted and private
    assert load_settings(home).ca.root_key_uri == OFFLINE and not home.root_key.exists()
    assert exported.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    parsed = subprocess.run(["openssl", "asn1parse", "-in", str(exported)], capture_output=True, text=True,
                            check=True).stdout  # PBES2, PBKDF2-HMAC-SHA256 x 600,000 (0x927C0), AES-256-CBC
    assert all(part in parsed for part in (":PBES2", ":PBKDF2", "INTEGER           :0927C0", ":hmacWithSHA256",
                                           ":aes-256-cbc")), parsed
    subprocess.run(["openssl", "pkey", "-in", str(exported), "-noout", "-passin", "env:IOTAUTH_ROOT_PASSPHRASE"],
                   env={**os.environ, **env}, check=True, capture_output=True)  # OpenSSL reads it as well
    root_key = load_private_key(exported.read_bytes(), ROOT_PASSPHRASE.encode(), "export")
    root = x509.load_pem_x509_certificate(home.root_cert.read_bytes())
    assert isinstance(root_key, ec.EllipticCurvePrivateKey) and root_key.public_key() == root.public_key()
    assert set(private_key_material(home.root, root_key)) == {"ca/issuing.key", "broker/server.key", "ca/ocsp.key"}

    pki = Pki(home, tmp_path / "devices")
    old_a, old_b = pki.issue("old-a"), pki.issue("old-b")
    old_issuing = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())

    # the ceremony refuses a wrong passphrase, another key, and a missing --root-key, in one line each
    one_line_error(cli(home, "ceremony", "sign-issuing", "--root-key", str(exported),
                       env={"IOTAUTH_ROOT_PASSPHRASE": "not the passphrase"}, ok=False),
                   "wrong IOTAUTH_ROOT_PASSPHRASE")
    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(private_key_pem(generate_private_key("p256"), ROOT_PASSPHRASE.encode()))
    one_line_error(cli(home, "ceremony", "sign-issuing", "--root-key", str(stranger), env=env, ok=False),
                   "is not the key of this home's root CA")
    one_line_error(cli(home, "ceremony", "sign-issuing", env=env, ok=False), "the root of this home is offline")
    assert x509.load_pem_x509_certificate(home.issuing_cert.read_bytes()) == old_issuing

    rolled = json.loads(cli(home, "ceremony", "sign-issuing", "--root-key", str(exported), "--json",
                            env=env).stdout)
    new_issuing = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())
    assert rolled["generation"] == 2 and rolled["crl_error"] is None
    assert new_issuing.subject != old_issuing.subject and new_issuing.issuer == root.subject
    new_issuing.verify_directly_issued_by(root)
    assert [p.cert for p in previous_issuing(home)] == [old_issuing]
    assert trusted_issuing(home) == [new_issuing, old_issuing]
    assert x509.load_pem_x509_certificates(home.chain_file.read_bytes()) == [new_issuing, root]
    new_a = pki.issue("new-a")
    cert_of(new_a).verify_directly_issued_by(new_issuing)

    # the broker trusts both issuing CAs; serve answers OCSP for both, each through its own responder
    broker = BrokerProcess(home).start()
    service = service_factory(home)
    try:
        sessions = {c.device_id: connect(broker.port, c) for c in (old_a, old_b, new_a)}
        assert ocsp_status(service, cert_of(old_a), old_issuing) is ocsp.OCSPCertStatus.GOOD
        assert ocsp_status(service, cert_of(new_a), new_issuing) is ocsp.OCSPCertStatus.GOOD

        # revoking an old device: the CRL bundle has a CRL from each issuing CA, the old one listing it
        cli(home, "revoke", "old-a", "--reason", "key-compromise")
        wait_for(lambda: not sessions["old-a"].client.is_connected(), message="revoked session dropped")
        crls = {crl.issuer: crl for crl in pem_crls(home.crl_pem.read_bytes())}
        assert set(crls) == {new_issuing.subject, old_issuing.subject}
        assert crls[old_issuing.subject].is_signature_valid(old_issuing.public_key())  # type: ignore[arg-type]
        assert crls[new_issuing.subject].is_signature_valid(new_issuing.public_key())  # type: ignore[arg-type]
        assert crls[old_issuing.subject].get_revoked_certificate_by_serial_number(cert_of(old_a).serial_number)
        assert ocsp_status(service, cert_of(old_a), old_issuing) is ocsp.OCSPCertStatus.REVOKED
        for session in sessions.values():
            session.close()
    finally:
        broker.stop()

    # the root's CRL: the current issuing CA cannot be revoked; the previous one can, and is then refused
    one_line_error(cli(home, "ceremony", "crl", "--root-key", str(exported), "--revoke",
                       rolled["issuing_serial"], env=env, ok=False), "is the current issuing CA")
    arl = json.loads(cli(home, "ceremony", "crl", "--root-key", str(exported), "--revoke",
                         rolled["previous_serial"], "--json", env=env).stdout)
    assert arl["number"] == 1 and arl["revoked"] == [rolled["previous_serial"]]
    root_crl = x509.load_pem_x509_crl(home.root_crl_pem.read_bytes())
    assert root_crl.issuer == root.subject and root_crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert root_crl.get_revoked_certificate_by_serial_number(old_issuing.serial_number) is not None
    assert trusted_issuing(home) == [new_issuing]
    assert root.subject in {crl.issuer for crl in pem_crls(home.crl_pem.read_bytes())}
    broker = BrokerProcess(home).start()
    try:
        with pytest.raises(ConnectRefused):
            connect(broker.port, old_b)
        connect(broker.port, new_a).close()
    finally:
        broker.stop()
    again = json.loads(cli(home, "ceremony", "crl", "--root-key", str(exported), "--json", env=env).stdout)
    assert again["number"] == 2 and again["revoked"] == [rolled["previous_serial"]]  # the list only grows
    assert set(private_key_material(home.root, root_key)) == {
        "ca/issuing.key", "broker/server.key", "ca/ocsp.key",
        f"ca/previous/{rolled['previous_serial']}/issuing.key", f"ca/previous/{rolled['previous_serial']}/ocsp.key",
    }


def test_offline_root_needs_a_strong_passphrase_and_a_path_outside_the_home(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    one_line_error(cli(home, "init", "--offline-root", "--root-key-out", str(tmp_path / "r.key"), ok=False),
                   "set IOTAUTH_ROOT_PASSPHRASE or --root-passphrase-file")
    one_line_error(cli(home, "init", "--offline-root", "--root-key-out", str(tmp_path / "r.key"),
                       env={"IOTAUTH_ROOT_PASSPHRASE": "short"}, ok=False), "at least 12 characters")
    one_line_error(cli(home, "init", "--offline-root", "--root-key-out", str(home.root / "r.key"),
                       env={"IOTAUTH_ROOT_PASSPHRASE": ROOT_PASSPHRASE}, ok=False), "is inside the home")
    (tmp_path / "taken.key").write_text("x")
    one_line_error(cli(home, "init", "--offline-root", "--root-key-out", str(tmp_path / "taken.key"),
                       env={"IOTAUTH_ROOT_PASSPHRASE": ROOT_PASSPHRASE}, ok=False), "already exists")
    assert (tmp_path / "taken.key").read_text() == "x" and not home.ca_dir.exists()
    secret = tmp_path / "passphrase"
    secret.write_text(ROOT_PASSPHRASE + "\n")
    secret.chmod(0o600)
    cli(home, "init", "--offline-root", "--root-key-out", str(tmp_path / "r.key"), "--root-passphrase-file",
        str(secret))
    assert load_private_key((tmp_path / "r.key").read_bytes(), ROOT_PASSPHRASE.encode(), "export")


def test_rollover_onto_a_token_with_the_root_on_another(tmp_path: Path, softhsm: SoftHsm) -> None:
    """Root and issuing keys on tokens: the ceremony signs with the root token and creates the new key on one."""
    token = {"IOTAUTH_PKCS11_PIN": PIN, **softhsm.env}
    home = Home(tmp_path / "home")
    cli(home, "init", "--root-key-uri", softhsm.uri("root"), "--issuing-key-uri", softhsm.uri("issuing-1"), env=token)
    old = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())
    one_line_error(cli(home, "ceremony", "sign-issuing", "--issuing-key-uri", softhsm.uri("issuing-1"), env=token,
                       ok=False), "names the current issuing key")
    cli(home, "ceremony", "sign-issuing", "--issuing-key-uri", softhsm.uri("issuing-2"), env=token)
    assert load_settings(home).ca.issuing_key_uri == softhsm.uri("issuing-2")
    (previous,) = previous_issuing(home)
    assert previous.cert == old and previous.key_uri == softhsm.uri("issuing-1")
    published = json.loads(cli(home, "crl", "--json", env=token).stdout)
    assert published["number"] >= 1 and len(pem_crls(home.crl_pem.read_bytes())) == 2
    assert set(private_key_material(home.root)) == {"broker/server.key", "ca/ocsp.key",
                                                     f"ca/previous/{format(old.serial_number, 'x')}/ocsp.key"}


@pytest.mark.timeout(180)
def test_the_mosquitto_export_accepts_both_issuing_cas_after_a_rollover(home: Home, tmp_path: Path) -> None:
    """A real Mosquitto, configured by the export: devices of the old and the new issuing CA connect; a device
    revoked under the old CA is refused by the old CA's CRL in the bundle."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists() or shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto is not installed (scripts/install-system-deps.sh)")
    pki = Pki(home, tmp_path / "devices")
    old, gone = pki.issue("old-m"), pki.issue("old-revoked")
    cli(home, "ceremony", "sign-issuing")  # the root key of this home is ca/root.key ([ca] root_key_uri)
    new = pki.issue("new-m")
    cli(home, "revoke", "old-revoked")
    base = Path(tempfile.mkdtemp(prefix="iotauth-mosquitto-"))  # outside pytest's tree: mosquitto reads it
    base.chmod(0o755)
    port = free_port()
    try:
        asyncio.run(_export_mosquitto(home, base / "export", port))
        process = subprocess.Popen([mosquitto, "-c", str(base / "export" / "mosquitto.conf")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _listening(port), message="mosquitto listening")

            def publish(creds: DeviceCreds) -> int:
                return subprocess.run(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(home.root_cert),
                     "--cert", str(creds.cert), "--key", str(creds.key), "-i", creds.device_id,
                     "-t", f"devices/{creds.device_id}/state", "-m", "up", "-q", "1"],
                    capture_output=True, timeout=20, check=False).returncode

            assert publish(old) == 0 and publish(new) == 0
            assert publish(gone) != 0
        finally:
            process.terminate()
            process.wait(timeout=10)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _export_mosquitto(home: Home, directory: Path, port: int) -> None:
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        await export(home, registry, authority, PolicySet.from_profiles(load_settings(home).profiles.values()),
                     directory, "127.0.0.1", port)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True
