"""Publishing a CRL to a managed Mosquitto, and proving it loaded.

Mosquitto 2.0.11 re-reads its CRL on SIGHUP into a fresh TLS context. If the
file cannot be read or parsed at that moment, the new context has **no
revocation checking at all** and the only trace is one log line. So each
publication:

1. signs the registry's revocation state plus every live canary (a fresh one
   included), and checks the result before anyone reads it: issuer,
   signature, nextUpdate, the fresh canary listed;
2. replaces ``crl.pem`` atomically, already owned by Mosquitto's group;
3. sends SIGHUP (to the verified Mosquitto of this export);
4. handshakes with the fresh canary until Mosquitto refuses it as *revoked*:
   only a CRL with that serial can do that, so the new CRL is in force (about
   8 ms). A refusal for any other reason is not taken as proof.

Only then may the follower kick a device: a device kicked earlier could
reconnect through the old CRL and keep that session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.authority import Authority
from iotauth.certs import now_utc, pem
from iotauth.errors import MosquittoControlError
from iotauth.export.managed.layout import ManagedFiles
from iotauth.export.managed.process import MosquittoProcess
from iotauth.files import write_public
from iotauth.pki.ca import revoked_entry
from iotauth.pki.canary import issue_canary

log = logging.getLogger("iotauth.mosquitto")

CANARY_LIFETIME = timedelta(minutes=15)
PROOF_TIMEOUT = 2.0
# MQTT 3.1.1 CONNECT, clean session, empty client id (Mosquitto names it after the certificate).
_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"


class Probe(StrEnum):
    REVOKED = "revoked"  # refused with a "certificate revoked" alert: the CRL listing the canary is loaded
    ACCEPTED = "accepted"  # the handshake (and CONNECT) went through: not yet
    REFUSED = "refused"  # refused for another reason: proves nothing
    UNREACHABLE = "unreachable"  # nothing listens


@dataclass(frozen=True)
class Canary:
    certificate: x509.Certificate
    context: ssl.SSLContext

    @property
    def serial(self) -> str:
        return f"{self.certificate.serial_number:x}"


class Canaries:
    """This process's canary certificates: one key in memory, a fresh certificate per CRL.

    Every certificate issued here is revoked in every later CRL until it
    expires, so only the newest CRL can refuse the newest canary.
    """

    def __init__(self, chain_file: Path, lifetime: timedelta = CANARY_LIFETIME) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._chain_file = chain_file
        self._lifetime = lifetime
        self._issued: list[tuple[x509.Certificate, datetime]] = []

    def fresh(self, authority: Authority, now: datetime) -> Canary:
        cert = issue_canary(authority.ca, self._key.public_key(), secrets.token_hex(6), lifetime=self._lifetime,
                            now=now)
        self._issued.append((cert, now))
        return Canary(cert, self._context(cert))

    def revoked(self, now: datetime) -> list[x509.RevokedCertificate]:
        """CRL entries for every canary still valid at ``now`` (expired ones are dropped for good)."""
        self._issued = [(c, at) for c, at in self._issued if c.not_valid_after_utc > now]
        return [revoked_entry(c.serial_number, at, None) for c, at in self._issued]

    def _context(self, cert: x509.Certificate) -> ssl.SSLContext:
        """A TLS 1.2 client context (so a refusal arrives as an alert in the handshake) holding the canary.

        ``ssl`` loads keys only from files: the key goes to a private temporary
        directory encrypted under a one-time passphrase, and is removed at once.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # the probe may reach the listener by an address not in the certificate
        context.load_verify_locations(cafile=str(self._chain_file))
        passphrase = secrets.token_bytes(32)
        directory = Path(tempfile.mkdtemp(prefix="iotauth-canary-"))
        try:
            (directory / "c.pem").write_bytes(pem(cert))
            (directory / "k.pem").write_bytes(self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase)))
            context.load_cert_chain(directory / "c.pem", directory / "k.pem", password=passphrase)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return context


