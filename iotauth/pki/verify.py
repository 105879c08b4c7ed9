"""Client-certificate checks: chain, validity, usage and identity, in one place.

Path validation is delegated to ``cryptography.x509.verification``; this module
adds what a generic client verifier does not insist on (clientAuth EKU must be
*present*, not merely absent-or-compatible) and maps the certificate to one
device identity: the SPIFFE URI SAN, cross-checked with the CN.

A successful chain check is a pure function of the certificate bytes and the
trust store, so results are cached by fingerprint; validity dates are still
compared against the clock on every call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from iotauth.certs import fingerprint, now_utc, serial_hex
from iotauth.errors import InvalidIdentity, Rejection
from iotauth.identity import device_id_from_spiffe


@dataclass(frozen=True)
class CertificateIdentity:
    """Who a verified client certificate names, and for how long."""

    device_id: str
    fingerprint: str
    serial: str
    not_before: datetime
    not_after: datetime


def _check_window(not_before: datetime, not_after: datetime, at: datetime) -> None:
    """Validity is checked on every call, cached or not: only the chain verdict is cached."""
    if at < not_before:
        raise Rejection("not-yet-valid", f"certificate is not valid before {not_before:%Y-%m-%dT%H:%M:%SZ}")
    if at > not_after:
        raise Rejection("expired", f"certificate expired at {not_after:%Y-%m-%dT%H:%M:%SZ}")


def _require_client_auth(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ValueError("extended key usage does not include clientAuth")


_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().require_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _require_client_auth
)


class ClientCertificateVerifier:
    """Verify device certificates against the project's CA.

    Args:
        trust_anchors: the root certificate(s).
        intermediates: the issuing CA(s), supplied because devices often send only their leaf.
        trust_domain: the SPIFFE trust domain whose device URIs are accepted.
        cache_size: how many verified chains to remember.
    """

    def __init__(
        self,
        trust_anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate],
        trust_domain: str,
        cache_size: int = 100_000,
    ) -> None:
        self._store = Store(list(trust_anchors))
        self._intermediates = list(intermediates)
        self._trust_domain = trust_domain
        self._cache: OrderedDict[str, CertificateIdentity] = OrderedDict()
        self._cache_size = cache_size

    def verify_der(self, der: bytes, now: datetime | None = None) -> CertificateIdentity:
        """Like :meth:`verify` for the DER bytes a TLS stack hands over; a known certificate is not even parsed."""
        at = now or now_utc()
        fp = hashlib.sha256(der).hexdigest()
        cached = self._cached(fp, at)
        if cached is not None:
            return cached
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise Rejection("malformed", "client certificate is not valid DER") from exc
        return self._verify_new(cert, fp, at)

    def verify(self, cert: x509.Certificate, now: datetime | None = None) -> CertificateIdentity:
        """Return the certificate's identity, or raise :class:`Rejection` saying why not."""
        at = now or now_utc()
        fp = fingerprint(cert)
        return self._cached(fp, at) or self._verify_new(cert, fp, at)

    def _cached(self, fp: str, at: datetime) -> CertificateIdentity | None:
        """A verified chain is remembered by fingerprint; only its validity window depends on the time."""
        cached = self._cache.get(fp)
        if cached is not None:
            _check_window(cached.not_before, cached.not_after, at)
            self._cache.move_to_end(fp)
        return cached

    def _verify_new(self, cert: x509.Certificate, fp: str, at: datetime) -> CertificateIdentity:
        _check_window(cert.not_valid_before_utc, cert.not_valid_after_utc, at)
        identity = self._verify_uncached(cert, fp, at)
        self._cache[fp] = identity
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return identity

    def _verify_uncached(self, cert: x509.Certificate, fp: str, at: datetime) -> CertificateIdentity:
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(at)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(cert, self._intermediates)
        except VerificationError as exc:
            raise Rejection("chain", f"certificate does not verify against the iotauth CA: {exc}") from exc
        if len(verified.chain) < 2 or verified.chain[1] not in self._intermediates:
            # A leaf signed directly by the root verifies as a chain, but device certificates come only from the
            # issuing CA: the root key stays offline, so its signature on a leaf is never legitimate.
            raise Rejection("chain", "device certificates must be issued by the issuing CA, not by the root")
        uris = [s.value for s in verified.subjects or () if isinstance(s, x509.UniformResourceIdentifier)]
        if len(uris) != 1:
            raise Rejection("identity", f"certificate must carry exactly one URI SAN, found {len(uris)}")
        try:
            device_id = device_id_from_spiffe(uris[0], self._trust_domain)
        except InvalidIdentity as exc:
            raise Rejection("identity", str(exc)) from exc
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(common_names) != 1 or common_names[0].value != device_id:
            raise Rejection("identity", f"certificate CN does not match its URI SAN device id {device_id!r}")
        return CertificateIdentity(
            device_id=device_id,
            fingerprint=fp,
            serial=serial_hex(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
