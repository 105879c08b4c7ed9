"""The CA's files in a home: written once, private keys private, encrypted keys locked without the passphrase."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.bootstrap import initialise_home
from iotauth.castore import client_verifier, load_ca, publish_crl, read_certificate
from iotauth.config import Home, load_settings
from iotauth.errors import CaLocked, PkiError
from tests.fixtures.pki import TRUST_DOMAIN


def test_private_keys_are_mode_0600(home: Home) -> None:
    for path in (home.root_key, home.issuing_key, home.server_key):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


async def test_init_never_overwrites_an_existing_ca(home: Home) -> None:
    before = home.issuing_key.read_bytes()
    with pytest.raises(PkiError, match="refusing to overwrite"):
        await initialise_home(home, TRUST_DOMAIN, ["localhost"], passphrase=None, actor="test")
    assert home.issuing_key.read_bytes() == before


async def test_passphrase_encrypts_ca_keys_and_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Home(tmp_path / "enc")
    await initialise_home(target, TRUST_DOMAIN, ["localhost"], key_type="p384", passphrase=b"s3cret", actor="t")
    for path in (target.root_key, target.issuing_key):
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert b"ENCRYPTED" not in target.server_key.read_bytes()  # the broker must start unattended
    settings = load_settings(target)
    monkeypatch.delenv("IOTAUTH_CA_PASSPHRASE", raising=False)
    with pytest.raises(CaLocked, match="set IOTAUTH_CA_PASSPHRASE"):
        load_ca(target, settings)
    monkeypatch.setenv("IOTAUTH_CA_PASSPHRASE", "guess")
    with pytest.raises(CaLocked, match="wrong IOTAUTH_CA_PASSPHRASE"):
        load_ca(target, settings)
    monkeypatch.setenv("IOTAUTH_CA_PASSPHRASE", "s3cret")
    ca = load_ca(target, settings)
    assert isinstance(ca.issuing_key, ec.EllipticCurvePrivateKey)
    assert ca.issuing_key.curve.name == "secp384r1"


def test_unreadable_certificates_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="cannot read certificate"):
        read_certificate(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(PkiError, match=r"bad\.pem is not a valid PEM certificate"):
        read_certificate(tmp_path / "bad.pem")


async def test_published_crl_is_what_the_ca_signed(home: Home) -> None:
    settings = load_settings(home)
    ca = load_ca(home, settings)
    crl = ca.sign_crl([], 7, settings.crl_next_update)
    publish_crl(home, crl)
    assert home.crl_pem.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert crl.is_signature_valid(ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert client_verifier(home, settings) is not None
