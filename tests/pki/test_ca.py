"""Device issuance: identity from the caller only, the extension profile, key policy, init safety."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.bootstrap import initialise_home
from iotauth.castore import load_ca
from iotauth.certs import pem
from iotauth.config import Home, load_settings
from iotauth.errors import CsrRejected, PkiError
from iotauth.pki import CertificateAuthority, ClientCertificateVerifier, create_hierarchy
from iotauth.pki.keys import PrivateKey
from tests.fixtures.pki import TRUST_DOMAIN, make_csr

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@pytest.fixture
def ca(home: Home) -> CertificateAuthority:
    return load_ca(home, load_settings(home))


def test_issued_certificate_has_the_device_profile(
    ca: CertificateAuthority, home: Home, csr_factory: CsrFactory
) -> None:
    key, csr = csr_factory()
    profile = load_settings(home).profile("default")
    cert = ca.issue(csr, "sensor-1", profile, hardware_id="HW-0001")

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "HW-0001"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}/device/sensor-1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = ca.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[arg-type]
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=365) <= lifetime <= timedelta(days=365, minutes=10)


def test_serial_numbers_are_random_with_at_least_64_bits(
    ca: CertificateAuthority, home: Home, csr_factory: CsrFactory
) -> None:
    profile = load_settings(home).profile("default")
    _, csr = csr_factory()
    serials = {ca.issue(csr, f"d{n}", profile).serial_number for n in range(64)}
    assert len(serials) == 64
    assert min(s.bit_length() for s in serials) > 64


def test_csr_subject_and_sans_never_change_the_identity(
    ca: CertificateAuthority, home: Home, csr_factory: CsrFactory
) -> None:
    forged_sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/victim"),
        x509.DNSName("broker.example.com"),
    ]
    _, csr = csr_factory(common_name="victim", sans=forged_sans)
    cert = ca.issue(csr, "attacker-1", load_settings(home).profile("default"))
    assert cert.subject.rfc4514_string() == "CN=attacker-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/attacker-1")]
    verifier = ClientCertificateVerifier([ca.root_cert], [ca.issuing_cert], TRUST_DOMAIN)
    assert verifier.verify(cert).device_id == "attacker-1"


def test_csr_signature_must_verify(ca: CertificateAuthority, home: Home, csr_factory: CsrFactory) -> None:
    _, csr = csr_factory()
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    with pytest.raises(CsrRejected, match="possession"):
        ca.issue(tampered, "sensor-1", load_settings(home).profile("default"))


def test_key_policy_defaults_and_opt_ins(ca: CertificateAuthority, home: Home, csr_factory: CsrFactory) -> None:
    default = load_settings(home).profile("default")
    ca.issue(csr_factory("p384")[1], "p384-dev", default)
    for kind in ("ed25519", "rsa"):
        with pytest.raises(CsrRejected, match=f"key type {kind} is not allowed"):
            ca.issue(csr_factory(kind)[1], "x", default)
    opted_in = replace(default, key_types=frozenset({"p256", "ed25519", "rsa"}))
    ca.issue(csr_factory("ed25519")[1], "ed-dev", opted_in)
    ca.issue(csr_factory("rsa")[1], "rsa-dev", opted_in)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match="too small"):
        ca.issue(make_csr(small), "weak", opted_in)
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(CsrRejected, match="secp521r1"):
        ca.issue(make_csr(p521), "p521", opted_in)


def test_crl_and_ocsp_urls_come_from_configuration(home: Home, csr_factory: CsrFactory) -> None:
    settings = load_settings(home)
    settings = replace(settings, crl_url="http://pki.test/crl.der", ocsp_url="http://pki.test/ocsp")
    ca = load_ca(home, settings)
    cert = ca.issue(csr_factory()[1], "sensor-1", settings.profile("default"))
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name == [x509.UniformResourceIdentifier("http://pki.test/crl.der")]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert aia[0].access_location == x509.UniformResourceIdentifier("http://pki.test/ocsp")


def test_openssl_accepts_the_certificate_for_client_auth(
    ca: CertificateAuthority, home: Home, csr_factory: CsrFactory, tmp_path: Path
) -> None:
    cert = ca.issue(csr_factory()[1], "sensor-1", load_settings(home).profile("default"))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(cert))
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", str(home.chain_file), "-purpose", "sslclient", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong_purpose = subprocess.run(
        ["openssl", "verify", "-CAfile", str(home.chain_file), "-purpose", "sslserver", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong_purpose.returncode != 0


def test_server_certificate_covers_requested_names(home: Home) -> None:
    cert = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_bad_server_name_is_rejected(tmp_path: Path) -> None:
    import asyncio

    with pytest.raises(PkiError, match="neither an IP address nor a DNS host name"):
        asyncio.run(initialise_home(Home(tmp_path / "h"), TRUST_DOMAIN, ["bad name!"], passphrase=None, actor="t"))


def test_a_new_hierarchy_is_values_that_chain_together() -> None:
    hierarchy = create_hierarchy(TRUST_DOMAIN, "p384", ["broker.test", "10.0.0.1"])
    ca = hierarchy.ca
    assert isinstance(ca.issuing_key, ec.EllipticCurvePrivateKey) and ca.issuing_key.curve.name == "secp384r1"
    assert ca.root_cert.public_key() == hierarchy.root_key.public_key()
    ca.issuing_cert.verify_directly_issued_by(ca.root_cert)
    hierarchy.server_cert.verify_directly_issued_by(ca.issuing_cert)
    hierarchy.ocsp_cert.verify_directly_issued_by(ca.issuing_cert)
    san = hierarchy.server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.test"]
    with pytest.raises(PkiError, match="p256 or p384"):
        create_hierarchy(TRUST_DOMAIN, "rsa", ["localhost"])
