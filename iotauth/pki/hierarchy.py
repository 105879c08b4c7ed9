"""Creating a CA hierarchy: root, issuing CA, broker server certificate, OCSP responder; and the root's CRL.

Kept apart from :mod:`iotauth.pki.ca` (which *uses* a CA) because it is the
only code that ever holds the root key: at ``iotauth init``, and in the
ceremonies that sign a new issuing CA or the root's CRL (the ARL). It returns
values; :mod:`iotauth.castore` writes them into a home. The keys may be given
(token keys from :mod:`iotauth.pki.signer`, created above pki) or made here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.certs import now_utc
from iotauth.errors import PkiError
from iotauth.pki.ca import CLOCK_SKEW, CertificateAuthority, hash_for, key_usage
from iotauth.pki.keys import PrivateKey, generate_private_key
from iotauth.pki.ocsp import issue_responder

ROOT_VALIDITY = timedelta(days=20 * 365)
ISSUING_VALIDITY = timedelta(days=10 * 365)
SERVER_VALIDITY = timedelta(days=2 * 365)
_HOSTNAME = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", re.ASCII
)


def _ca_name(label: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"iotauth {label} ({trust_domain})"[:64]),
        ]
    )


@dataclass(frozen=True)
class Hierarchy:
    """A new CA hierarchy, as values: everything ``iotauth init`` stores in a home.

    Attributes:
        ca: the issuing CA (with its key) and the root certificate.
        root_key: the root's private key, needed only to sign this hierarchy.
        server_key, server_cert: the broker's TLS identity.
        ocsp_key, ocsp_cert: the delegated OCSP responder.
    """

    ca: CertificateAuthority
    root_key: PrivateKey
    server_key: PrivateKey
    server_cert: x509.Certificate
    ocsp_key: PrivateKey
    ocsp_cert: x509.Certificate


def create_hierarchy(
    trust_domain: str,
    key_type: str,
    server_names: Sequence[str],
    now: datetime | None = None,
    *,
    root_key: PrivateKey | None = None,
    issuing_key: PrivateKey | None = None,
) -> Hierarchy:
    """Create the root, the issuing CA, the broker's server certificate and the OCSP responder.

    ``root_key`` / ``issuing_key``: keys made elsewhere (on a token); by default new ``key_type`` keys.
    """
    if key_type not in ("p256", "p384"):
        raise PkiError(f"CA key type must be p256 or p384, not {key_type!r}")
    issued_at = now or now_utc()
    root_key = root_key or generate_private_key(key_type)
    root_name = _ca_name("Root CA", trust_domain)
    root = _ca_certificate(root_name, root_key.public_key(), root_name, root_key, None, issued_at, ROOT_VALIDITY)
    issuing_key = issuing_key or generate_private_key(key_type)
    issuing = sign_issuing_ca(root, root_key, issuing_key.public_key(), trust_domain, 1, issued_at)
    ca = CertificateAuthority(root, issuing, issuing_key, trust_domain)
    server_key, server_cert = issue_server_certificate(ca, server_names, issued_at)
    ocsp_key, ocsp_cert = issue_responder(ca, issued_at)
    return Hierarchy(ca, root_key, server_key, server_cert, ocsp_key, ocsp_cert)


def issuing_ca_name(trust_domain: str, generation: int) -> x509.Name:
    """The subject of the ``generation``-th issuing CA. Every generation has its own name, so relying parties
    (OpenSSL looks CRLs and issuers up by name) never confuse an old issuing CA with its successor."""
    label = "Issuing CA" if generation <= 1 else f"Issuing CA {generation}"
    return _ca_name(label, trust_domain)


def sign_issuing_ca(
    root: x509.Certificate,
    root_key: PrivateKey,
    public_key: CertificateIssuerPublicKeyTypes,
    trust_domain: str,
    generation: int,
    now: datetime | None = None,
) -> x509.Certificate:
    """An issuing CA certificate for ``public_key``, signed by the root (at ``init``, and at each rollover)."""
    issued_at = now or now_utc()
    not_after = min(issued_at + ISSUING_VALIDITY, root.not_valid_after_utc)
    return _ca_certificate(
        issuing_ca_name(trust_domain, generation), public_key, root.subject, root_key, root, issued_at,
        not_after - issued_at,
    )


def sign_root_crl(
    root: x509.Certificate,
    root_key: PrivateKey,
    revoked: Sequence[x509.RevokedCertificate],
    number: int,
    next_update: timedelta,
    now: datetime | None = None,
) -> x509.CertificateRevocationList:
    """The root's CRL (an ARL): the issuing CAs it has revoked."""
    this_update = now or now_utc()
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=root.subject,
        last_update=this_update,
        next_update=this_update + next_update,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid, False,
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            ),
        ],
        revoked_certificates=list(revoked),
    )
    return builder.sign(root_key, hash_for(root_key))


def _ca_certificate(
    subject: x509.Name,
    public_key: CertificateIssuerPublicKeyTypes,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    issuer_cert: x509.Certificate | None,
    now: datetime,
    validity: timedelta,
) -> x509.Certificate:
    path_length = None if issuer_cert is None else 0
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(signature=True, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hash_for(issuer_key))


def issue_server_certificate(
    ca: CertificateAuthority, names: Sequence[str], now: datetime | None = None
) -> tuple[PrivateKey, x509.Certificate]:
    """A TLS server certificate for the broker, valid for the given host names and IPs."""
    if not names:
        raise PkiError("the broker server certificate needs at least one --server-name")
    issued_at = now or now_utc()
    key = generate_private_key("p256")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if _HOSTNAME.fullmatch(name) is None:
                raise PkiError(f"--server-name {name!r} is neither an IP address nor a DNS host name") from None
            sans.append(x509.DNSName(name.lower()))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.issuing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issued_at - CLOCK_SKEW)
        .not_valid_after(min(issued_at + SERVER_VALIDITY, ca.issuing_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(ca.authority_key_identifier(), critical=False)
        .sign(ca.issuing_key, hash_for(ca.issuing_key))
    )
    return key, cert
