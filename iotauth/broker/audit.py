"""The broker's entries in the registry's hash-chained audit log.

Three kinds of write, with three policies:

* **Accepted CONNECT: group-committed behind the CONNACK, fail closed.**
  Accept records are queued and written in one transaction at most
  ``flush_interval`` (50 ms) later, together with everything else queued.
  Awaiting a commit per CONNECT would cost ~0.75 ms of broker CPU (six
  round trips to the SQLite thread and an fsync) -- more than the whole
  authorization budget -- and buy only the last 50 ms of records in a crash.
  What must hold is "never serve clients the broker cannot account for", so
  the audit trail is part of the admission decision instead: while audit
  writes fail or the queue backs up, :attr:`BrokerAudit.healthy` is false and
  the guard refuses new connects (CONNACK 0x03) exactly as for an unreadable
  registry. Deployments that want the record on disk *before* CONNACK set
  ``durable_accept`` (``--durable-accept-audit``) and pay the commit per connect.
* **Refused CONNECTs and limit breaches: aggregated, never dropped.** An
  unauthenticated client must not be able to make the broker wait on disk for
  it, nor thin out the trail by flooding: :class:`~iotauth.broker.ledger.DenialLedger`
  writes the first refusal per (fingerprint, reason, source) in full and then
  counts repeats, written with first/last times at a growing interval.
* **Kicks: queued the same way, never awaited, never aggregated.**
* **Denied PUBLISH / SUBSCRIBE / RECEIVE: aggregated in memory.** The per-packet
  path only bumps a counter (no I/O); every ``topic_interval`` (1 s) one event
  per (device, action, reason) is written with the count and the first
  offending topic.

Attacker-controlled strings (client ids, topics) are truncated before they are
stored; the audit log escapes them as JSON. Records are buffered and written
by the registry's shared :class:`~iotauth.registry.journal.EventJournal`; the
aggregation above is the broker's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iotauth.broker.ledger import DenialLedger
from iotauth.errors import JournalWriteFailed, RegistryError
from iotauth.registry.events import EventKind, topic_denied
from iotauth.registry.journal import EventJournal, EventWriter

log = logging.getLogger("iotauth.broker.audit")

MAX_QUEUE = 10_000
MAX_TEXT = 256


def clip(value: str | None, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[:limit] + "..."


def broker_actor() -> str:
    """Who writes the broker's events: this broker host (operators are named by ``authority.operator_actor``)."""
    return f"broker@{socket.gethostname()}"[:128]


@dataclass
class _TopicDenials:
    count: int = 0
    first_topic: str | None = None


@dataclass
class AuditStats:
    """What the broker decided, counted as it writes the records (read by metrics and benchmarks).

    ``refusals``: refused connects by reason; ``limits``: sessions closed for a
    limit or a protocol violation, by limit; ``kicks``: disconnects by reason;
    ``topic_denials``: denied PUBLISH/SUBSCRIBE/RECEIVE by (action, reason),
    moved here from the per-second aggregate when it is written (see
    :meth:`BrokerAudit.topic_denial_counts` for the live figure).
    """

    accepted: int = 0
    denied: int = 0
    kicked: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    limits: Counter[str] = field(default_factory=Counter)
    kicks: Counter[str] = field(default_factory=Counter)
    topic_denied: int = 0
    topic_denials: Counter[tuple[str, str]] = field(default_factory=Counter)
    lost: int = 0


