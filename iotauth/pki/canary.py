"""Canary certificates: short-lived client certificates that exist only to be revoked.

A relying party that reads CRLs from a file (Mosquitto) gives no sign of
whether a new CRL was loaded: Mosquitto 2.0.11 silently turns revocation
checking *off* when the CRL it is told to reload is unreadable. So every CRL
the Mosquitto follower publishes also revokes a fresh canary certificate that
no earlier CRL listed; once a handshake with the canary is refused as
revoked, the new CRL is provably in force.

A canary is not a device identity and can never become one: its CN
(``iotauth:canary:...``) contains ``:``, outside the device-id alphabet, it
has no SPIFFE URI SAN, it lives minutes, its key exists only in the memory of
the process that made it, and every CRL that process writes revokes it until
it expires.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.errors import PkiError
from iotauth.pki.ca import CLOCK_SKEW, CertificateAuthority, hash_for, key_usage

CANARY_PREFIX = "iotauth:canary:"
MAX_CANARY_LIFETIME = timedelta(hours=1)


def issue_canary(
    ca: CertificateAuthority,
    public_key: CertificatePublicKeyTypes,
    name: str,
    *,
    lifetime: timedelta,
    now: datetime,
) -> x509.Certificate:
    """A client certificate for ``public_key`` named ``iotauth:canary:<name>``, valid for ``lifetime``.

    It carries the clientAuth usage (a relying party must get as far as the
    revocation check before refusing it) and nothing that names a device.
    """
    if not name or not name.isascii() or not name.replace("-", "").isalnum():
        raise PkiError(f"invalid canary name {name!r}")
    if not timedelta(0) < lifetime <= MAX_CANARY_LIFETIME:
        raise PkiError(f"a canary lives at most {MAX_CANARY_LIFETIME}, not {lifetime}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CANARY_PREFIX + name)]))
        .issuer_name(ca.issuing_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, ca.issuing_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(ca.authority_key_identifier(), critical=False)
    )
    return builder.sign(ca.issuing_key, hash_for(ca.issuing_key))
