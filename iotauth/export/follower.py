"""Keep an external broker in step with the registry: follow the change feed from a persisted cursor.

A revocation is final in the registry the moment it commits, but a broker that
authenticated a device earlier (EMQX, a RabbitMQ cluster, a managed Mosquitto)
keeps the live session until someone tells it otherwise. A :class:`PushFollower`
is that someone. It reads the registry's events after its cursor, hands the ones
its :class:`PushTarget` cares about to the target (batch-level work once, then
each device's events together, in feed order) and only then moves its cursor.

Why it is shaped this way:

* **The cursor lives in the registry** (``meta``, key ``cursor:<name>``), so a
  revocation made while the follower was down (``iotauth serve`` restarting,
  deployed, crashed) is pushed when it comes back. The first start has no
  cursor: it begins at the end of the feed and says so (log and ``push.started``
  audit event); earlier revocations were never this follower's to push.
* **Delivery is at least once.** The cursor moves after a batch is delivered,
  so a crash replays the last batch. Targets make their calls idempotent (a kick
  of a gone client is a 404, a second ban is "already exists").
* **Nothing is skipped for a transient failure.** :class:`PushUnavailable`
  (network, 5xx) is retried with capped exponential backoff for as long as it
  takes; the cursor stays put, so later revocations queue behind it in order.
* **Refused credentials are loud.** :class:`PushUnauthorized` (401/403) means
  no revocation will reach the broker until an operator acts: it is logged at
  ERROR, audited once per failure streak (``push.failed``), reported unhealthy
  by ``/healthz``, and retried at the backoff cap until it works.
* **A request refused for good** (:class:`PushRejected`, another 4xx) is
  audited and skipped, so one bad device cannot stall every later revocation.
* Every device delivered leaves a ``push.delivered`` audit record with what the
  broker answered.

The follower knows nothing about any broker; EMQX's target is
:class:`iotauth.http.push.EmqxTarget`. Backoff and sleeping are injectable so
tests never wait for real.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Protocol, TypeVar

from iotauth.errors import PushRejected, PushUnauthorized, PushUnavailable, RegistryError
from iotauth.registry import AuditEvent, EventKind
from iotauth.registry.cursors import FeedFollowing

log = logging.getLogger("iotauth.push")
T = TypeVar("T")


class PushTarget(Protocol):
    """What a follower drives: one external broker's API."""

    @property
    def name(self) -> str:
        """Short lower-case name (``emqx``): the cursor key, the audit actor ``push:<name>`` and the health entry."""
        ...

    def relevant(self, event: AuditEvent) -> bool:
        """Whether ``event`` asks anything of this broker (cheap and pure: it runs on every event)."""
        ...

    async def prepare(self, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        """Batch-level work before any device of this batch (cache resets, a CRL refresh); returns what it did."""
        ...

    async def apply(self, device_id: str, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        """Bring the broker in line with ``device_id``'s current state; returns what the broker answered
        (nothing when there was nothing to do: then no ``push.delivered`` record is written).

        Raises:
            PushUnavailable: retry later. PushUnauthorized: credentials refused.
            PushRejected: this request can never succeed.
        """
        ...

    async def aclose(self) -> None:
        """Release the target's connections."""
        ...


class PushRegistry(FeedFollowing, Protocol):
    """What a push follower needs of the registry: the feed, its cursor, and its own audit records."""

    async def record_event(
        self, kind: EventKind, *, actor: str, device_id: str | None = None, data: dict[str, Any] | None = None
    ) -> int: ...


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``first * factor**(failures - 1)``, at most ``cap`` seconds."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.cap, self.first * self.factor ** max(0, min(failures - 1, 64))))


class PushState(StrEnum):
    STARTING = "starting"
    OK = "ok"
    RETRYING = "retrying"  # the broker (or the registry) is unreachable: retried with backoff
    UNAUTHORIZED = "unauthorized"  # 401/403: nothing reaches the broker until an operator acts
    STOPPED = "stopped"  # the follower ended on an error it could not handle (a bug): restart the service


@dataclass
class PushHealth:
    """What ``/healthz`` reports about one follower."""

    target: str
    unhealthy_after: float
    state: PushState = PushState.STARTING
    cursor: int = 0
    delivered: int = 0
    rejected: int = 0
    failures: int = 0  # failed attempts since the start, retried (metrics: a rate of them)
    last_success: float | None = None  # time.time() of the last delivery to the broker
    last_error: str | None = None
    failing_since: float | None = None  # time.monotonic() of the first failure of the current streak
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def healthy(self) -> bool:
        """Unhealthy when credentials are refused, or when retries have failed for ``unhealthy_after`` seconds."""
        if self.state in (PushState.UNAUTHORIZED, PushState.STOPPED):
            return False
        return self.failing_since is None or self.clock() - self.failing_since < self.unhealthy_after

    def as_dict(self) -> dict[str, object]:
        failing_for = None if self.failing_since is None else round(self.clock() - self.failing_since, 1)
        return {
            "target": self.target,
            "healthy": self.healthy,
            "state": self.state.value,
            "cursor": self.cursor,
            "delivered": self.delivered,
            "rejected": self.rejected,
            "failures": self.failures,
            "last_success": self.last_success,
            "failing_for_seconds": failing_for,
            "last_error": self.last_error,
        }


class PushFollower:
    """Follow the registry's feed for one :class:`PushTarget`; see the module docstring.

    Args:
        registry: where events are read, the cursor kept and the audit written.
        target: the broker API to drive.
        backoff: retry delays (tests pass tiny ones).
        poll_interval: how often SQLite is polled (PostgreSQL wakes the follower on commit).
        batch_size: events read per registry query.
        unhealthy_after: seconds of failed retries before ``/healthz`` reports the follower unhealthy.
        save_every: seconds between cursor writes while only irrelevant events pass (relevant ones save at once).
        sleep: the coroutine used to wait between retries.
    """

    def __init__(
        self,
        registry: PushRegistry,
        target: PushTarget,
        *,
        backoff: Backoff = Backoff(),
        poll_interval: float = 0.2,
        batch_size: int = 500,
        unhealthy_after: float = 30.0,
        save_every: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.registry = registry
        self.target = target
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.save_every = save_every
        self.sleep = sleep
        self.health = PushHealth(target.name, unhealthy_after)
        self.actor = f"push:{target.name}"
        self._cursor: int | None = None
        self._saved = 0
        self._saved_at = 0.0
        self._failures = 0
        self._audited_streak = False

    @property
    def cursor(self) -> int | None:
        """The id of the last event delivered (None before :meth:`start`)."""
        return self._cursor

    async def run(self) -> None:
        """Run until cancelled: start from the persisted cursor, then deliver every batch as it comes."""
        try:
            await self.start()
            while True:
                if not await self.step():
                    await self._retrying(partial(self.registry.wait_for_change, self.poll_interval), None)
        except Exception as exc:
            self.health.state = PushState.STOPPED
            self.health.last_error = str(exc)
            log.exception("push to %s STOPPED: revocations no longer reach the broker", self.target.name)
            raise

    async def start(self) -> int:
        """Load the persisted cursor (the first start begins at the end of the feed) and return it."""
        cursor = await self._retrying(partial(self.registry.follower_cursor, self.actor), None)
        if cursor is None:
            cursor = await self._retrying(self.registry.last_event_id, None)
            log.warning("push to %s: first start, following the registry from event %d on", self.target.name, cursor)
            await self._retrying(partial(self._audit, EventKind.PUSH_STARTED, None, {"from_event": cursor}), None)
            await self._retrying(partial(self.registry.save_follower_cursor, self.actor, cursor), None)
        else:
            log.info("push to %s: resuming after event %d", self.target.name, cursor)
        self._cursor = self._saved = self.health.cursor = cursor
        self._saved_at = time.monotonic()
        if self.health.state is PushState.STARTING:
            self.health.state = PushState.OK
        return cursor

    async def step(self) -> bool:
        """Deliver the next batch of the feed, if there is one; return whether there was."""
        if self._cursor is None:
            await self.start()
        cursor = self._cursor or 0
        batch = await self._retrying(partial(self.registry.events, after_id=cursor, limit=self.batch_size), None)
        if not batch:
            return False
        relevant = [e for e in batch if self.target.relevant(e)]
        if relevant:
            await self._deliver(relevant)
        self._cursor = self.health.cursor = batch[-1].id
        if relevant or time.monotonic() - self._saved_at >= self.save_every:
            await self._save()
        return True

    async def aclose(self) -> None:
        """Save the cursor (one attempt: the registry may be what is failing) and release the target."""
        cursor = self._cursor or 0
        if cursor > self._saved:
            try:
                await self.registry.save_follower_cursor(self.actor, cursor)
            except (RegistryError, OSError) as exc:
                log.warning("push to %s: could not save the cursor on exit: %s", self.target.name, exc)
        await self.target.aclose()

    async def catch_up(self) -> int:
        """Deliver everything already in the feed and save the cursor (tests, one-shot use); return the cursor."""
        while await self.step():
            pass
        self._saved_at = 0.0
        await self._save()
        return self._cursor or 0

    async def _deliver(self, events: list[AuditEvent]) -> None:
        prepared = await self._attempt(partial(self.target.prepare, events), None)
        if prepared is None:
            return  # refused for good: audited; the devices' own calls may still work, but not in this order
        for device_id, own in _by_device(events).items():
            answers = await self._attempt(partial(self.target.apply, device_id, own), device_id)
            if not answers:  # refused for good (audited), or nothing to do for this device
                continue
            self.health.delivered += 1
            self.health.last_success = time.time()
            data = {"events": [e.id for e in own], "answers": {**prepared, **answers}}
            await self._retrying(partial(self._audit, EventKind.PUSH_DELIVERED, device_id, data), None)

    async def _attempt(
        self, op: Callable[[], Awaitable[Mapping[str, object]]], device_id: str | None
    ) -> Mapping[str, object] | None:
        """:meth:`_retrying`, except that a request refused for good is audited, counted and answered with None."""
        try:
            return await self._retrying(op, device_id)
        except PushRejected as exc:
            self.health.rejected += 1
            self.health.last_error = str(exc)
            log.error("push to %s: %s refused for good, skipped: %s", self.target.name, device_id or "batch", exc)
            data = {"error": str(exc), "skipped": True}
            await self._retrying(partial(self._audit, EventKind.PUSH_FAILED, device_id, data), None)
            return None

    async def _retrying(self, op: Callable[[], Awaitable[T]], device_id: str | None) -> T:
        """Run ``op`` until it succeeds; transient and credential failures wait and retry, PushRejected escapes."""
        while True:
            try:
                result = await op()
            except (PushUnavailable, RegistryError, OSError) as exc:
                await self._failed(exc, PushState.RETRYING, device_id)
            except PushUnauthorized as exc:
                await self._failed(exc, PushState.UNAUTHORIZED, device_id)
            except PushRejected:
                raise
            except Exception as exc:  # a bug must not end the follower silently: retry, loudly, and stay unhealthy
                log.exception("push to %s: unexpected error", self.target.name)
                await self._failed(exc, PushState.RETRYING, device_id)
            else:
                if self._failures:
                    log.warning("push to %s: working again after %d failed attempts", self.target.name, self._failures)
                self._failures = 0
                self._audited_streak = False
                self.health.state = PushState.OK
                self.health.failing_since = None
                return result
            await self.sleep(self.backoff.delay(self._failures))

    async def _failed(self, exc: Exception, state: PushState, device_id: str | None) -> None:
        self._failures += 1
        self.health.failures += 1
        self.health.state = state
        self.health.last_error = str(exc)
        if self.health.failing_since is None:
            self.health.failing_since = self.health.clock()
        if state is PushState.UNAUTHORIZED:
            log.error(
                "push to %s REFUSED iotauth's credentials (%s): revocations are NOT reaching the broker; "
                "fix the API key or its role (attempt %d)",
                self.target.name, exc, self._failures,
            )
        elif self._failures in (1, 3) or self._failures % 20 == 0:
            log.warning("push to %s failed (%s), attempt %d; retrying", self.target.name, exc, self._failures)
        if (state is PushState.UNAUTHORIZED or self._failures >= 3) and not self._audited_streak:
            self._audited_streak = True
            try:  # the registry may be what is failing: auditing must not turn one failure into another
                await self._audit(EventKind.PUSH_FAILED, device_id, {"error": str(exc), "state": state.value})
            except (RegistryError, OSError) as audit_exc:
                log.warning("push to %s: could not audit the failure: %s", self.target.name, audit_exc)
                self._audited_streak = False

    async def _save(self) -> None:
        cursor = self._cursor or 0
        if cursor > self._saved:
            await self._retrying(partial(self.registry.save_follower_cursor, self.actor, cursor), None)
            self._saved = cursor
        self._saved_at = time.monotonic()

    async def _audit(self, kind: EventKind, device_id: str | None, data: dict[str, Any]) -> int:
        return await self.registry.record_event(
            kind, actor=self.actor, device_id=device_id, data={"target": self.target.name, **data}
        )


def _by_device(events: Sequence[AuditEvent]) -> dict[str, list[AuditEvent]]:
    """Each device's events, in feed order, devices in order of first appearance (events without one are dropped)."""
    grouped: dict[str, list[AuditEvent]] = {}
    for event in events:
        if event.device_id:
            grouped.setdefault(event.device_id, []).append(event)
    return grouped
