"""Metrics of the export followers (``iotauth export rabbitmq --watch --metrics-bind``), read when scraped.

A follower keeps plain counters (:class:`~iotauth.export.rabbitmq_follow.FollowerStats`);
the collector here turns them into Prometheus families, and
:func:`iotauth.metrics.exporting` serves them while the follower runs. Another
follower (the managed Mosquitto one, the renewal service) adds its own the same
way: a function that reads its numbers, wrapped in
:class:`~iotauth.metrics.CallbackCollector`, passed to ``exporting``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from iotauth.export.rabbitmq_follow import RabbitmqFollower
from iotauth.metrics import CallbackCollector


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


__all__ = ["rabbitmq_follower_metrics"]
