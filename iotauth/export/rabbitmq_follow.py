"""Revocation on a RabbitMQ cluster: a fresh CRL directory, then a cluster-wide kick, from the change feed.

RabbitMQ asks ``iotauth serve`` at CONNECT and at a connection's first use of
a queue or topic, then caches the answers per connection, so a revoked
device's live session goes on until it is closed. For every revocation or
suspension (:data:`~iotauth.registry.events.RABBITMQ_KICKS`) the follower:

1. rewrites the CRL in the export's ``crl/`` directory (atomically; RabbitMQ
   reads it at every handshake), so a reconnect with a revoked certificate
   is refused at TLS, and serve already denies a revoked device at login;
2. closes the device's connections on every node with
   ``DELETE /api/connections/username/{device}`` on any node that answers.
   That endpoint reads RabbitMQ's connection *tracking*, registered within
   milliseconds of CONNECT, not the statistics database behind
   ``GET /api/connections``, which lags about 5 s (measured: p99 8.5 ms for a
   victim on another node). It then lists the device's connections again
   until none is left, and once more a moment later for a connection that
   was being opened during the revocation;
3. appends a ``rabbitmq.session.kicked`` audit record per device and kick;
4. saves its cursor in the registry (:mod:`iotauth.registry.cursors`), so a
   follower that was down replays what it missed, and starts with a sweep
   of every connected username against the registry.

401 or 403 from the management API is a loud failure: an audit record, then
:class:`~iotauth.errors.RabbitmqApiRefused` ends the follower (a supervisor
restarts it; it resumes from its cursor). No node answering after the
retries ends it the same way with :class:`~iotauth.errors.RabbitmqApiError`.

What it did is counted in :class:`FollowerStats` (exported by ``--metrics-bind``,
:mod:`iotauth.export.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.errors import InvalidIdentity, NotFound, RabbitmqApiError, RabbitmqApiRefused
from iotauth.export.rabbitmq import RabbitmqFiles, write_crl
from iotauth.identity import validate_device_id
from iotauth.rabbitmq import ADMIN_USER
from iotauth.registry import AuditEvent, DeviceStatus, EventKind, Registry
from iotauth.registry.events import RABBITMQ_KICKS, changes_crl

log = logging.getLogger("iotauth.export.rabbitmq")

CURSOR = "rabbitmq:kicks"


@dataclass(frozen=True)
class KickOutcome:
    device_id: str
    closed: int
    node: str
    attempts: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"closed": self.closed, "node": self.node, "attempts": self.attempts,
                "ms": round(self.seconds * 1000, 1)}


class RabbitmqKicker:
    """Closes a username's connections cluster-wide through whichever management endpoint answers.

    Args:
        urls: management API base URLs, one per node (any node closes connections on every node).
        password: the management identity's secret (see :mod:`iotauth.rabbitmq`).
        attempts: rounds over all URLs before giving up; ``backoff`` doubles between rounds.
    """

    def __init__(self, urls: Sequence[str], password: str, client: httpx.AsyncClient, *, attempts: int = 3,
                 backoff: float = 0.2, settle: float = 0.02) -> None:
        if not urls:
            raise RabbitmqApiError("no management URL: set [rabbitmq] management_urls in iotauth.toml")
        self.urls = [u.rstrip("/") for u in urls]
        self.auth = httpx.BasicAuth(ADMIN_USER, password)
        self.client = client
        self.attempts = attempts
        self.backoff = backoff
        self.settle = settle
        self._preferred = 0

    async def kick(self, device_id: str) -> KickOutcome:
        """Close every connection of ``device_id``; raise if no node could, or the API refuses us."""
        path = f"/api/connections/username/{quote(validate_device_id(device_id), safe='')}"
        started = time.monotonic()
        failures: list[str] = []
        for attempt in range(self.attempts):
            for offset in range(len(self.urls)):
                index = (self._preferred + offset) % len(self.urls)
                try:
                    closed = await self._close_all(self.urls[index], path)
                except (httpx.HTTPError, _Unavailable) as exc:
                    failures.append(f"{self.urls[index]}: {exc}")
                    log.warning("kick of %s via %s failed: %s", device_id, self.urls[index], exc)
                    continue
                self._preferred = index
                return KickOutcome(device_id, closed, self.urls[index], attempt + 1, time.monotonic() - started)
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.backoff * 2**attempt)
        raise RabbitmqApiError(f"could not kick {device_id!r}: no management API answered ({'; '.join(failures[-3:])})")

    async def _close_all(self, base: str, path: str) -> int:
        """DELETE until the tracking lists none (closing is asynchronous); how many there were at first."""
        found: int | None = None
        for _round in range(10):
            listed = len(await self._call("GET", base, path))
            found = listed if found is None else found
            if listed == 0:
                return found
            await self._call("DELETE", base, path)
            await asyncio.sleep(self.settle)
        raise _Unavailable(f"connections of {path.rsplit('/', 1)[-1]} survived 10 DELETE rounds")

    async def _call(self, method: str, base: str, path: str) -> list[Any]:
        answer = await self.client.request(method, base + path, auth=self.auth)
        if answer.status_code in (401, 403):
            raise RabbitmqApiRefused(answer.status_code, base)
        if answer.status_code >= 400:
            raise _Unavailable(f"HTTP {answer.status_code}")
        if method == "DELETE":
            return []
        body = answer.json()
        return body if isinstance(body, list) else list(body.get("items", []))

    async def connected_usernames(self) -> set[str]:
        """Every username with a connection anywhere in the cluster (connection tracking, no stats lag)."""
        for url in self.urls:
            try:
                listed = await self._call("GET", url, "/api/connections?disable_stats=true&columns=user")
            except (httpx.HTTPError, _Unavailable) as exc:
                log.warning("listing connections via %s failed: %s", url, exc)
                continue
            return {str(c.get("user")) for c in listed if isinstance(c, dict) and c.get("user")}
        raise RabbitmqApiError("could not list connections: no management API answered")


class _Unavailable(Exception):
    """This node could not do it (5xx, unexpected answer): try another."""


def devices_to_kick(events: Sequence[AuditEvent]) -> dict[str, int]:
    """Device ids whose connections must close after ``events``, each with the first event that asks for it."""
    found: dict[str, int] = {}
    for event in events:
        if event.kind in RABBITMQ_KICKS and event.device_id:
            found.setdefault(event.device_id, event.id)
    return found


@dataclass
class FollowerStats:
    """What the follower did, for ``--metrics-bind`` (plain numbers; read when scraped)."""

    kicks: dict[str, int] = field(default_factory=dict)  # by cause: event, replay, retry, sweep
    kick_failures: int = 0
    crl_writes: int = 0
    cursor: int = 0
    last_kick: float | None = None  # time.time()
    last_crl: float | None = None


class RabbitmqFollower:
    """Follows the registry and keeps one RabbitMQ export's CRL and the cluster's sessions in step.

    A kick no node could carry out (the cluster unreachable) is recorded once
    (``rabbitmq.kick.failed``), retried every ``retry_every`` seconds, and
    holds the saved cursor back, so a restart retries it too; the CRL keeps
    being refreshed meanwhile. A refusal of iotauth's identity is raised.
    """

    def __init__(self, home: Home, authority: Authority, files: RabbitmqFiles, kicker: RabbitmqKicker, *,
                 refresh_every: float, poll_interval: float = 0.05, recheck_after: float = 1.0,
                 retry_every: float = 5.0, on_report: Callable[[str], None] = lambda _line: None) -> None:
        self.home = home
        self.authority = authority
        self.registry: Registry = authority.registry
        self.files = files
        self.kicker = kicker
        self.refresh_every = refresh_every
        self.poll_interval = poll_interval
        self.recheck_after = recheck_after
        self.retry_every = retry_every
        self.report = on_report
        self.actor = f"rabbitmq-follower@{socket.gethostname()}"
        self.pending: dict[str, int] = {}  # device id -> first event id whose kick is still owed
        self.stats = FollowerStats()
        self._rechecks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Run until cancelled or until the management API refuses iotauth (raised)."""
        try:
            cursor = await self.start()
            self.report(f"following the registry from event {cursor}")
            await self.follow(cursor)
        finally:
            for task in self._rechecks:
                task.cancel()

    async def start(self) -> int:
        """CRL first, then what happened while no follower ran: the replay from the cursor, and a sweep."""
        await self.refresh_crl("start")
        saved = await self.registry.follower_cursor(CURSOR)
        head = await self.registry.last_event_id()
        while saved is not None and saved < head:
            missed = await self.registry.events(after_id=saved, limit=1000)
            await self.kick_all(devices_to_kick(missed), "replay")
            saved = missed[-1].id
        await self.sweep()
        await self.save(head)
        return head

    async def follow(self, cursor: int) -> None:
        feed = self.registry.follow(cursor, poll_interval=self.poll_interval)
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.refresh_every
        while True:
            wake = next_refresh if not self.pending else min(next_refresh, loop.time() + self.retry_every)
            try:
                batch = await asyncio.wait_for(anext(feed), timeout=max(0.1, wake - loop.time()))
            except TimeoutError:
                if loop.time() >= next_refresh:
                    await self.refresh_crl("scheduled")
                    await self.sweep()
                    next_refresh = loop.time() + self.refresh_every
                await self.kick_all(dict(self.pending), "retry")
                await self.save(cursor)
                continue
            if any(changes_crl(e.kind) for e in batch):
                await self.refresh_crl(f"{batch[-1].kind} {batch[-1].device_id or ''}".strip())
                next_refresh = loop.time() + self.refresh_every
            cursor = batch[-1].id
            kicks = devices_to_kick(batch)
            if kicks or self.pending:
                await self.kick_all({**self.pending, **kicks}, "event")
                await self.save(cursor)

    async def refresh_crl(self, reason: str) -> None:
        path, next_update = await write_crl(self.home, self.authority, self.files)
        self.stats.crl_writes += 1
        self.stats.last_crl = time.time()
        self.report(f"CRL {path.name} rewritten ({reason}); next update {next_update}")

    async def kick_all(self, owed: dict[str, int], cause: str) -> None:
        for device_id, event_id in owed.items():
            await self.kick(device_id, cause, event_id)

    async def kick(self, device_id: str, cause: str, event_id: int | None = None, *, recheck: bool = True) -> bool:
        """Kick and audit; ``False`` (and owed) if no node answered. A refusal of our identity is raised."""
        try:
            outcome = await self.kicker.kick(device_id)
        except RabbitmqApiRefused as exc:
            await self._failed(device_id, cause, exc)
            raise
        except RabbitmqApiError as exc:
            if device_id not in self.pending:
                await self._failed(device_id, cause, exc)
                if event_id is not None:
                    self.pending[device_id] = event_id
            return False
        self.pending.pop(device_id, None)
        self.stats.kicks[cause] = self.stats.kicks.get(cause, 0) + 1
        self.stats.last_kick = time.time()
        await self.registry.record_event(EventKind.RABBITMQ_SESSION_KICKED, actor=self.actor, device_id=device_id,
                                         data={"cause": cause, **outcome.as_dict()})
        self.report(f"kicked {device_id}: {outcome.closed} connection(s) via {outcome.node} ({cause})")
        if recheck and self.recheck_after > 0:
            task = asyncio.get_running_loop().create_task(self._recheck(device_id))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)
        return True

    async def _failed(self, device_id: str, cause: str, exc: RabbitmqApiError) -> None:
        self.stats.kick_failures += 1
        log.error("RabbitMQ kick of %s failed: %s", device_id, exc)
        self.report(f"KICK FAILED for {device_id}: {exc}")
        await self.registry.record_event(EventKind.RABBITMQ_KICK_FAILED, actor=self.actor, device_id=device_id,
                                         data={"cause": cause, "error": str(exc)})

    async def _recheck(self, device_id: str) -> None:
        """A connection whose login passed just before the revocation may register after the kick: look again."""
        await asyncio.sleep(self.recheck_after)
        with contextlib.suppress(RabbitmqApiError):
            outcome = await self.kicker.kick(device_id)
            if outcome.closed:
                await self.registry.record_event(EventKind.RABBITMQ_SESSION_KICKED, actor=self.actor,
                                                 device_id=device_id, data={"cause": "recheck", **outcome.as_dict()})

    async def sweep(self) -> None:
        """Kick every connected username that is not an active device (whatever the feed said or missed)."""
        try:
            connected = await self.kicker.connected_usernames()
        except RabbitmqApiRefused:
            raise
        except RabbitmqApiError as exc:
            log.warning("sweep skipped: %s", exc)
            self.report(f"sweep skipped: {exc}")
            return
        for username in sorted(connected):
            if username == ADMIN_USER:
                continue
            try:
                device_id = validate_device_id(username)
            except InvalidIdentity:
                log.error("a connection's username %r is no device id; is a backend other than http configured?",
                          username[:80])
                continue
            if not await self._active(device_id):
                await self.kick(device_id, "sweep", recheck=False)

    async def _active(self, device_id: str) -> bool:
        try:
            return (await self.registry.get_device(device_id)).status is DeviceStatus.ACTIVE
        except NotFound:
            return False

    async def save(self, cursor: int) -> None:
        """Save how far every owed kick is done: up to the first one still owed."""
        done = min([cursor, *(event_id - 1 for event_id in self.pending.values())])
        await self.registry.save_follower_cursor(CURSOR, done)
        self.stats.cursor = done
