"""``iotauth status``: one home at a glance, for the operator's morning check and for scripts.

What runs out, what the fleet looks like, and where the audit log stands:

* the home's certificates (root, issuing CA and the replaced ones still
  trusted, OCSP responder, the broker's TLS certificate) with their notAfter
  and the days left, and the published CRL's nextUpdate: when one of these
  lapses, every device is refused, not just one;
* devices and certificates by status, and the devices whose certificate runs
  out within 7 and 30 days (:mod:`iotauth.registry.fleet`);
* the audit log's head (id, time, kind, hash): the value to compare with an
  anchor kept elsewhere (``iotauth audit anchor``).

Reads only: no key is opened, so it runs without the CA passphrase or PIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from iotauth.castore import previous_issuing, read_certificate
from iotauth.certs import cert_time
from iotauth.config import Home
from iotauth.errors import PkiError
from iotauth.registry import Registry
from iotauth.registry.fleet import FleetSummary

SOON_DAYS = 30
"""A home certificate or CRL this close to its end is flagged (``expires_soon``)."""


@dataclass(frozen=True)
class Lifetime:
    """One of the home's certificates (or its CRL) and how long it has left."""

    name: str
    subject: str
    not_after: datetime | None
    now: datetime
    problem: str | None = None

    @property
    def days_left(self) -> float | None:
        return None if self.not_after is None else (self.not_after - self.now).total_seconds() / 86400

    @property
    def expires_soon(self) -> bool:
        return self.problem is not None or (self.days_left is not None and self.days_left <= SOON_DAYS)

    def as_dict(self) -> dict[str, Any]:
        days = self.days_left
        return {"name": self.name, "subject": self.subject,
                "not_after": cert_time(self.not_after) if self.not_after is not None else None,
                "days_left": None if days is None else round(days, 1), "expires_soon": self.expires_soon,
                "problem": self.problem}


@dataclass(frozen=True)
class HomeStatus:
    home: Path
    registry: str
    lifetimes: list[Lifetime]
    fleet: FleetSummary

    def as_dict(self) -> dict[str, Any]:
        return {"home": str(self.home), "registry": self.registry,
                "home_certificates": [lifetime.as_dict() for lifetime in self.lifetimes], **self.fleet.as_dict()}


def _certificate(name: str, path: Path, now: datetime) -> Lifetime:
    try:
        cert = read_certificate(path)
    except PkiError as exc:
        return Lifetime(name, "", None, now, str(exc))
    return Lifetime(name, cert.subject.rfc4514_string(), cert.not_valid_after_utc, now)


def _crl(home: Home, now: datetime) -> Lifetime:
    try:
        crl = x509.load_der_x509_crl(home.crl_der.read_bytes())
    except OSError:
        return Lifetime("published CRL", "", None, now, f"no CRL published at {home.crl_der} (run 'iotauth crl')")
    except ValueError:
        return Lifetime("published CRL", "", None, now, f"{home.crl_der} is not a DER CRL")
    return Lifetime("published CRL", crl.issuer.rfc4514_string(), crl.next_update_utc, now)


def lifetimes(home: Home, now: datetime) -> list[Lifetime]:
    """The home's certificates and CRL with their ends, in the order an operator reads them."""
    found = [_certificate("root CA", home.root_cert, now), _certificate("issuing CA", home.issuing_cert, now)]
    try:
        replaced = previous_issuing(home, now)
    except PkiError as exc:
        found.append(Lifetime("previous issuing CAs", "", None, now, str(exc)))
        replaced = []
    for previous in replaced:
        found.append(Lifetime(f"previous issuing CA {previous.directory.name}",
                              previous.cert.subject.rfc4514_string(), previous.cert.not_valid_after_utc, now))
    found += [_certificate("OCSP responder", home.ocsp_cert, now),
              _certificate("broker/serve TLS", home.server_cert, now), _crl(home, now)]
    return found


async def home_status(home: Home, registry: Registry, now: datetime) -> HomeStatus:
    home.require_initialised()
    return HomeStatus(home.root, registry.location, lifetimes(home, now), await registry.summary(now))


__all__ = ["SOON_DAYS", "HomeStatus", "Lifetime", "home_status", "lifetimes"]
