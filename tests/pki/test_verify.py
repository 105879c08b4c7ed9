"""Client-certificate verification: every way a presented certificate can be wrong."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography import x509

from iotauth.castore import load_ca
from iotauth.certs import now_utc
from iotauth.config import Home, load_settings
from iotauth.errors import Rejection
from iotauth.pki import CertificateAuthority, ClientCertificateVerifier
from iotauth.pki.keys import PrivateKey, generate_private_key
from tests.fixtures.pki import TRUST_DOMAIN, forge_certificate

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@pytest.fixture
def ca(home: Home) -> CertificateAuthority:
    return load_ca(home, load_settings(home))


@pytest.fixture
def verifier(ca: CertificateAuthority) -> ClientCertificateVerifier:
    return ClientCertificateVerifier([ca.root_cert], [ca.issuing_cert], TRUST_DOMAIN)


def _forge(authority_ca: CertificateAuthority, /, **kwargs: object) -> x509.Certificate:
    defaults: dict[str, object] = {
        "common_name": "sensor-1",
        "uris": [f"spiffe://{TRUST_DOMAIN}/device/sensor-1"],
        "issuer_cert": authority_ca.issuing_cert,
    }
    defaults.update(kwargs)
    return forge_certificate(
        generate_private_key().public_key(),
        authority_ca.issuing_key,
        authority_ca.issuing_cert.subject,
        **defaults,  # type: ignore[arg-type]
    )


def test_a_well_formed_forgery_by_the_real_ca_verifies(
    ca: CertificateAuthority, verifier: ClientCertificateVerifier
) -> None:
    assert verifier.verify(_forge(ca)).device_id == "sensor-1"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"not_before_offset": timedelta(days=-3), "lifetime": timedelta(days=1)}, "expired"),
        ({"not_before_offset": timedelta(days=1)}, "not-yet-valid"),
        ({"client_auth": False}, "chain"),
        ({"uris": None}, "chain"),
        ({"uris": [f"spiffe://{TRUST_DOMAIN}/device/a/b"], "common_name": "a/b"}, "identity"),
        ({"uris": [f"spiffe://{TRUST_DOMAIN}/device/+"], "common_name": "+"}, "identity"),
        ({"uris": [f"spiffe://{TRUST_DOMAIN}/device/#"], "common_name": "#"}, "identity"),
        ({"uris": ["spiffe://other.test/device/sensor-1"]}, "identity"),
        ({"common_name": "sensor-2"}, "identity"),
        (
            {"uris": [f"spiffe://{TRUST_DOMAIN}/device/sensor-1", f"spiffe://{TRUST_DOMAIN}/device/sensor-2"]},
            "identity",
        ),
        ({"ca": True}, "chain"),
    ],
)
def test_bad_certificates_are_rejected_with_a_reason(
    ca: CertificateAuthority, verifier: ClientCertificateVerifier, kwargs: dict[str, object], code: str
) -> None:
    with pytest.raises(Rejection) as info:
        verifier.verify(_forge(ca, **kwargs))
    assert info.value.code == code


def test_wrong_ca_and_self_signed_are_rejected(ca: CertificateAuthority, verifier: ClientCertificateVerifier) -> None:
    rogue_key = generate_private_key()
    rogue = forge_certificate(
        rogue_key.public_key(),
        rogue_key,
        ca.issuing_cert.subject,  # same issuer *name*, different key
        common_name="sensor-1",
        uris=[f"spiffe://{TRUST_DOMAIN}/device/sensor-1"],
    )
    with pytest.raises(Rejection) as info:
        verifier.verify(rogue)
    assert info.value.code == "chain"


def test_ca_certificate_used_as_client_is_rejected(
    ca: CertificateAuthority, verifier: ClientCertificateVerifier
) -> None:
    for cert in (ca.issuing_cert, ca.root_cert):
        with pytest.raises(Rejection):
            verifier.verify(cert)


def test_cache_still_checks_validity_on_every_call(
    ca: CertificateAuthority, verifier: ClientCertificateVerifier
) -> None:
    cert = _forge(ca, lifetime=timedelta(hours=1))
    assert verifier.verify(cert).device_id == "sensor-1"
    with pytest.raises(Rejection) as info:
        verifier.verify(cert, now=now_utc() + timedelta(hours=2))
    assert info.value.code == "expired"


def test_garbage_der_is_rejected_not_raised(verifier: ClientCertificateVerifier) -> None:
    with pytest.raises(Rejection) as info:
        verifier.verify_der(b"\x30\x03\x02\x01\x00")
    assert info.value.code == "malformed"


def test_a_leaf_signed_directly_by_the_root_is_refused(
    home: Home, ca: CertificateAuthority, verifier: ClientCertificateVerifier
) -> None:
    """It chains to the trusted root, so path building accepts it; device certificates come only from the issuing CA."""
    from iotauth.pki.keys import load_private_key

    root_key = load_private_key(home.root_key.read_bytes(), None, "root key")
    leaf = forge_certificate(generate_private_key().public_key(), root_key, ca.root_cert.subject,
                             common_name="sensor-1", uris=[f"spiffe://{TRUST_DOMAIN}/device/sensor-1"],
                             issuer_cert=ca.root_cert)
    with pytest.raises(Rejection, match="issuing CA, not by the root") as info:
        verifier.verify(leaf)
    assert info.value.code == "chain"
