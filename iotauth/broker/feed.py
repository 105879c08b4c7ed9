"""The broker's follower of the registry's change feed: live revocation and fail-closed health.

It reads the registry's events table (one indexed range query, bounded by
``registry_timeout``) whenever PostgreSQL announces a commit and at least
every ``poll_interval`` (SQLite is only polled) and, on the kinds that
:data:`~iotauth.registry.events.DEVICE_KICKS` lists and on
``certificate.revoked``, closes the affected connections at once and has the
broker forget their sessions (subscriptions and queued messages). Events it
does not know that name a device with a live session trigger a fresh registry
lookup for that device, so a new kind of state change fails safe. There is no
decision cache: a kicked binding loses every right immediately, even before
its socket is gone.

**Registry outage.** If the feed cannot be read within ``registry_timeout``
the follower is *unhealthy*: admission refuses new connects (CONNACK 0x03)
because revocations could no longer be enforced. Live sessions are kept for
``registry_grace`` seconds (a short hiccup should not drop a fleet) and then
closed; their sessions are kept and they can reconnect once the registry is
readable again. ``fail_open`` keeps everything up instead.

**A replaced registry file.** Before every poll the follower asks the
registry whether its database is still the one at its location
(``Registry.ensure_identity``: device and inode of the file, and the instance
id stored in it). After ``mv registry.db x; cp x registry.db`` the old file
is an orphan that no operator command writes any more: the registry reopens
the copy in place (the broker's audit writer shares it), and the follower
logs it, forgets every cached credential, re-checks every live session
against the new file and follows it from its newest event, so a revocation
written there takes effect. A file that is gone, empty, foreign or another
registry (another instance id) is not adopted: that is an outage like an
unreadable registry, with the same fail-closed behaviour, until the right
file is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from iotauth.broker.admission import CredentialCache, CredentialSource, RecentRevocations
from iotauth.broker.binding import Binding, Bindings, GuardOptions
from iotauth.registry import AuditEvent, EventKind
from iotauth.registry.events import DEVICE_KICKS, HARMLESS_TO_SESSIONS, written_by_broker

log = logging.getLogger("iotauth.broker")
FEED_BATCH = 1000  # events per read; a full batch means the follower is behind


class FeedSource(CredentialSource, Protocol):
    """The registry reads the follower makes (``iotauth.registry.Registry`` provides them)."""

    async def events(
        self, *, after_id: int = 0, since: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[AuditEvent]: ...

    async def last_event_id(self) -> int: ...

    async def wait_for_change(self, interval: float) -> None: ...

    async def ensure_identity(self) -> bool: ...


class FeedFollower:
    """Apply registry events to live bindings, and track whether the registry can be read.

    Args:
        registry: where events (and, to re-check a binding, credentials) are read.
        bindings: the live and offline bindings it kicks.
        credentials, recent: the admission caches it keeps coherent.
        options: poll interval, timeouts, grace, fail-open.
    """

    def __init__(
        self,
        *,
        registry: FeedSource,
        bindings: Bindings,
        credentials: CredentialCache,
        recent: RecentRevocations,
        options: GuardOptions,
    ) -> None:
        self.registry = registry
        self.bindings = bindings
        self.credentials = credentials
        self.recent = recent
        self.options = options
        self._cursor = 0
        self._unhealthy_since: float | None = None
        self._outage_kicked = False
        self.last_read: float | None = None
        """Wall-clock time of the last successful read of the feed (metrics: time since the last poll)."""
        self.last_applied_ts: str | None = None
        """Registry timestamp of the last event applied (metrics: change-feed lag)."""
        self.caught_up = True
        """Whether the last read reached the end of the feed (then the follower is not behind)."""

    @property
    def cursor(self) -> int:
        """The id of the last registry event applied."""
        return self._cursor

    @property
    def healthy(self) -> bool:
        return self._unhealthy_since is None

    async def start(self) -> None:
        """Start from the registry's newest event (which must be readable now)."""
        self._cursor = await asyncio.wait_for(self.registry.last_event_id(), self.options.registry_timeout)
        self.last_read = time.time()

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        backoff = self.options.poll_interval
        while True:
            try:
                async with asyncio.timeout(self.options.registry_timeout):
                    replaced = await self.registry.ensure_identity()
                if replaced:  # outside the timeout: re-checking sessions bounds each read itself
                    await self.reopened()
                async with asyncio.timeout(self.options.registry_timeout):
                    batch = await self.registry.events(after_id=self._cursor, limit=FEED_BATCH)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.unhealthy(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = self.options.poll_interval
            self.recovered()
            self.last_read = time.time()
            self.caught_up = len(batch) < FEED_BATCH
            if batch:
                await self.apply(batch)
            else:  # PostgreSQL wakes this at once on NOTIFY; SQLite sleeps the poll interval
                await self.registry.wait_for_change(self.options.poll_interval)

    async def apply(self, batch: list[AuditEvent]) -> None:
        """Enforce a batch of registry events (in id order) and advance the cursor past them."""
        forget: list[tuple[str, str | None]] = []
        recheck: set[str] = set()
        now = time.monotonic()
        for event in batch:
            kind, device_id = event.kind, event.device_id
            if written_by_broker(kind):
                self._cursor = event.id
                continue
            if device_id:
                self.credentials.invalidate(device_id, event.id, now)
            if kind in HARMLESS_TO_SESSIONS:
                pass
            elif kind == EventKind.CERTIFICATE_REVOKED:
                fp = event.data.get("fingerprint")
                if isinstance(fp, str):
                    self.recent.certificate(fp, event.id, now)
                    self.credentials.drop(fp)
                    self.bindings.kick(self.bindings.matching(device_id, fp), "certificate-revoked", event)
                    if device_id:
                        forget.append((device_id, fp))
            elif (reason := DEVICE_KICKS.get(kind)) is not None and device_id:
                self.recent.device(device_id, event.id, now)
                self.bindings.kick(self.bindings.matching(device_id, None), reason, event)
                forget.append((device_id, None))
            elif device_id:
                recheck.add(device_id)
            self._cursor = event.id
        if batch:
            self.last_applied_ts = batch[-1].ts
        host = self.bindings.host
        if host is not None:
            for device_id, fp in forget:
                try:
                    await host.forget(device_id, fp)
                except Exception:
                    log.exception("could not forget the session of %s", device_id)
        for device_id in recheck:
            await self.revalidate(self.bindings.matching(device_id, None))

    async def revalidate(self, bindings: Iterable[Binding]) -> None:
        """Ask the registry again about these bindings and kick or rebind as it says."""
        for binding in list(bindings):
            if binding.revoked is not None:
                continue
            try:
                credential = await asyncio.wait_for(
                    self.registry.find_credential(binding.admission.fingerprint), self.options.registry_timeout
                )
            except Exception as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self.unhealthy(exc)
                return
            if credential is None or not credential.usable:
                self.bindings.kick([binding], "registry-revalidation", None)
                if self.bindings.host is not None:
                    await self.bindings.host.forget(binding.device_id, binding.admission.fingerprint)
            elif credential.device.profile != binding.admission.profile:
                self.bindings.kick([binding], "profile-changed", None)

    async def reopened(self) -> None:
        """The registry now reads a new copy of its file: start over from what that file says."""
        previous = self._cursor
        self._cursor = await self.registry.last_event_id()
        self.credentials.clear()
        live = self.bindings.matching(None, None)
        log.error("registry file was replaced by a copy and reopened: following it from event %d (was %d); "
                  "re-checking %d sessions against it", self._cursor, previous, len(live))
        self.bindings.audit.event(EventKind.BROKER_REGISTRY_REOPENED, None,
                                  {"cursor": self._cursor, "previous_cursor": previous, "sessions": len(live)})
        await self.revalidate(live)

    async def check_position(self) -> None:
        """Notice a registry that went back in time (restored from a backup) and re-check every session."""
        try:
            last = await asyncio.wait_for(self.registry.last_event_id(), self.options.registry_timeout)
        except Exception as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.unhealthy(exc)
            return
        if last < self._cursor:
            log.error("registry event ids went back from %d to %d (restored from a backup?): re-checking all sessions",
                      self._cursor, last)
            self._cursor = last
            self.credentials.clear()
            await self.revalidate(self.bindings.matching(None, None))

    # -- health ----------------------------------------------------------------------------

    def unhealthy(self, exc: BaseException) -> None:
        """A registry read failed: refuse new connects; after the grace period, drop live sessions."""
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
            log.error("registry unreadable (%s): refusing new connections%s", exc or type(exc).__name__,
                      "" if not self.options.fail_open else " -- NOT: running --fail-open")
            return
        if (not self.options.fail_open and not self._outage_kicked
                and now - self._unhealthy_since >= self.options.registry_grace):
            self._outage_kicked = True
            live = self.bindings.connected()
            log.error("registry unreadable for %.1f s: failing closed, disconnecting %d sessions",
                      now - self._unhealthy_since, len(live))
            self.bindings.kick(live, "registry-unavailable", None)

    def recovered(self) -> None:
        """A registry read succeeded: admit again (and record how long the outage lasted)."""
        if self._unhealthy_since is not None:
            outage = time.monotonic() - self._unhealthy_since
            log.warning("registry readable again after %.1f s", outage)
            self.bindings.audit.event(EventKind.BROKER_REGISTRY_RECOVERED, None,
                                      {"outage_seconds": round(outage, 3), "sessions_dropped": self._outage_kicked})
            self._unhealthy_since = None
            self._outage_kicked = False
