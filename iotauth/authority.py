"""The Authority: one issuance pipeline above the CA and the registry.

The CLI, the provisioning station and the HTTP service all issue through
here, in the same fixed order: validate identity and profile, check the key
and proof of possession (CA), refuse duplicates (registry, inside the write
transaction), sign, and record durably before anything is returned.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from iotauth.config import Home, Profile, Settings, load_settings
from iotauth.errors import Conflict
from iotauth.identity import validate_device_id, validate_hardware_id
from iotauth.pki.ca import CertificateAuthority, now_utc, pem, revoked_entry
from iotauth.pki.files import write_public
from iotauth.pki.keys import public_key_sha256
from iotauth.registry import CertificateRecord, Registry, RevokedSerial

PASSPHRASE_ENV = "IOTAUTH_CA_PASSPHRASE"  # noqa: S105 - the variable name, not a secret


def ca_passphrase() -> bytes | None:
    """The CA key passphrase from ``$IOTAUTH_CA_PASSPHRASE``, if set."""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def default_actor() -> str:
    """Who is acting, for the audit log: ``$IOTAUTH_OPERATOR`` or the login user."""
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

    @property
    def pem(self) -> bytes:
        return pem(self.certificate)


@dataclass(frozen=True)
class PublishedCrl:
    crl: x509.CertificateRevocationList
    number: int
    entries: int


class Authority:
    """Issue, activate and publish revocation for device identities."""

    def __init__(self, ca: CertificateAuthority, registry: Registry, settings: Settings) -> None:
        self.ca = ca
        self.registry = registry
        self.settings = settings
        # CRL entry objects from the last build: a long-running service rebuilds the CRL after every
        # revocation, and constructing 100k entries costs far more than signing them.
        self._crl_entries: dict[RevokedSerial, x509.RevokedCertificate] = {}

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
    ) -> Issued:
        """Issue from a CSR (proof of possession); identity comes only from the arguments."""
        device_id, chosen = self._check_identity(device_id, profile, hardware_id)
        cert = self.ca.issue(csr, device_id, chosen, hardware_id=hardware_id, now=now)
        return await self._record(cert, device_id, profile, hardware_id, activate, actor)

    async def issue_for_key(
        self,
        public_key: CertificatePublicKeyTypes,
        device_id: str,
        profile: str = "default",
        *,
        hardware_id: str | None = None,
        activate: bool = False,
        actor: str,
    ) -> Issued:
        """Issue for a host-generated key (possession is proven later by the device's PROVE)."""
        device_id, chosen = self._check_identity(device_id, profile, hardware_id)
        cert = self.ca.issue_for_key(public_key, device_id, chosen, hardware_id=hardware_id)
        return await self._record(cert, device_id, profile, hardware_id, activate, actor, {"key_source": "host"})

    async def check_public_key_free(self, public_key: CertificatePublicKeyTypes, device_id: str) -> None:
        """Refuse early (before signing) a key that already belongs to another device."""
        for record in await self.registry.certificates_with_key(public_key_sha256(public_key)):
            if record.device_id != device_id:
                raise Conflict(f"duplicate public key: it already belongs to device {record.device_id!r}")

    def _check_identity(self, device_id: str, profile: str, hardware_id: str | None) -> tuple[str, Profile]:
        validate_device_id(device_id)
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
    ) -> Issued:
        record = await self.registry.record_issuance(
            cert,
            device_id=device_id,
            profile=profile,
            hardware_id=hardware_id,
            activate=activate,
            actor=actor,
            details=details,
        )
        return Issued(cert, record, self.ca.chain)

    async def build_crl(self, now: datetime | None = None) -> PublishedCrl:
        """Sign a fresh CRL over the registry's complete revocation state."""
        at = now or now_utc()
        entries = await self.registry.crl_entries(at)
        known = self._crl_entries
        self._crl_entries = {
            e: known.get(e) or revoked_entry(int(e.serial, 16), datetime.fromisoformat(e.revoked_at), e.reason)
            for e in entries
        }
        revoked = list(self._crl_entries.values())
        number = await self.registry.next_crl_number()
        crl = self.ca.sign_crl(revoked, number, self.settings.crl_next_update, at)
        return PublishedCrl(crl, number, len(revoked))

    async def publish_crl(self, home: Home, now: datetime | None = None) -> PublishedCrl:
        """Build the CRL and atomically replace ``ca/crl.pem`` and ``ca/crl.der`` in ``home``."""
        published = await self.build_crl(now)
        write_public(home.crl_pem, published.crl.public_bytes(serialization.Encoding.PEM))
        write_public(home.crl_der, published.crl.public_bytes(serialization.Encoding.DER))
        return published


async def open_authority(home: Home, registry: Registry) -> Authority:
    """Load settings and the CA from ``home`` and attach ``registry``."""
    settings = load_settings(home)
    ca = CertificateAuthority.load(home, settings, ca_passphrase())
    return Authority(ca, registry, settings)
