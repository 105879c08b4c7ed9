"""Metrics of the export followers, read when scraped.

``iotauth export rabbitmq --watch --metrics-bind`` and ``iotauth mosquitto follow --metrics-bind``: each
follower keeps plain counters (:class:`~iotauth.export.rabbitmq_follow.FollowerStats`,
:class:`~iotauth.export.managed.stats.FollowerStats`); the collectors here turn them into Prometheus
families, and :func:`iotauth.metrics.exporting` serves them while the follower runs. (The renewal
service does the same in :mod:`iotauth.rotation.metrics`.)

Labels are bounded and name no device: kick causes are the registry events' reasons and the
follower's own few, syncs are ``created``/``changed``, reconcile triggers and failure kinds are
fixed words. Which device was kicked is in the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from iotauth.export.managed.follower import MosquittoFollower
from iotauth.export.rabbitmq_follow import RabbitmqFollower
from iotauth.metrics import CallbackCollector, since
from iotauth.registry.events import MOSQUITTO_KICKS

MOSQUITTO_CAUSES = (*sorted(set(MOSQUITTO_KICKS.values())), "device-not-active", "reconcile", "crl-now-in-force")
"""Every reason the Mosquitto follower closes a session for, exported at 0 before the first."""
MOSQUITTO_FAILURES = ("mosquitto-unavailable", "control-error", "registry")


def rabbitmq_follower_metrics(follower: RabbitmqFollower) -> CallbackCollector:
    """The RabbitMQ follower's kicks, failures, owed kicks, CRL rewrites and cursor."""

    def read() -> Iterator[Metric]:
        stats = follower.stats
        kicks = CounterMetricFamily("iotauth_rabbitmq_kicks", "Devices whose connections the follower closed "
                                    "cluster-wide, by cause (event, replay, retry, sweep).", labels=["cause"])
        for cause in ("event", "replay", "retry", "sweep", *sorted(set(stats.kicks) - {"event", "replay", "retry",
                                                                                       "sweep"})):
            kicks.add_metric([cause], stats.kicks.get(cause, 0))
        yield kicks
        yield CounterMetricFamily("iotauth_rabbitmq_kick_failures", "Kicks no management API carried out "
                                  "(retried; audited as rabbitmq.kick.failed).", value=stats.kick_failures)
        yield GaugeMetricFamily("iotauth_rabbitmq_kicks_owed", "Devices whose kick failed and is still owed.",
                                value=len(follower.pending))
        yield CounterMetricFamily("iotauth_rabbitmq_crl_writes", "CRL directory rewrites.", value=stats.crl_writes)
        yield GaugeMetricFamily("iotauth_rabbitmq_cursor", "Registry event id up to which every kick is done.",
                                value=stats.cursor)
        yield GaugeMetricFamily("iotauth_rabbitmq_last_kick_timestamp_seconds", "When the follower last closed a "
                                "device's connections (Unix seconds; 0 before the first).", value=stats.last_kick or 0)
        yield GaugeMetricFamily("iotauth_rabbitmq_last_crl_timestamp_seconds", "When the CRL directory was last "
                                "rewritten (Unix seconds).", value=stats.last_crl or 0)

    return CallbackCollector(read)


def mosquitto_follower_metrics(follower: MosquittoFollower) -> CallbackCollector:
    """The managed-Mosquitto follower's kicks, syncs, CRLs, reconciles, failures and change-feed lag."""

    def read() -> Iterator[Metric]:
        stats, now = follower.stats, time.time()
        kicks = CounterMetricFamily("iotauth_mosquitto_kicks", "Sessions the follower closed in Mosquitto (kicked, "
                                    "or withdrawn: kicked and the client deleted), by cause: the registry event's "
                                    "reason, device-not-active, reconcile, crl-now-in-force.", labels=["cause"])
        for cause in sorted({*MOSQUITTO_CAUSES, *stats.kicks}):
            kicks.add_metric([cause], stats.kicks.get(cause, 0))
        yield kicks
        yield GaugeMetricFamily("iotauth_mosquitto_last_kick_timestamp_seconds", "When the follower last closed a "
                                "session (Unix seconds; 0 before the first).", value=stats.last_kick or 0)
        syncs = CounterMetricFamily("iotauth_mosquitto_device_syncs", "Devices whose dynamic-security client and "
                                    "role the follower created or changed.", labels=["action"])
        for action in sorted({"created", "changed", *stats.syncs}):
            syncs.add_metric([action], stats.syncs.get(action, 0))
        yield syncs
        yield CounterMetricFamily("iotauth_mosquitto_control_commands", "Dynamic-security commands sent to "
                                  "Mosquitto's control topic.", value=follower.control.commands)
        yield GaugeMetricFamily("iotauth_mosquitto_control_up", "1 while the follower is connected to Mosquitto's "
                                "control listener.", value=int(follower.control.ready))
        reconciles = CounterMetricFamily("iotauth_mosquitto_reconciles", "Full comparisons of Mosquitto with the "
                                         "registry, by trigger.", labels=["trigger"])
        for trigger, count in sorted(stats.reconciles.items()):
            reconciles.add_metric([trigger], count)
        yield reconciles
        yield CounterMetricFamily("iotauth_mosquitto_rebuilds", "Mosquitto state files rewritten from the registry "
                                  "(Mosquitto had lost iotauth's state, or a change too large for its control API).",
                                  value=stats.rebuilds)
        failures = CounterMetricFamily("iotauth_mosquitto_failures", "Units of work that failed and are retried, "
                                       "by kind.", labels=["kind"])
        for kind in sorted({*MOSQUITTO_FAILURES, *stats.failures}):
            failures.add_metric([kind], stats.failures.get(kind, 0))
        yield failures
        yield CounterMetricFamily("iotauth_mosquitto_crl_writes", "CRLs published to Mosquitto (signed, written, "
                                  "reloaded).", value=stats.crl_writes)
        yield CounterMetricFamily("iotauth_mosquitto_crl_unproven", "CRLs Mosquitto was not seen enforcing (its "
                                  "canary not refused): revocation may be off until one is.", value=stats.crl_unproven)
        yield GaugeMetricFamily("iotauth_mosquitto_last_crl_timestamp_seconds", "When the CRL was last published "
                                "(Unix seconds).", value=stats.last_crl or 0)
        yield GaugeMetricFamily("iotauth_mosquitto_feed_lag_seconds", "How far behind the registry the follower is: 0 "
                                "when its last read reached the end of the feed, else the age of the oldest event not "
                                "yet applied.", value=stats.lag(now))
        yield GaugeMetricFamily("iotauth_mosquitto_feed_last_read_age_seconds", "Seconds since the change feed was "
                                "last read.", value=since(stats.last_read, lambda: now))
        yield GaugeMetricFamily("iotauth_mosquitto_cursor", "Registry event id up to which Mosquitto is in step.",
                                value=follower.cursor.position)

    return CallbackCollector(read)


__all__ = ["mosquitto_follower_metrics", "rabbitmq_follower_metrics"]
