"""The Authority: one pipeline above the CA and the registry.

The CLI, the provisioning station and the HTTP service all issue through
here, in the same fixed order: validate identity and profile, check the key
and proof of possession (CA), refuse duplicates (registry, inside the write
transaction), sign, and record durably before anything is returned.

Operators change a device's standing through here too (revoke, suspend,
resume): the registry change first, because it is what every broker enforces
(each one follows the registry's change feed and drops the device's sessions,
and ``iotauth serve`` pushes the kick to EMQX from the same feed, so a change
made anywhere reaches every broker exactly once); then, when asked to, a fresh
CRL for relying parties that read files. The CRL needs the CA key, which an
operator revoking a device may not have at hand, so a CRL that cannot be
signed is reported, never a reason to fail the revocation.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from iotauth import castore
from iotauth.certs import now_utc, pem, public_key_sha256, serial_hex
from iotauth.config import Home, Profile, Settings, load_settings
from iotauth.errors import Conflict, IotAuthError, NotFound, PkiError
from iotauth.identity import validate_hardware_id
from iotauth.pki.ca import CertificateAuthority, revoked_entry
from iotauth.pki.csr import DeviceCsr
from iotauth.registry import (
    CertificateRecord,
    CertificateStatus,
    Device,
    Registry,
    RevocationReason,
    RevokedSerial,
)
from iotauth.registry.renewal import RenewalIssued, RenewalRequest


def operator_actor() -> str:
    """The operator acting, for the audit log: ``$IOTAUTH_OPERATOR`` or the login user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    return os.environ.get("IOTAUTH_OPERATOR") or user


@dataclass(frozen=True)
class Issued:
    """A certificate that is durably recorded and may now be handed out."""

    certificate: x509.Certificate
    record: CertificateRecord
    chain: tuple[x509.Certificate, ...]
    reused: bool = False
    """The certificate was issued earlier for the same device and key (an idempotent retry)."""

    @property
    def pem(self) -> bytes:
        return pem(self.certificate)


@dataclass(frozen=True)
class PublishedCrl:
    """The current issuing CA's CRL; ``also``: PEM CRLs of the previous issuing CAs and the root (after a rollover).

    ``pem`` is the bundle relying parties that read files load (every CA in a
    device's chain needs a CRL there); ``crl`` alone is the DER answer.
    """

    crl: x509.CertificateRevocationList
    number: int
    entries: int
    also: tuple[bytes, ...] = field(default=())

    @property
    def pem(self) -> bytes:
        return self.crl.public_bytes(serialization.Encoding.PEM) + b"".join(self.also)


@dataclass(frozen=True)
class CrlRefresh:
    """The home's CRL after a status change: published to ``path``, or why not (``error``)."""

    path: Path
    published: PublishedCrl | None = None
    error: IotAuthError | None = None


@dataclass(frozen=True)
class Revocation:
    """A device revoked for good: the certificates this call revoked (none if it already was)."""

    device_id: str
    reason: RevocationReason
    certificates: tuple[CertificateRecord, ...]
    crl: CrlRefresh | None


@dataclass(frozen=True)
class StatusChange:
    """A device suspended or resumed, and what became of the home's CRL."""

    device: Device
    crl: CrlRefresh | None