async def probe(canary: Canary, host: str, port: int, timeout: float = 2.0) -> Probe:  # noqa: ASYNC109
    """One handshake (and CONNECT) with the canary: what did Mosquitto make of it?"""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=canary.context, server_hostname=host)
    except (ConnectionRefusedError, TimeoutError, OSError) as exc:
        if isinstance(exc, ssl.SSLError):
            return Probe.REVOKED if "REVOKED" in str(exc.reason or exc).upper() else Probe.REFUSED
        return Probe.UNREACHABLE
    try:
        async with asyncio.timeout(timeout):
            writer.write(_CONNECT)
            await writer.drain()
            answer = await reader.read(4)
        return Probe.ACCEPTED if answer[:1] == b"\x20" else Probe.REFUSED
    except ssl.SSLError as exc:
        return Probe.REVOKED if "REVOKED" in str(exc.reason or exc).upper() else Probe.REFUSED
    except (OSError, TimeoutError):
        return Probe.REFUSED
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@dataclass(frozen=True)
class CrlProof:
    """A published CRL and whether Mosquitto was seen enforcing it."""

    number: int
    entries: int
    canary: str
    proven: bool
    seconds: float
    last_probe: Probe

    def as_dict(self) -> dict[str, object]:
        return {"crl_number": self.number, "crl_entries": self.entries, "canary_serial": self.canary,
                "crl_proven": self.proven, "crl_seconds": round(self.seconds, 4)}


class CrlPublisher:
    """Sign, check, write, reload and prove CRLs for one managed Mosquitto."""

    def __init__(self, authority: Authority, files: ManagedFiles, process: MosquittoProcess,
                 probe_at: tuple[str, int], group: int | None, canaries: Canaries) -> None:
        self.authority = authority
        self.files = files
        self.process = process
        self.probe_at = probe_at
        self.group = group
        self.canaries = canaries
        self.next_update: datetime | None = None

    async def publish(self, proof_timeout: float = PROOF_TIMEOUT, hold: Collection[str] = ()) -> CrlProof:
        """Publish a fresh CRL and prove it loaded (one more SIGHUP if the first proves nothing).

        ``hold``: renewals (serials) listed as certificateHold as well, until
        the follower has closed the sessions of the certificates they replaced.

        Raises:
            MosquittoUnavailable: Mosquitto is not running (nothing to reload).
            MosquittoControlError: the CRL just signed failed its own checks.
        """
        started = time.monotonic()
        now = now_utc()
        canary = self.canaries.fresh(self.authority, now)
        published = await self.authority.build_crl(now, extra=self.canaries.revoked(now), hold=hold)
        self._check(published.crl, canary, now, hold)
        data = published.pem  # with the CRLs of a previous issuing CA and the root, after a rollover
        write_public(self.files.crl, data, mode=0o640 if self.group is not None else 0o644, group=self.group)
        if self.files.crl.read_bytes() != data:
            raise MosquittoControlError(f"{self.files.crl} changed under the follower while it was being published")
        self.next_update = published.crl.next_update_utc
        last = Probe.UNREACHABLE
        for _attempt in range(2):
            self.process.reload()
            deadline = time.monotonic() + proof_timeout
            while time.monotonic() < deadline:
                last = await probe(canary, *self.probe_at, timeout=max(0.2, deadline - time.monotonic()))
                if last is Probe.REVOKED:
                    return CrlProof(published.number, published.entries, canary.serial, True,
                                    time.monotonic() - started, last)
                await asyncio.sleep(0.005)
            log.warning("Mosquitto did not refuse the canary %s within %.1f s after SIGHUP (last probe: %s)",
                        canary.serial, proof_timeout, last)
        log.error("REVOCATION MAY BE OFF in Mosquitto: the CRL %s (number %d) was not seen in force; check its "
                  "log for 'Unable to load certificate revocation file'", self.files.crl, published.number)
        return CrlProof(published.number, published.entries, canary.serial, False, time.monotonic() - started, last)

    def _check(self, crl: x509.CertificateRevocationList, canary: Canary, now: datetime,
               hold: Collection[str] = ()) -> None:
        issuing = self.authority.ca.issuing_cert
        problems = []
        if crl.issuer != issuing.subject:
            problems.append("issuer is not the issuing CA")
        if not crl.is_signature_valid(issuing.public_key()):  # type: ignore[arg-type]
            problems.append("signature does not verify")
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            problems.append("nextUpdate is not in the future")
        if crl.get_revoked_certificate_by_serial_number(canary.certificate.serial_number) is None:
            problems.append("the canary is missing")
        if any(crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is None for serial in hold):
            problems.append("a held renewal is missing")
        if problems:
            raise MosquittoControlError(f"refusing to publish a bad CRL: {', '.join(problems)}")
