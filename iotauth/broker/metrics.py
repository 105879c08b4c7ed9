"""``iotauth broker --metrics-bind``: the broker's numbers for Prometheus, read at scrape time.

:class:`BrokerCollector` reads what the broker already counts (the engine's
:class:`~iotauth.broker.core.engine.EngineStats`, admission control's
:class:`~iotauth.broker.throttle.ThrottleStats`, the audit writer's
:class:`~iotauth.broker.audit.AuditStats`, the feed follower's position) when
Prometheus scrapes, on the broker's event loop; nothing is added to the
CONNECT or PUBLISH paths. The one thing that costs a query, the certificate
expiry horizon, is read by :class:`FleetWatch` every few minutes and cached
(a scrape never touches the registry).

Label values are bounded: connect refusal reasons are the gate's and the
certificate checks' fixed names (at most 64 distinct, the rest ``other``),
topic denials are grouped into a handful of reasons, profiles come from
``iotauth.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from iotauth import __version__
from iotauth.broker.core.engine import EngineStats
from iotauth.broker.guard import Guard
from iotauth.broker.runtime import Runtime
from iotauth.broker.throttle import Refusal, Throttle
from iotauth.certs import TIMESTAMP_FORMAT, now_utc
from iotauth.errors import IotAuthError
from iotauth.metrics import MetricsExporter, bounded_labels, histogram, new_registry, since, start_exporter
from iotauth.registry.fleet import FleetSummary

log = logging.getLogger("iotauth.broker.metrics")

FLEET_INTERVAL = 300.0
"""Seconds between two reads of the certificate expiry horizon (one query over every active certificate)."""

SCOPES: dict[Refusal, str] = {
    Refusal.ADDRESS: "address",
    Refusal.RATE: "address",
    Refusal.NETWORK: "network",
    Refusal.TOTAL: "total",
    Refusal.EVICTED: "total",
    Refusal.QUEUE_TIMEOUT: "deadline",
    Refusal.HANDSHAKE_TIMEOUT: "deadline",
    Refusal.CONNECT_TIMEOUT: "deadline",
}
"""Which source class a pre-authentication limit hit belongs to: one address (or IPv6 /64), a /24 or /64
network, the broker's total, or a deadline."""


def topic_denial_reason(reason: str) -> str:
    """A few stable names for the guard's denial texts (see ``SessionPolicy.denial_reason``)."""
    if reason.startswith("malformed"):
        return "malformed"
    if reason.startswith("system topics"):
        return "system-topic"
    if reason.startswith(("no ", "filter is not covered")):
        return "not-allowed"
    if reason.startswith("unknown action"):
        return "unknown-action"
    return "session-revoked"  # the binding's revocation reason: certificate-revoked, device-suspended...


class SummarySource(Protocol):
    async def summary(self, now: datetime) -> FleetSummary: ...


class FleetWatch:
    """Reads the fleet summary (devices by status, expiring within 7 and 30 days) every ``interval`` seconds."""

    def __init__(self, registry: SummarySource, interval: float = FLEET_INTERVAL,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.registry = registry
        self.interval = interval
        self.clock = clock
        self.latest: FleetSummary | None = None
        self.failures = 0

    async def refresh(self) -> None:
        try:
            self.latest = await asyncio.wait_for(self.registry.summary(self.clock()), 60.0)
        except (IotAuthError, TimeoutError, OSError) as exc:
            self.failures += 1
            log.warning("could not read the certificate expiry horizon: %s", exc)

    async def run(self, first_after: float = 0.0) -> None:
        await asyncio.sleep(first_after)
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)


@dataclass
class BrokerParts:
    """What the collector reads; ``engine`` is None behind the amqtt host (it keeps no message counters)."""

    guard: Guard
    throttle: Throttle
    engine: EngineStats | None
    fleet: FleetWatch
    host: str


