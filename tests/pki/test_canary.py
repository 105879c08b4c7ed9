"""Canary certificates exist only to be revoked: they can never pass for a device."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.castore import load_ca
from iotauth.certs import now_utc
from iotauth.config import Home, load_settings
from iotauth.errors import PkiError, Rejection
from iotauth.pki import CertificateAuthority, ClientCertificateVerifier
from iotauth.pki.canary import CANARY_PREFIX, issue_canary
from iotauth.pki.keys import generate_private_key
from tests.fixtures.pki import TRUST_DOMAIN


@pytest.fixture
def ca(home: Home) -> CertificateAuthority:
    return load_ca(home, load_settings(home))


def test_a_canary_names_no_device_and_lives_minutes(ca: CertificateAuthority) -> None:
    now = now_utc()
    cert = issue_canary(ca, generate_private_key().public_key(), "ab12", lifetime=timedelta(minutes=15), now=now)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CANARY_PREFIX + "ab12"
    assert ":" in CANARY_PREFIX  # outside the device-id alphabet: never a device, never the follower's name
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a relying party checks revocation, not usage, first
    assert cert.not_valid_after_utc - now <= timedelta(minutes=15)
    assert cert.issuer == ca.issuing_cert.subject


def test_iotauths_own_verifier_refuses_a_canary(ca: CertificateAuthority) -> None:
    cert = issue_canary(ca, generate_private_key().public_key(), "x1", lifetime=timedelta(minutes=5), now=now_utc())
    verifier = ClientCertificateVerifier([ca.root_cert], [ca.issuing_cert], TRUST_DOMAIN)
    with pytest.raises(Rejection):
        verifier.verify(cert)


@pytest.mark.parametrize(("name", "lifetime"), [("", timedelta(minutes=1)), ("a/b", timedelta(minutes=1)),
                                                ("ok", timedelta(hours=2)), ("ok", timedelta(0))])
def test_bad_canary_requests_are_refused(ca: CertificateAuthority, name: str, lifetime: timedelta) -> None:
    with pytest.raises(PkiError):
        issue_canary(ca, generate_private_key().public_key(), name, lifetime=lifetime, now=now_utc())
