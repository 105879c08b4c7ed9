"""Pending certificates past their TTL are revoked by whichever long-running process notices first.

A certificate stays *pending* from issuance until its board commits; one whose
delivery never finished (a crash, a board pulled mid-run) must not linger
until the next ``iotauth provision`` run. So every long-running process sweeps
for them: the broker (its guard's periodic sweep), ``iotauth serve`` and the
station (``--watch``, and at every start). They all call
:func:`expire_stale_pending`.

Running it in several processes at once is safe: the revocation is selected
and written inside the registry's serialising write transaction, so the second
process finds nothing left to revoke (no double revocation, one audit event per
certificate, the chain intact). A cheap read comes first, so an idle sweep
costs no write lock. Pending certificates are already refused by every broker;
the sweep makes the registry (and the CRL, which lists them on hold until
then) say so for good.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from iotauth.certs import now_utc
from iotauth.errors import IotAuthError
from iotauth.registry.models import CertificateRecord, RevocationReason
from iotauth.registry.service import Registry

EXPIRY_INTERVAL = 30.0  # seconds between sweeps in serve and the station's watch mode

log = logging.getLogger("iotauth.registry")


async def expire_stale_pending(registry: Registry, pending_ttl: timedelta, *, actor: str,
                               now: datetime | None = None) -> list[CertificateRecord]:
    """Revoke (reason: superseded) every pending certificate issued more than ``pending_ttl`` ago."""
    return await registry.expire_pending((now or now_utc()) - pending_ttl, RevocationReason.SUPERSEDED, actor=actor)


async def expire_pending_forever(registry: Registry, pending_ttl: timedelta, *, actor: str,
                                 interval: float = EXPIRY_INTERVAL) -> None:
    """Sweep every ``interval`` seconds until cancelled; a registry outage is logged, never fatal."""
    while True:
        try:
            expired = await expire_stale_pending(registry, pending_ttl, actor=actor)
        except IotAuthError as exc:
            log.warning("cannot expire stale pending certificates: %s", exc)
        else:
            if expired:
                log.info("revoked %d pending certificate(s) older than %s: %s", len(expired), pending_ttl,
                         ", ".join(c.serial for c in expired))
        await asyncio.sleep(interval)
