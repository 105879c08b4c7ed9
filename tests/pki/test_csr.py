"""CSRs as real device stacks write them: mbedTLS 2.28's, made at test time by the real library.

mbedTLS 2.x puts a NULL parameter in the CSR's outer ECDSA signatureAlgorithm
(mbedTLS issue #2924). The station normalises exactly that and then verifies
the signature as usual; everything else stays refused, and the message says
what was wrong.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotauth.errors import CsrRejected
from iotauth.pki.csr import load_device_csr

NULL_SHA256 = bytes.fromhex("300c06082a8648ce3d0403020500")


def mbedtls_csr(helper: Path, tmp_path: Path, kind: str) -> tuple[bytes, bytes]:
    subprocess.run([str(helper), kind, "HW-MBED", str(tmp_path)], check=True, timeout=60)
    return (tmp_path / "key.der").read_bytes(), (tmp_path / "csr.der").read_bytes()


@pytest.mark.parametrize(("kind", "curve", "oid"), [("p256", "secp256r1", "SHA256"), ("p384", "secp384r1", "SHA384")])
def test_mbedtls_csrs_are_normalised_then_verified(mbedtls_keygen: Path, tmp_path: Path, kind: str, curve: str,
                                                   oid: str) -> None:
    key_der, der = mbedtls_csr(mbedtls_keygen, tmp_path, kind)
    with pytest.raises(ValueError, match="signature_alg"):  # what the station tripped on before
        x509.load_der_x509_csr(der)
    parsed = load_device_csr(der)
    assert parsed.normalised == f"outer signatureAlgorithm ecdsa-with-{oid} carried a NULL parameter " \
                                "(RFC 5758 section 3.2: absent)"
    assert parsed.csr.is_signature_valid
    assert parsed.csr.public_key().curve.name == curve  # type: ignore[union-attr]
    private = serialization.load_der_private_key(key_der, password=None)
    assert parsed.csr.public_key() == private.public_key()
    assert parsed.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "HW-MBED"


def test_a_tampered_mbedtls_csr_is_still_refused(mbedtls_keygen: Path, tmp_path: Path) -> None:
    _, der = mbedtls_csr(mbedtls_keygen, tmp_path, "p256")
    # Change the subject (HW-MBED -> HW-MBEE): covered by the signature, so normalising must not hide it.
    tampered = der.replace(b"HW-MBED", b"HW-MBEE")
    with pytest.raises(CsrRejected, match="signature does not verify"):
        load_device_csr(tampered)


def _openssl_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HW-1")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def test_a_conforming_csr_passes_unchanged() -> None:
    der = _openssl_csr()
    parsed = load_device_csr(der)
    assert parsed.normalised is None
    assert parsed.csr.public_bytes(serialization.Encoding.DER) == der


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda der: der[:40], r"not a valid DER PKCS#10 request"),
        (lambda der: b"\x30\x03\x02\x01\x00", r"not a valid DER PKCS#10 request"),
        # A parameter other than NULL is not what mbedTLS writes: not rewritten, refused as malformed.
        (lambda der: _with_algorithm(der, bytes.fromhex("300e06082a8648ce3d04030204020000")),
         r"not a valid DER PKCS#10 request \(.*signature_alg"),
        # The NULL-parameter form of an algorithm that is not ECDSA (sha256WithRSAEncryption) is left alone.
        (lambda der: _with_algorithm(der, bytes.fromhex("300d06092a864886f70d01010b0500")),
         r"signature"),
    ],
    ids=["truncated", "not a CSR", "non-NULL parameter", "RSA identifier over an EC key"],
)
def test_everything_else_is_refused_with_what_was_wrong(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CsrRejected, match=message):
        load_device_csr(mutate(_openssl_csr()))


def test_a_null_parameter_with_a_broken_signature_is_refused(mbedtls_keygen: Path, tmp_path: Path) -> None:
    _, der = mbedtls_csr(mbedtls_keygen, tmp_path, "p256")
    broken = der[:-1] + bytes([der[-1] ^ 1])
    with pytest.raises(CsrRejected, match="signature does not verify"):
        load_device_csr(broken)
    assert NULL_SHA256 in der


def _with_algorithm(der: bytes, algorithm: bytes) -> bytes:
    """Replace the outer AlgorithmIdentifier of a conforming (OpenSSL-made) P-256 CSR."""
    plain = bytes.fromhex("300a06082a8648ce3d040302")
    head = der.rindex(plain)
    body = der[4:head] if der[1] == 0x82 else der[3:head] if der[1] == 0x81 else der[2:head]
    body += algorithm + der[head + len(plain):]
    return _sequence(body)


def _sequence(body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([0x30, len(body)]) + body
    if len(body) < 0x100:
        return bytes([0x30, 0x81, len(body)]) + body
    return bytes([0x30, 0x82]) + len(body).to_bytes(2, "big") + body