class Authority:
    """Issue, activate, revoke and publish revocation for device identities.

    Args:
        ca: the issuing CA; None when it cannot sign (see ``signing_unavailable``).
        registry: where every certificate and status change is recorded.
        settings: profiles and CRL lifetime.
        signing_unavailable: why there is no CA (locked or unreadable key); status
            changes still work, signing raises this error.
        previous: issuing CAs replaced by a rollover and still trusted; each
            signs a CRL for the certificates it issued.
        root_crl: the root's CRL (PEM), published beside the others.
    """

    def __init__(
        self,
        ca: CertificateAuthority | None,
        registry: Registry,
        settings: Settings,
        *,
        signing_unavailable: PkiError | None = None,
        previous: tuple[CertificateAuthority, ...] = (),
        root_crl: bytes | None = None,
    ) -> None:
        if ca is None and signing_unavailable is None:
            raise PkiError("an Authority without a CA needs the reason it has none")
        self._ca = ca
        self.previous = previous
        self.root_crl = root_crl
        self.signing_unavailable = signing_unavailable
        self.registry = registry
        self.settings = settings
        # CRL entry objects from the last build: a long-running service rebuilds the CRL after every
        # revocation, and constructing 100k entries costs far more than signing them.
        self._crl_entries: dict[RevokedSerial, x509.RevokedCertificate] = {}

    @property
    def ca(self) -> CertificateAuthority:
        """The issuing CA; raises the reason signing is unavailable if there is none."""
        if self._ca is None:
            assert self.signing_unavailable is not None
            raise self.signing_unavailable
        return self._ca

    # -- issuance --------------------------------------------------------------------------

    async def issue(
        self,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        profile: str = "default",
        *,
        hardware_id: str | None = None,
        activate: bool = True,
        actor: str,
        now: datetime | None = None,
        idempotent: bool = False,
        exclusive: bool = False,
    ) -> Issued:
        """Issue from a CSR (proof of possession); identity comes only from the arguments.

        Args:
            idempotent: a retry of the same request (same device, same key) returns the
                certificate already issued for it instead of a second one (``iotauth issue``:
                an operator retrying after an error must not put two certificates in the field).
                Decided inside the registry's write transaction, so concurrent retries agree.
            exclusive: one board per hardware id (see :meth:`Registry.record_issuance`).
        """
        device_id, chosen = self._check_identity(device_id, profile, hardware_id)
        cert = self.ca.issue(csr, device_id, chosen, hardware_id=hardware_id, now=now)
        return await self._record(cert, device_id, profile, hardware_id, activate, actor, reuse=idempotent,
                                  exclusive=exclusive)

    async def issue_for_key(
        self,
        public_key: CertificatePublicKeyTypes,
        device_id: str,
        profile: str = "default",
        *,
        hardware_id: str | None = None,
        activate: bool = False,
        actor: str,
        exclusive: bool = False,
    ) -> Issued:
        """Issue for a host-generated key (possession is proven later by the device's PROVE)."""
        device_id, chosen = self._check_identity(device_id, profile, hardware_id)
        cert = self.ca.issue_for_key(public_key, device_id, chosen, hardware_id=hardware_id)
        return await self._record(cert, device_id, profile, hardware_id, activate, actor, {"key_source": "host"},
                                  exclusive=exclusive)

    async def renew(
        self,
        csr: DeviceCsr,
        device: Device,
        current: CertificateRecord,
        *,
        request_id: str,
        window_opens: str | None,
        actor: str,
    ) -> tuple[RenewalIssued, tuple[x509.Certificate, ...]]:
        """Issue a renewal of ``current`` for the key in ``csr`` and record it *pending* (``renewal_of``).

        Signed first, then checked and recorded in one registry transaction (see
        :mod:`iotauth.registry.renewal`), which may instead answer with the pending
        renewal already issued for this device and key (a retry) or refuse. The
        certificate is returned only once its record is durable.

        ``csr`` comes from :func:`~iotauth.pki.csr.load_device_csr`, which verified
        its self-signature (proof of possession of the new key): a renewal is
        on the renewer's busiest path, so that check is made there once, not twice.

        Returns:
            the recorded renewal, and its chain: the certificate, then the CA that issued it.
        """
        profile = self.settings.profile(device.profile)
        cert = self.ca.issue_for_key(csr.csr.public_key(), device.device_id, profile)
        rotation = self.settings.rotation
        result = await self.registry.record_renewal(RenewalRequest(
            cert=cert, device_id=device.device_id, current_serial=current.serial, request_id=request_id,
            window_opens=window_opens, max_renewals=rotation.max_renewals_per_hour, rate_window=timedelta(hours=1),
            pending_ttl=self.settings.pending_ttl, actor=actor,
        ))
        if result.record.serial == serial_hex(cert):
            return result, (cert, self.ca.issuing_cert)  # just signed by this CA
        leaf = x509.load_pem_x509_certificate(result.record.pem.encode())  # an earlier one (a retry)
        return result, (leaf, self._issuer_of(leaf))

    def _issuer_of(self, cert: x509.Certificate) -> x509.Certificate:
        for ca in (self.ca, *self.previous):
            if ca.issuing_cert.subject == cert.issuer:
                return ca.issuing_cert
        return self.ca.issuing_cert

    async def check_public_key_free(self, public_key: CertificatePublicKeyTypes, device_id: str) -> None:
        """Refuse early (before signing) a key that already belongs to another device."""
        for record in await self.registry.certificates_with_key(public_key_sha256(public_key)):
            if record.device_id != device_id:
                raise Conflict(f"duplicate public key: it already belongs to device {record.device_id!r}")

    def _check_identity(self, device_id: str, profile: str, hardware_id: str | None) -> tuple[str, Profile]:
        self.settings.check_device_id(device_id)  # the home's alphabet: narrower when RabbitMQ is enabled
        if hardware_id is not None:
            validate_hardware_id(hardware_id)
        return device_id, self.settings.profile(profile)

    async def _record(
        self,
        cert: x509.Certificate,
        device_id: str,
        profile: str,
        hardware_id: str | None,
        activate: bool,
        actor: str,
        details: dict[str, str] | None = None,
        *,
        reuse: bool = False,
        exclusive: bool = False,
    ) -> Issued:
        record = await self.registry.record_issuance(
            cert,
            device_id=device_id,
            profile=profile,
            hardware_id=hardware_id,
            activate=activate,
            actor=actor,
            details=details,
            reuse=reuse,
            exclusive=exclusive,
        )
        if record.serial != serial_hex(cert):  # the one issued before; the new one is never handed out
            return Issued(x509.load_pem_x509_certificate(record.pem.encode()), record, self.ca.chain, reused=True)
        return Issued(cert, record, self.ca.chain)

    # -- status changes --------------------------------------------------------------------

    async def revoke_device(
        self, device_id: str, reason: RevocationReason, *, actor: str, publish_to: Home | None = None
    ) -> Revocation:
        """Revoke a device and every certificate it has; then refresh the CRL in ``publish_to``.

        Idempotent: revoking a revoked device changes nothing and revokes no certificate.
        """
        revoked = await self.registry.revoke(device_id, reason, actor=actor)
        return Revocation(device_id, reason, tuple(revoked), await self._refresh_crl(publish_to))

    async def suspend_device(
        self, device_id: str, *, actor: str, reason: str | None = None, publish_to: Home | None = None
    ) -> StatusChange:
        """Bar a device until it is resumed; its certificates appear on hold in the CRL."""
        device = await self.registry.suspend(device_id, actor=actor, reason=reason)
        return StatusChange(device, await self._refresh_crl(publish_to))

    async def resume_device(self, device_id: str, *, actor: str, publish_to: Home | None = None) -> StatusChange:
        """Lift a suspension."""
        device = await self.registry.resume(device_id, actor=actor)
        return StatusChange(device, await self._refresh_crl(publish_to))

    async def _refresh_crl(self, home: Home | None) -> CrlRefresh | None:
        if home is None:  # e.g. ``iotauth serve``: its CRL endpoint rebuilds from the registry on request
            return None
        try:
            return CrlRefresh(home.crl_pem, published=await self.publish_crl(home))
        except IotAuthError as exc:
            return CrlRefresh(home.crl_pem, error=exc)

    # -- CRLs ------------------------------------------------------------------------------

    async def build_crl(
        self, now: datetime | None = None, *, extra: Sequence[x509.RevokedCertificate] = (),
        hold: Collection[str] = (),
    ) -> PublishedCrl:
        """Sign a fresh CRL over the registry's complete revocation state (plus ``extra`` entries: canaries).

        ``hold``: serials (hex) to list as certificateHold as well, unless the
        registry lists them already (the Mosquitto follower holds a renewal
        until it has closed the sessions of the certificate it replaced).
        """
        ca = self.ca
        at = now or now_utc()
        entries = await self.registry.crl_entries(at)
        known = self._crl_entries
        self._crl_entries = {
            e: known.get(e) or revoked_entry(int(e.serial, 16), datetime.fromisoformat(e.revoked_at), e.reason)
            for e in entries
        }
        listed = {e.serial for e in entries}
        held = [revoked_entry(int(serial, 16), at, x509.ReasonFlags.certificate_hold)
                for serial in sorted(set(hold) - listed)]
        revoked = [*self._crl_entries.values(), *extra, *held]
        number = await self.registry.next_crl_number()
        crl = ca.sign_crl(revoked, number, self.settings.crl_next_update, at)
        # A previous issuing CA lists the same entries: serials are random 159-bit numbers, so an entry for another
        # CA's certificate can never match one of its own, and one list is cheaper than sorting by issuer.
        also = tuple(
            old.sign_crl(revoked, number, self.settings.crl_next_update, at).public_bytes(serialization.Encoding.PEM)
            for old in self.previous
        )
        return PublishedCrl(crl, number, len(revoked), also + ((self.root_crl,) if self.root_crl else ()))

    async def publish_crl(self, home: Home, now: datetime | None = None) -> PublishedCrl:
        """Build the CRL and atomically replace ``ca/crl.pem`` and ``ca/crl.der`` in ``home``."""
        published = await self.build_crl(now)
        castore.publish_crl(home, published.crl, also=published.also)
        return published


