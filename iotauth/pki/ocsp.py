"""OCSP (RFC 6960) for device certificates, answered from the registry.

Responses are signed by a delegated responder certificate (EKU OCSPSigning,
issued by the issuing CA at ``iotauth init``), so the HTTP service never needs
the issuing CA key online. Statuses match the CRL exactly: revoked with its
reason; pending (never delivered) and suspended as certificateHold; unknown
serials as unknown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.certs import now_utc
from iotauth.pki.ca import CLOCK_SKEW, CertificateAuthority
from iotauth.pki.keys import PrivateKey, generate_private_key

RESPONDER_VALIDITY = timedelta(days=2 * 365)
RESPONSE_VALIDITY = timedelta(minutes=10)


@dataclass(frozen=True)
class CertificateStatusAnswer:
    """What the registry says about one serial."""

    status: ocsp.OCSPCertStatus
    revoked_at: datetime | None = None
    reason: x509.ReasonFlags | None = None


Lookup = Callable[[str], Awaitable[CertificateStatusAnswer]]


def issue_responder(ca: CertificateAuthority, now: datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    """A delegated OCSP signing certificate for the issuing CA."""
    issued_at = now or now_utc()
    key = generate_private_key("p256")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"iotauth OCSP ({ca.trust_domain})"[:64])]))
        .issuer_name(ca.issuing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at - CLOCK_SKEW)
        .not_valid_after(min(issued_at + RESPONDER_VALIDITY, ca.issuing_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(ca.authority_key_identifier(), critical=False)
        .sign(ca.issuing_key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class ResponderIdentity:
    """One issuing CA and the delegated responder that answers for its certificates."""

    issuing_cert: x509.Certificate
    responder_cert: x509.Certificate
    responder_key: PrivateKey


class OcspResponder:
    """Turn DER OCSP requests into signed DER responses.

    It answers for several issuing CAs at once: after a rollover, devices
    holding certificates from the previous issuing CA are answered by that
    CA's responder until it expires. Requests name their CA by the hashes of
    its name and key, so each is routed to its own responder; any other CA
    is ``unauthorized``.
    """

    def __init__(self, identities: Sequence[ResponderIdentity]) -> None:
        self._by_issuer: dict[tuple[str, bytes, bytes], ResponderIdentity] = {
            (algorithm.name, *_issuer_hashes(identity.issuing_cert, algorithm)): identity
            for identity in identities
            # RFC 6960 clients (openssl included) identify certificates by SHA-1 hashes by default.
            for algorithm in (hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512())  # noqa: S303
        }

    async def respond(self, request_der: bytes, lookup: Lookup, now: datetime | None = None) -> bytes:
        try:
            request = ocsp.load_der_ocsp_request(request_der)
        except (ValueError, x509.UnsupportedGeneralNameType, NotImplementedError):
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        # A CertID names the issuer by the hash of its name *and* of its key (RFC 6960 4.1.1): both must be
        # those of one of our issuing CAs, or a serial of another issuer (same key, other name) would get our answer.
        identity = self._by_issuer.get((request.hash_algorithm.name, request.issuer_name_hash, request.issuer_key_hash))
        if identity is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        answer = await lookup(format(request.serial_number, "x"))
        at = now or now_utc()
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=request.hash_algorithm,
            cert_status=answer.status,
            this_update=at,
            next_update=at + RESPONSE_VALIDITY,
            revocation_time=answer.revoked_at,
            revocation_reason=answer.reason if answer.status is ocsp.OCSPCertStatus.REVOKED else None,
        )
        responder = identity.responder_cert
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder).certificates([responder])
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                builder = builder.add_extension(extension.value, critical=False)
        response = builder.sign(identity.responder_key, hashes.SHA256())
        return response.public_bytes(serialization.Encoding.DER)


def _issuer_hashes(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """The (issuerNameHash, issuerKeyHash) a client computes for certificates issued by ``issuer``.

    The name hash covers the DER of the issuer's subject (the leaf's issuer
    name); the key hash is left to cryptography (it hashes the key's BIT STRING).
    """
    digest = hashes.Hash(algorithm)
    digest.update(issuer.subject.public_bytes())
    probe = ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, algorithm).build()
    return digest.finalize(), probe.issuer_key_hash


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
