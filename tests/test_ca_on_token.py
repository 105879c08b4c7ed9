"""The whole lifecycle with both CA keys on a real PKCS#11 token (SoftHSM2), and no CA key in the home.

``iotauth init`` creates the root key on the token and adopts an issuing key
imported there beforehand -- a key whose scalar this test knows, so it can
search the home for it afterwards. Then every signing path runs through the
token, each as the operator would run it (separate processes): ``issue``,
``provision`` over a pty to an emulated device, the broker admitting both
devices, ``serve`` answering OCSP, ``revoke`` publishing a CRL and the broker
dropping the session, ``crl``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from iotauth.authority import open_authority
from iotauth.config import Home, load_settings
from iotauth.errors import ConnectRefused, TokenLoginFailed
from iotauth.pki.keys import generate_private_key, load_private_key, private_key_pem
from iotauth.registry import open_registry
from iotauth.testing import CredentialFiles, MqttClient
from tests.fixtures.broker import BrokerProcess, wait_for
from tests.fixtures.cli import one_line_error, operator_cli
from tests.fixtures.devices import EmulatorFactory
from tests.fixtures.keyscan import private_key_material
from tests.fixtures.pki import TRUST_DOMAIN, make_csr
from tests.fixtures.service import RunningService, ocsp_status
from tests.fixtures.softhsm import PIN, SoftHsm

FAST = ["--timeout", "0.3", "--retries", "4", "--keygen-timeout", "2", "--baud", "1000000"]
UNATTENDED_KEYS = {"broker/server.key", "ca/ocsp.key"}  # the broker's TLS key and the OCSP responder's, by design


def cli(home: Home, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return operator_cli(home.root, *args, env=env, ok=ok)


def credentials(folder: Path, name: str, cert_pem: bytes, key_pem: bytes, home: Home) -> CredentialFiles:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.crt").write_bytes(cert_pem)
    (folder / f"{name}.key").write_bytes(key_pem)
    return CredentialFiles(name, folder / f"{name}.crt", folder / f"{name}.key", home.root_cert)


@pytest.mark.timeout(300)
def test_every_signing_path_runs_on_the_token(
    tmp_path: Path, softhsm: SoftHsm, emulator: EmulatorFactory,
    service_factory: object,
) -> None:
    issuing_secret = ec.generate_private_key(ec.SECP256R1())
    softhsm.import_key(issuing_secret, "issuing-ca")
    token = {"IOTAUTH_PKCS11_PIN": PIN, **softhsm.env}
    home = Home(tmp_path / "home")

    # init: the root key is made on the token, the issuing key adopted; iotauth.toml records URIs, not the PIN
    init = json.loads(cli(home, "init", "--trust-domain", TRUST_DOMAIN, "--root-key-uri", softhsm.uri("root-ca"),
                          "--issuing-key-uri", softhsm.uri("issuing-ca", module=False),
                          "--pkcs11-module", softhsm.module, "--json", env=token).stdout)
    assert init["adopted_token_keys"] == ["issuing"] and init["ca_keys_encrypted"] is False
    settings = load_settings(home)
    assert settings.ca.root_key_uri == softhsm.uri("root-ca")
    assert (settings.ca.issuing_key_uri, settings.ca.pkcs11_module) == (softhsm.uri("issuing-ca", module=False),
                                                                         softhsm.module)
    assert PIN not in home.config_file.read_text()
    issuing = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())
    assert issuing.public_key() == issuing_secret.public_key()
    one_line_error(cli(home, "crl", env=softhsm.env, ok=False), "needs its user PIN")
    one_line_error(cli(home, "crl", env={**token, "IOTAUTH_PKCS11_PIN": "000000"}, ok=False), "wrong PIN for token")

    # issue: a CSR from the command line, signed on the token
    device_key = generate_private_key("p256")
    (tmp_path / "d.csr").write_bytes(make_csr(device_key).public_bytes(serialization.Encoding.PEM))
    cli(home, "issue", "cli-device", "--csr", str(tmp_path / "d.csr"), "--out", str(tmp_path / "d.crt"),
        "--fullchain", env=token)
    issued = x509.load_pem_x509_certificates((tmp_path / "d.crt").read_bytes())
    issued[0].verify_directly_issued_by(issuing)

    # provision: the station writes a certificate signed on the token to a device on a pty
    board = emulator()
    run = cli(home, "provision", "--port", board.port, "--station", "st-hsm", *FAST, env=token)
    assert "1 provisioned" in run.stderr, run.stderr
    provisioned = board.certificate()
    assert provisioned is not None
    provisioned.verify_directly_issued_by(issuing)

    # the broker (it needs no CA key, and gets no PIN) admits both; serve answers OCSP with the token at hand
    broker = BrokerProcess(home, env=softhsm.env).start()
    service: RunningService = service_factory(home, extra_env=token)  # type: ignore[operator]
    try:
        cli_creds = credentials(tmp_path / "creds", "cli-device", (tmp_path / "d.crt").read_bytes(),
                                private_key_pem(device_key, None), home)
        board_creds = CredentialFiles(f"sensor-{board.hardware_id}", board.state / "fullchain.pem",
                                      board.state / "key.pem", board.state / "ca.pem")
        live = MqttClient(broker.port, cli_creds).connect()
        other = MqttClient(broker.port, board_creds).connect()
        other.publish(f"devices/{board_creds.device_id}/telemetry/t", b"21.5")
        assert ocsp_status(service, issued[0], issuing) is ocsp.OCSPCertStatus.GOOD

        # revoke: the CRL is signed on the token and published; the broker drops the session
        revoked = json.loads(cli(home, "revoke", "cli-device", "--reason", "key-compromise", "--json",
                                 env=token).stdout)
        assert revoked["crl"].startswith("CRL #"), revoked
        crl = x509.load_der_x509_crl(home.crl_der.read_bytes())
        assert crl.is_signature_valid(issuing_secret.public_key())
        assert crl.get_revoked_certificate_by_serial_number(issued[0].serial_number) is not None
        wait_for(lambda: not live.client.is_connected(), message="revoked session dropped")
        with pytest.raises(ConnectRefused):
            MqttClient(broker.port, cli_creds).connect()
        assert ocsp_status(service, issued[0], issuing) is ocsp.OCSPCertStatus.REVOKED
        with service.client() as client:
            served = x509.load_der_x509_crl(client.get("/crl.der").content)
        assert served.is_signature_valid(issuing_secret.public_key())
        assert served.get_revoked_certificate_by_serial_number(issued[0].serial_number) is not None
        other.publish(f"devices/{board_creds.device_id}/telemetry/t", b"still here")
        other.close()
    finally:
        broker.stop()
    published = json.loads(cli(home, "crl", "--json", env=token).stdout)
    assert published["entries"] == 1

    # no CA key material anywhere under the home: no key file, no DER structure, not the issuing key's scalar
    found = private_key_material(home.root, issuing_secret)
    assert set(found) == UNATTENDED_KEYS, found
    ca_keys = (issuing.public_key(), x509.load_pem_x509_certificate(home.root_cert.read_bytes()).public_key())
    for name in UNATTENDED_KEYS:
        assert load_private_key((home.root / name).read_bytes(), None, name).public_key() not in ca_keys


def test_the_scan_finds_ca_keys_in_a_home_with_key_files(home: Home) -> None:
    """The scanner can fail: in a home with file keys it finds both CA keys, and the issuing key's scalar."""
    issuing = load_private_key(home.issuing_key.read_bytes(), None, "issuing")
    assert isinstance(issuing, ec.EllipticCurvePrivateKey)
    found = private_key_material(home.root, issuing)
    assert set(found) == {"ca/root.key", "ca/issuing.key", *UNATTENDED_KEYS}
    assert "PEM private key" in found["ca/issuing.key"]
    (home.root / "leak.bin").write_bytes(b"..." + issuing.private_numbers().private_value.to_bytes(32, "big"))
    assert "scalar (raw)" in private_key_material(home.root, issuing)["leak.bin"]