class BrokerCollector:
    """A ``prometheus_client`` collector over a running broker (see the module docstring)."""

    def __init__(self, parts: BrokerParts, clock: Callable[[], float] = time.time) -> None:
        self.parts = parts
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        parts = self.parts
        guard, audit = parts.guard, parts.guard.audit
        stats = audit.stats
        info = InfoMetricFamily("iotauth_broker", "The broker's version and MQTT engine.")
        info.add_metric([], {"version": __version__, "engine": parts.host})
        yield info
        yield _counter("iotauth_broker_connects_accepted", "Connections admitted (CONNACK 0).", stats.accepted)
        denied = CounterMetricFamily("iotauth_broker_connects_denied", "Connections refused, by reason "
                                     "(TLS, certificate, registry, client id, admission control).", labels=["reason"])
        for reason, count in bounded_labels(stats.refusals.items()):
            denied.add_metric([reason], count)
        yield denied
        yield from self._sessions()
        yield from self._messages()
        yield from self._limits()
        yield histogram(guard.revocation_latency, "iotauth_broker_revocation_disconnect_seconds",
                        "Seconds from the registry event that revoked or suspended a device to its disconnect.")
        yield from self._registry()
        yield from self._preauth()
        yield from self._fleet()

    def _sessions(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("iotauth_broker_sessions", "Sessions held, by profile and whether their "
                                     "device is connected.", labels=["profile", "state"])
        counts: dict[tuple[str, str], int] = {}
        for binding in self.parts.guard.sessions():
            if binding.revoked is None:
                key = (binding.admission.profile, "connected" if binding.connected else "offline")
                counts[key] = counts.get(key, 0) + 1
        for (profile, state), count in sorted(counts.items()):
            sessions.add_metric([profile, state], count)
        yield sessions

    def _messages(self) -> Iterator[Metric]:
        engine = self.parts.engine
        if engine is not None:
            yield _counter("iotauth_broker_messages_received", "PUBLISH packets accepted from devices.",
                           engine.messages_in)
            yield _counter("iotauth_broker_messages_sent", "PUBLISH packets delivered to devices.",
                           engine.messages_out)
            yield _counter("iotauth_broker_messages_dropped", "Messages dropped (QoS 0 to a busy or offline "
                           "session, a full offline queue).", engine.dropped)
        denied = CounterMetricFamily("iotauth_broker_topic_denied", "PUBLISH, SUBSCRIBE and delivery (receive) "
                                     "refused by the topic policy, by action and reason.", labels=["action", "reason"])
        grouped: dict[tuple[str, str], int] = {}
        for (action, reason), count in self.parts.guard.audit.topic_denial_counts().items():
            key = (action, topic_denial_reason(reason))
            grouped[key] = grouped.get(key, 0) + count
        for (action, reason), count in sorted(grouped.items()):
            denied.add_metric([action, reason], count)
        yield denied

    def _limits(self) -> Iterator[Metric]:
        stats = self.parts.guard.audit.stats
        limits = CounterMetricFamily("iotauth_broker_session_limit_closes", "Sessions closed for breaking a limit "
                                     "or the protocol, by limit.", labels=["limit"])
        for limit, count in bounded_labels(stats.limits.items()):
            limits.add_metric([limit], count)
        yield limits
        kicks = CounterMetricFamily("iotauth_broker_disconnects", "Connections the broker closed on the registry's "
                                    "word or the clock (revoked, suspended, expired, registry unavailable), by reason.",
                                    labels=["reason"])
        for reason, count in bounded_labels(stats.kicks.items()):
            kicks.add_metric([reason], count)
        yield kicks

    def _registry(self) -> Iterator[Metric]:
        guard, now = self.parts.guard, self.clock()
        feed, audit = guard.feed, guard.audit
        yield _gauge("iotauth_broker_registry_up", "1 while the registry's change feed can be read (else new "
                     "connects are refused).", 1 if guard.healthy else 0)
        yield _gauge("iotauth_broker_feed_cursor", "Id of the last registry event applied.", feed.cursor)
        applied = _wall(feed.last_applied_ts)
        lag = 0.0 if feed.caught_up or applied is None else max(0.0, now - applied)
        yield _gauge("iotauth_broker_feed_lag_seconds", "How far behind the registry the broker is: 0 when its "
                     "last read reached the end of the feed, else now minus the time of the last event applied.", lag)
        yield _gauge("iotauth_broker_feed_last_read_age_seconds", "Seconds since the change feed was last read "
                     "successfully.", since(feed.last_read, self.clock))
        if applied is not None:
            yield _gauge("iotauth_broker_feed_last_event_timestamp_seconds", "Registry time of the last event "
                         "applied (Unix seconds).", applied)
        yield _gauge("iotauth_broker_audit_up", "1 while audit records can be written (else new connects are "
                     "refused).", 1 if audit.healthy else 0)
        yield _gauge("iotauth_broker_audit_backlog", "Audit records waiting for the next group commit.",
                     audit.backlog)
        yield _counter("iotauth_broker_audit_lost", "Audit records that could not be written.", audit.stats.lost)

    def _preauth(self) -> Iterator[Metric]:
        throttle = self.parts.throttle
        pending = GaugeMetricFamily("iotauth_broker_preauth_pending", "Connections not yet authenticated, by phase "
                                    "(queued unread, TLS handshake, waiting for CONNECT).", labels=["phase"])
        for phase, count in throttle.by_phase().items():
            pending.add_metric([phase.value], count)
        yield pending
        hits = CounterMetricFamily("iotauth_broker_preauth_limit_hits", "Connections closed by admission control "
                                   "before authentication, by limit and source class.", labels=["reason", "scope"])
        for reason in Refusal:
            hits.add_metric([reason.value, SCOPES[reason]], throttle.stats.refused.get(reason.value, 0))
        yield hits
        yield _counter("iotauth_broker_preauth_admitted", "Connections that authenticated and left admission "
                       "control.", throttle.stats.admitted)

    def _fleet(self) -> Iterator[Metric]:
        fleet = self.parts.fleet.latest
        yield _counter("iotauth_registry_summary_failures", "Failed reads of the fleet summary.",
                       self.parts.fleet.failures)
        if fleet is None:
            return
        devices = GaugeMetricFamily("iotauth_registry_devices", "Devices in the registry by status.",
                                    labels=["status"])
        for status, count in fleet.devices.items():
            devices.add_metric([status], count)
        yield devices
        expiring = GaugeMetricFamily("iotauth_registry_devices_expiring", "Active devices whose newest active "
                                     "certificate ends within the given number of days.", labels=["within_days"])
        for days, count in fleet.expiring.items():
            expiring.add_metric([str(days)], count)
        yield expiring
        yield _gauge("iotauth_registry_devices_lapsed", "Active devices without an unexpired active certificate.",
                     fleet.lapsed)
        yield _gauge("iotauth_registry_summary_timestamp_seconds", "When the fleet summary was read (Unix seconds).",
                     fleet.at.timestamp())


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _wall(ts: str | None) -> float | None:
    if ts is None:
        return None
    try:
        return datetime.strptime(ts, TIMESTAMP_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class BrokerMetrics:
    """The exporter and the fleet watch of one running broker."""

    def __init__(self, exporter: MetricsExporter, task: asyncio.Task[None]) -> None:
        self.exporter = exporter
        self._task = task

    @property
    def address(self) -> tuple[str, int] | None:
        return self.exporter.address

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.exporter.close()


async def start_broker_metrics(bind: str, runtime: Runtime, throttle: Throttle, engine: EngineStats | None, *,
                               host: str, fleet_interval: float = FLEET_INTERVAL) -> BrokerMetrics:
    """Serve the broker's metrics on ``bind`` and keep the expiry horizon fresh."""
    fleet = FleetWatch(runtime.registry, fleet_interval)
    await fleet.refresh()
    parts = BrokerParts(runtime.guard, throttle, engine, fleet, host)
    exporter = await start_exporter(new_registry(BrokerCollector(parts)), bind)
    task = asyncio.get_running_loop().create_task(fleet.run(first_after=fleet_interval), name="iotauth-fleet-watch")
    return BrokerMetrics(exporter, task)


__all__ = ["SCOPES", "BrokerCollector", "BrokerMetrics", "BrokerParts", "FleetWatch", "start_broker_metrics",
           "topic_denial_reason"]
