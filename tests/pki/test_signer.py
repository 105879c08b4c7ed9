"""The signer seam, pure: key URIs (RFC 7512 / file:), and TokenKey signing through a digest signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from iotauth.errors import KeyUriError, PkiError, TokenError
from iotauth.pki.signer import FileKeyUri, Pkcs11Uri, TokenKey, keys_match, parse_key_uri


def test_file_uris_relative_absolute_and_rfc8089() -> None:
    assert parse_key_uri("file:ca/issuing.key") == FileKeyUri("ca/issuing.key")
    assert parse_key_uri("file:/srv/ca/issuing.key") == FileKeyUri("/srv/ca/issuing.key")
    assert parse_key_uri("file:///srv/ca/my%20key.pem") == FileKeyUri("/srv/ca/my key.pem")
    assert parse_key_uri("file://localhost/k.pem") == FileKeyUri("/k.pem")
    with pytest.raises(KeyUriError, match="only local files"):
        parse_key_uri("file://fileserver/k.pem")
    with pytest.raises(KeyUriError, match="must start with 'file:' or 'pkcs11:'"):
        parse_key_uri("/etc/ca.key")


def test_pkcs11_uri_attributes_are_decoded() -> None:
    uri = parse_key_uri(
        "pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;serial=1cd3;model=SoftHSM%20v2;slot-id=7;"
        "object=issuing;id=%01%ff;type=private?pin-source=file:/run/pin&module-path=/usr/lib/x.so"
    )
    assert isinstance(uri, Pkcs11Uri)
    assert (uri.token, uri.manufacturer, uri.serial, uri.model, uri.slot_id) == (
        "My Token", "SoftHSM project", "1cd3", "SoftHSM v2", 7)
    assert (uri.object, uri.id, uri.pin_source, uri.module_path) == ("issuing", b"\x01\xff", "file:/run/pin",
                                                                     "/usr/lib/x.so")
    assert uri.describe() == "object 'issuing' on token 'My Token'"


def test_a_pin_in_the_uri_is_refused_and_never_repeated() -> None:
    with pytest.raises(KeyUriError, match="pin-value") as caught:
        parse_key_uri("pkcs11:token=t;object=k?pin-value=SECRET-1234")
    assert "SECRET-1234" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:token=t", "must name its key"),
        ("pkcs11:token=t;object=k;type=cert", "type=private"),
        ("pkcs11:token=t;object=k;object=j", "appears twice"),
        ("pkcs11:token=t;object=k;slot-description=x", "not supported"),
        ("pkcs11:token=t;object=k?module-name=softhsm2", "not supported"),
        ("pkcs11:token=t;object=k;x-vendor=1", "not supported"),
        ("pkcs11:token=t;object", "has no value"),
        ("pkcs11:token=t;object=k;slot-id=one", "slot-id"),
    ],
)
def test_malformed_or_widening_uris_are_refused(text: str, message: str) -> None:
    with pytest.raises(KeyUriError, match=message):
        parse_key_uri(text)


class SoftwareDigestSigner:
    """A DigestSigner over a software key (this wrapper's own protocol; the real tokens are in tests/test_hsm.py)."""

    description = "software key"

    def __init__(self, key: ec.EllipticCurvePrivateKey, tamper: bool = False, truncate: bool = False) -> None:
        self.key, self.tamper, self.truncate, self.calls = key, tamper, truncate, 0

    def sign_digest(self, digest: bytes) -> bytes:
        self.calls += 1
        algorithm = hashes.SHA384() if len(digest) == 48 else hashes.SHA256()
        r, s = utils.decode_dss_signature(self.key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm))))
        size = (self.key.curve.key_size + 7) // 8
        raw = r.to_bytes(size, "big") + (s + 1 if self.tamper else s).to_bytes(size, "big")
        return raw[:-1] if self.truncate else raw


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_token_key_signs_certificates_crls_and_ocsp_responses(curve: ec.EllipticCurve) -> None:
    secret = ec.generate_private_key(curve)
    signer = SoftwareDigestSigner(secret)
    key = TokenKey(signer, secret.public_key())
    algorithm = hashes.SHA384() if curve.key_size >= 384 else hashes.SHA256()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("ca")).issuer_name(_name("ca")).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1)).sign(key, algorithm)
    )
    assert cert.verify_directly_issued_by(cert) is None
    crl = (x509.CertificateRevocationListBuilder().issuer_name(_name("ca")).last_update(now)
           .next_update(now + timedelta(days=1)).sign(key, algorithm))
    assert crl.is_signature_valid(secret.public_key())
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(cert=cert, issuer=cert, algorithm=hashes.SHA256(), cert_status=ocsp.OCSPCertStatus.GOOD,
                      this_update=now, next_update=now, revocation_time=None, revocation_reason=None)
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert).sign(key, algorithm)
    )
    secret.public_key().verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
    assert signer.calls == 3
    assert keys_match(key, cert.public_key()) and not keys_match(key, ec.generate_private_key(curve).public_key())


def test_a_signature_that_does_not_verify_is_never_returned() -> None:
    secret = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenError, match="does not verify"):
        TokenKey(SoftwareDigestSigner(secret, tamper=True), secret.public_key()).sign(b"x", ec.ECDSA(hashes.SHA256()))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()  # a token answering with another key's signature
    with pytest.raises(TokenError, match="does not verify"):
        TokenKey(SoftwareDigestSigner(secret), other).sign(b"x", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(TokenError, match="63-byte signature"):
        TokenKey(SoftwareDigestSigner(secret, truncate=True), secret.public_key()).sign(b"x", ec.ECDSA(hashes.SHA256()))


def test_the_private_half_cannot_be_exported_or_used_for_anything_but_signing() -> None:
    secret = ec.generate_private_key(ec.SECP256R1())
    key = TokenKey(SoftwareDigestSigner(secret), secret.public_key())
    with pytest.raises(PkiError, match="cannot be exported"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    with pytest.raises(PkiError, match="stays on the token"):
        key.private_numbers()
    with pytest.raises(PkiError, match="no key agreement"):
        key.exchange(ec.ECDH(), secret.public_key())
    prehashed = hashes.Hash(hashes.SHA256())
    prehashed.update(b"data")
    signature = key.sign(prehashed.finalize(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    secret.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))