def test_init_errors_on_a_token_are_one_line(tmp_path: Path, softhsm: SoftHsm) -> None:
    token = {"IOTAUTH_PKCS11_PIN": PIN, **softhsm.env}
    uri = softhsm.uri("issuing-ca")
    for env, key_uri, needle in [
        ({**token, "IOTAUTH_PKCS11_PIN": "111111"}, uri, f"wrong PIN for token '{softhsm.label}'"),
        (token, softhsm.uri("issuing-ca", label="no-such-token"), "no token matches token=no-such-token"),
        (token, "pkcs11:token=t;object=k?pin-value=1234", "a PIN in the key URI (pin-value)"),
        (token, "pkcs11:token=t;object=k", "no PKCS#11 module"),
        (token, "file:/tmp/issuing.key", "--issuing-key-uri takes a pkcs11: URI"),
    ]:
        home = Home(tmp_path / f"h{abs(hash(needle))}")
        one_line_error(cli(home, "init", "--issuing-key-uri", key_uri, env=env, ok=False), needle)
        assert not home.ca_dir.exists()
    home = Home(tmp_path / "missing-object")
    cli(home, "init", "--issuing-key-uri", uri, env=token)
    settings = home.config_file.read_text().replace("issuing-ca", "renamed-ca")
    home.config_file.write_text(settings)
    one_line_error(cli(home, "crl", env=token, ok=False), "no private key object 'renamed-ca' on token")
    strict = softhsm.directory / "strict.conf"
    strict.write_text(softhsm.conf.read_text() + "slots.mechanisms = CKM_EC_KEY_PAIR_GEN,CKM_SHA256\n")
    home.config_file.write_text(settings.replace("renamed-ca", "issuing-ca"))
    one_line_error(cli(home, "crl", env={**token, "SOFTHSM2_CONF": str(strict)}, ok=False),
                   "refuses ECDSA signing (CKM_ECDSA)")


async def test_without_the_pin_the_authority_is_locked_but_status_changes_work(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``serve`` and ``revoke`` get when the token's PIN is not at hand: the same as a locked passphrase."""
    home = Home(tmp_path / "home")
    cli(home, "init", "--issuing-key-uri", softhsm.uri("issuing-ca"), env={"IOTAUTH_PKCS11_PIN": PIN, **softhsm.env})
    monkeypatch.delenv("IOTAUTH_PKCS11_PIN", raising=False)
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry, signing_optional=True)
        assert isinstance(authority.signing_unavailable, TokenLoginFailed)
        with pytest.raises(TokenLoginFailed, match="needs its user PIN"):
            await authority.build_crl()
        with pytest.raises(TokenLoginFailed):
            await open_authority(home, registry)