class BrokerAudit:
    """Writes the broker's decisions to the audit log (see the module docstring for the policies)."""

    def __init__(
        self,
        writer: EventWriter,
        *,
        actor: str | None = None,
        flush_interval: float = 0.05,
        durable_accept: bool = False,
        topic_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = writer
        self.actor = actor or broker_actor()
        self._journal = EventJournal(writer, self.actor, "the broker's audit journal")
        self._clock = clock
        self.ledger = DenialLedger(clock=clock)
        self._flush_interval = flush_interval
        self._topics: dict[tuple[str, str, str], _TopicDenials] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False
        self._topic_interval = topic_interval
        self._topics_flushed = clock()
        self.durable_accept = durable_accept
        self.stats = AuditStats()

    @property
    def backlog(self) -> int:
        """Records queued for the next group commit."""
        return self._journal.backlog

    @property
    def healthy(self) -> bool:
        """False while audit writes fail or the queue is backed up: the broker then admits no one."""
        return not self._failing and self._journal.backlog < MAX_QUEUE // 2

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="iotauth-broker-audit")

    async def close(self) -> None:
        """Flush what is queued (best effort) and stop."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        await self.flush()

    async def accepted(self, device_id: str, data: dict[str, Any], timeout: float) -> None:  # noqa: ASYNC109
        """Record an accepted connect: queued, or committed before returning with ``durable_accept``.

        Raises:
            RegistryError: (``durable_accept`` only) the record was not committed within ``timeout``.
        """
        self.stats.accepted += 1
        if not self.durable_accept:
            self._enqueue(EventKind.BROKER_CONNECT_ACCEPTED, device_id, data)
            return

        async def op(tx: Any) -> None:
            tx.event(EventKind.BROKER_CONNECT_ACCEPTED, self.actor, device_id, data)

        try:
            await asyncio.wait_for(self._writer.write(op), timeout)
        except TimeoutError as exc:
            raise RegistryError(f"audit write did not complete within {timeout:g} s") from exc
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"audit write failed: {exc}") from exc

    def denied(self, reason: str, device_id: str | None, data: dict[str, Any]) -> bool:
        """Record a refused connect (aggregated, see the module docstring); ``True`` the first time for its key."""
        self.stats.denied += 1
        self.stats.refusals[reason] += 1
        return self.ledger.record(EventKind.BROKER_CONNECT_DENIED, reason, device_id, data)

    def limit_exceeded(self, kind: EventKind, reason: str, device_id: str, data: dict[str, Any]) -> bool:
        """Record a session closed for a limit or a protocol violation (aggregated like refusals)."""
        self.stats.limits[reason] += 1
        return self.ledger.record(kind, reason, device_id, data)

    def kicked(self, device_id: str, data: dict[str, Any]) -> None:
        self.stats.kicked += 1
        self.stats.kicks[str(data.get("reason"))] += 1
        self._enqueue(EventKind.BROKER_SESSION_KICKED, device_id, data)

    def event(self, kind: EventKind, device_id: str | None, data: dict[str, Any]) -> None:
        """Queue any other broker event (reloads, outages, start and stop)."""
        self._enqueue(kind, device_id, data)

    def topic_denied(self, device_id: str, action: str, reason: str, topic: str) -> None:
        """Count a denied PUBLISH/SUBSCRIBE/RECEIVE: memory only, written in aggregate at the next flush."""
        self.stats.topic_denied += 1
        key = (device_id, action, reason)
        entry = self._topics.get(key)
        if entry is None:
            entry = self._topics[key] = _TopicDenials(first_topic=clip(topic))
        entry.count += 1

    def topic_denial_counts(self) -> Counter[tuple[str, str]]:
        """Denied topic actions by (action, reason) so far: written ones plus the aggregate not yet written."""
        counts = Counter(self.stats.topic_denials)
        for (_device_id, action, reason), entry in self._topics.items():
            counts[(action, reason)] += entry.count
        return counts

    def _enqueue(self, kind: EventKind, device_id: str | None, data: dict[str, Any]) -> None:
        if self._journal.backlog >= MAX_QUEUE:
            self.stats.lost += 1
            log.error("audit queue full; dropping %s event", kind)
            return
        self._journal.record(kind, device_id, data)
        if self._journal.backlog >= 256:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            await self.flush()
            if self._closing:
                return

    async def flush(self) -> None:
        """Write everything queued and aggregated so far in one transaction."""
        now = self._clock()
        if self._topics and (self._closing or now - self._topics_flushed >= self._topic_interval):
            for (device_id, action, reason), entry in self._topics.items():
                self.stats.topic_denials[(action, reason)] += entry.count
                self._journal.record(
                    topic_denied(action), device_id,
                    {"reason": reason, "count": entry.count, "first_topic": entry.first_topic},
                )
            self._topics = {}
            self._topics_flushed = now
        for kind, subject, data in self.ledger.due(everything=self._closing):
            self._journal.record(kind, subject, data)
        if not self._journal.backlog:
            return
        try:
            await self._journal.flush(timeout=30.0)
        except JournalWriteFailed as exc:  # the registry is unwritable: say so loudly; the guard stops admitting
            self.stats.lost += exc.lost
            if not self._failing:
                log.error("could not write %d audit events (refusing new connections until it works): %s",
                          exc.lost, exc.__cause__ or exc)
            self._failing = True
            return
        if self._failing:
            log.warning("audit log writable again")
        self._failing = False