async def open_authority(home: Home, registry: Registry, *, signing_optional: bool = False) -> Authority:
    """Load settings and the CA from ``home`` (:func:`iotauth.castore.load_ca`) and attach ``registry``.

    Args:
        signing_optional: if the CA key cannot be used (encrypted and no or a
            wrong ``$IOTAUTH_CA_PASSPHRASE``; a token absent, or no or a wrong
            PIN; unreadable), return an Authority that cannot sign instead of
            raising. Status changes work without it; CRL consumers then fall
            back to the CRL last published. This is the one place that decides
            what a locked CA means.
    """
    settings = load_settings(home)
    try:
        ca = castore.load_ca(home, settings)
        previous = castore.load_previous_cas(home, settings)
        root_crl = castore.read_root_crl(home)
    except PkiError as exc:
        if not signing_optional:
            raise
        return Authority(None, registry, settings, signing_unavailable=exc)
    arl = root_crl.public_bytes(serialization.Encoding.PEM) if root_crl is not None else None
    return Authority(ca, registry, settings, previous=previous, root_crl=arl)


async def certificate_pem(registry: Registry, device_id: str, serial: str | None, chain: Path | None) -> str:
    """A device's certificate as PEM, as the registry holds it: to fetch again what was issued.

    Args:
        serial: this certificate of the device; by default its newest unrevoked one.
        chain: append this CA certificate file (the issuing CA) to the PEM.
    """
    certificates = await registry.certificates_of(device_id)
    if serial is not None:
        chosen = [c for c in certificates if c.serial == serial.lower()]
        if not chosen:
            raise NotFound(f"device {device_id!r} has no certificate {serial}")
    else:
        chosen = [c for c in certificates if c.status is not CertificateStatus.REVOKED]
        if not chosen:
            raise NotFound(f"device {device_id!r} has no unrevoked certificate (use --serial for a revoked one)")
    text = chosen[-1].pem
    if chain is not None:
        text += castore.read_certificate(chain).public_bytes(serialization.Encoding.PEM).decode()
    return text
