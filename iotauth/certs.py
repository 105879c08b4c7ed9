"""How every layer names a certificate, a key and a moment.

The CA, the registry, the broker and the station must agree on these names:
a certificate is known by the SHA-256 of its DER encoding and by its serial in
lower-case hex, a key by the SHA-256 of its SubjectPublicKeyInfo, and times are
UTC text that sorts correctly. They live here, in a module that imports only
``cryptography`` and the standard library, so :mod:`iotauth.pki` and
:mod:`iotauth.registry` can both use them without depending on each other.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
"""When something happened (events, issuance, revocation): ISO 8601 UTC with microseconds, sortable as text."""

CERT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""A certificate's validity bounds: whole seconds, because that is all X.509 stores."""


def now_utc() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime) -> str:
    """``moment`` in :data:`TIMESTAMP_FORMAT`."""
    return moment.strftime(TIMESTAMP_FORMAT)


def cert_time(moment: datetime) -> str:
    """``moment`` in :data:`CERT_TIME_FORMAT` (a certificate's notBefore or notAfter)."""
    return moment.strftime(CERT_TIME_FORMAT)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def public_key_sha256(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo: the key's identity for duplicate checks."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()
