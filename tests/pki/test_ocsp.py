"""The OCSP responder answers only for its issuer: name hash *and* key hash, for every hash algorithm."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from iotauth.authority import Authority
from iotauth.castore import load_ocsp_responder
from iotauth.certs import now_utc, pem
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey, generate_private_key
from iotauth.pki.ocsp import CertificateStatusAnswer
from tests.fixtures.service import RunningService

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
ALGORITHMS = [hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()]  # noqa: S303


def twin_of(issuer: x509.Certificate) -> x509.Certificate:
    """A certificate anyone can make: the issuing CA's public key under another name (signed by a stranger)."""
    stranger = generate_private_key("p256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Twin Issuing CA")])
    now = now_utc()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(issuer.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(stranger, hashes.SHA256()))


async def good(serial: str) -> CertificateStatusAnswer:
    return CertificateStatusAnswer(ocsp.OCSPCertStatus.GOOD)


def name_hash(name: x509.Name, algorithm: hashes.HashAlgorithm) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(name.public_bytes())
    return digest.finalize()


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.name)
async def test_a_request_with_another_issuer_name_is_unauthorized(
    home: Home, authority: Authority, csr_factory: CsrFactory, algorithm: hashes.HashAlgorithm
) -> None:
    responder = load_ocsp_responder(home)
    issuing = authority.ca.issuing_cert
    leaf = (await authority.issue(csr_factory()[1], "ocsp-unit", actor="op")).certificate
    ours = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, algorithm).build()
    assert ours.issuer_name_hash == name_hash(issuing.subject, algorithm)
    twin_name = twin_of(issuing).subject

    async def status(name_digest: bytes, key_digest: bytes) -> ocsp.OCSPResponseStatus:
        request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            name_digest, key_digest, leaf.serial_number, algorithm).build()
        der = await responder.respond(request.public_bytes(serialization.Encoding.DER), good)
        return ocsp.load_der_ocsp_response(der).response_status

    assert await status(ours.issuer_name_hash, ours.issuer_key_hash) is ocsp.OCSPResponseStatus.SUCCESSFUL
    # the same key under another name (the reported gap), and our name with another key
    assert await status(name_hash(twin_name, algorithm), ours.issuer_key_hash) is ocsp.OCSPResponseStatus.UNAUTHORIZED
    other_key = bytes(len(ours.issuer_key_hash))
    assert await status(ours.issuer_name_hash, other_key) is ocsp.OCSPResponseStatus.UNAUTHORIZED


@pytest.mark.parametrize("digest", ["-sha1", "-sha256"])
async def test_openssl_with_a_twin_issuer_gets_no_answer(
    home: Home, authority: Authority, csr_factory: CsrFactory,
    service_factory: Callable[..., RunningService], tmp_path: Path, digest: str,
) -> None:
    issued = await authority.issue(csr_factory()[1], "ocsp-twin", actor="op")
    twin = tmp_path / "twin.pem"
    twin.write_bytes(pem(twin_of(authority.ca.issuing_cert)))
    service = service_factory(home)

    def ask(issuer: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "ocsp", digest, "-issuer", str(issuer), "-serial", f"0x{issued.record.serial}",
             "-url", f"{service.base_url}/ocsp", "-CAfile", str(home.chain_file)],
            capture_output=True, text=True, timeout=60, check=False)

    ours = ask(home.issuing_cert)
    assert ": good" in ours.stdout, ours.stdout + ours.stderr
    refused = ask(twin)
    assert "unauthorized" in (refused.stdout + refused.stderr).lower()
    assert ": good" not in refused.stdout
