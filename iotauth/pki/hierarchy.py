"""Creating a new CA hierarchy: root, issuing CA, broker server certificate, OCSP responder.

Kept apart from :mod:`iotauth.pki.ca` (which *uses* a CA) because it runs once,
at ``iotauth init``, and is the only code that ever holds the root key. It
returns values; :mod:`iotauth.castore` writes them into a home.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
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
) -> Hierarchy:
    """Create the root, the issuing CA, the broker's server certificate and the OCSP responder."""
    if key_type not in ("p256", "p384"):
        raise PkiError(f"CA key type must be p256 or p384, not {key_type!r}")
    issued_at = now or now_utc()
    root_key = generate_private_key(key_type)
    root_name = _ca_name("Root CA", trust_domain)
    root = _ca_certificate(root_name, root_key, root_name, root_key, None, issued_at, ROOT_VALIDITY)
    issuing_key = generate_private_key(key_type)
    issuing = _ca_certificate(
        _ca_name("Issuing CA", trust_domain), issuing_key, root_name, root_key, root, issued_at, ISSUING_VALIDITY
    )
    ca = CertificateAuthority(root, issuing, issuing_key, trust_domain)
    server_key, server_cert = issue_server_certificate(ca, server_names, issued_at)
    ocsp_key, ocsp_cert = issue_responder(ca, issued_at)
    return Hierarchy(ca, root_key, server_key, server_cert, ocsp_key, ocsp_cert)


def _ca_certificate(
    subject: x509.Name,
    key: PrivateKey,
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
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(signature=True, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
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
