"""The certificate authority: a root, an issuing CA under it, and what they sign.

Identity in a device certificate comes only from the caller (the registry and
the station), never from the CSR: the CSR contributes its public key and,
through its signature, proof that the requester holds the private key. The
CSR's subject and extensions are read by nobody.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from iotauth.certs import now_utc
from iotauth.errors import CsrRejected
from iotauth.identity import spiffe_id, validate_device_id, validate_hardware_id
from iotauth.pki.keys import PrivateKey, check_key_allowed

# Devices with a loosely set clock must not reject a certificate issued "just now".
CLOCK_SKEW = timedelta(minutes=5)


def hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_usage(*, signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


class KeyPolicy(Protocol):
    """What issuance needs from a profile (``iotauth.config.Profile`` is one): key rules and lifetime."""

    @property
    def validity(self) -> timedelta: ...

    @property
    def key_types(self) -> Collection[str]: ...

    @property
    def rsa_min_bits(self) -> int: ...


@dataclass(frozen=True)
class CertificateAuthority:
    """The issuing CA and its chain, as values. Immutable; build it once and share it.

    It holds the issuing key as a key object and never reads a file: where the
    key comes from (a PEM file in the home, later an HSM) is decided above pki,
    in :mod:`iotauth.castore`.
    """

    root_cert: x509.Certificate
    issuing_cert: x509.Certificate
    issuing_key: PrivateKey
    trust_domain: str
    crl_url: str | None = None
    ocsp_url: str | None = None

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        """Issuing CA first, then the root: what a device stores as its CA chain."""
        return (self.issuing_cert, self.root_cert)

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        profile: KeyPolicy,
        *,
        hardware_id: str | None = None,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """Issue a device certificate for the key in ``csr``.

        The CSR signature must verify (proof of possession) and its key must be
        allowed by ``profile``. Its subject and extensions are ignored.
        """
        if not csr.is_signature_valid:
            raise CsrRejected("CSR signature does not verify: the requester did not prove possession of the key")
        return self.issue_for_key(csr.public_key(), device_id, profile, hardware_id=hardware_id, now=now)

    def issue_for_key(
        self,
        public_key: CertificatePublicKeyTypes,
        device_id: str,
        profile: KeyPolicy,
        *,
        hardware_id: str | None = None,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """Issue for a bare public key (host-generated keys, where there is no CSR to verify)."""
        check_key_allowed(public_key, profile.key_types, profile.rsa_min_bits)
        device_id = validate_device_id(device_id)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
        if hardware_id is not None:
            attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, validate_hardware_id(hardware_id)))
        issued_at = now or now_utc()
        not_after = min(issued_at + profile.validity, self.issuing_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.issuing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(issued_at - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(self.trust_domain, device_id))]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self.authority_key_identifier(), critical=False)
        )
        if self.crl_url:
            point = x509.DistributionPoint([x509.UniformResourceIdentifier(self.crl_url)], None, None, None)
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        if self.ocsp_url:
            access = x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(self.ocsp_url)
            )
            builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
        return builder.sign(self.issuing_key, hash_for(self.issuing_key))

    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        ski = self.issuing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def sign_crl(
        self,
        revoked: Sequence[x509.RevokedCertificate],
        number: int,
        next_update: timedelta,
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Sign a CRL over the complete ``revoked`` list in one pass.

        ``CertificateRevocationListBuilder.add_revoked_certificate`` copies its
        list on every call (O(n^2)); handing the full list to the constructor
        builds 100k entries in well under a second.
        """
        this_update = now or now_utc()
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=self.issuing_cert.subject,
            last_update=this_update,
            next_update=this_update + next_update,
            extensions=[
                x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
                x509.Extension(x509.AuthorityKeyIdentifier.oid, False, self.authority_key_identifier()),
            ],
            revoked_certificates=list(revoked),
        )
        return builder.sign(self.issuing_key, hash_for(self.issuing_key))


_REASON_EXTENSIONS: dict[x509.ReasonFlags, x509.Extension[x509.CRLReason]] = {
    reason: x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(reason))
    for reason in x509.ReasonFlags
    if reason is not x509.ReasonFlags.unspecified
}


def revoked_entry(serial: int, revoked_at: datetime, reason: x509.ReasonFlags | None) -> x509.RevokedCertificate:
    """One CRL entry; ``reason`` None (unspecified) omits the reasonCode as RFC 5280 recommends.

    The reason extensions are built once and shared: a 100k-entry CRL would
    otherwise spend most of its time constructing identical extension objects.
    """
    extension = _REASON_EXTENSIONS.get(reason) if reason is not None else None
    return x509.RevokedCertificateBuilder(
        serial_number=serial,
        revocation_date=revoked_at,
        extensions=[extension] if extension is not None else [],
    ).build()
