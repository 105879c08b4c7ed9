"""``iotauth renewer --metrics-bind``: the renewal service's numbers for Prometheus, read when scraped.

The renewer counts what it answers (:class:`~iotauth.rotation.renewer.RenewalCounts`), its MQTT
connection (:class:`~iotauth.rotation.service.LinkCounts`) and the operators' orders it follows; the
collector here turns them into Prometheus families and :func:`iotauth.metrics.exporting` serves them.

Labels are bounded and name no device: message types and results are fixed words, refusal codes are
the protocol's (:class:`~iotauth.errors.RefusalCode`, every one exported from the start so ``rate()``
sees the first refusal). Which device asked, and why it was refused, is in the audit log
(``rotation.refused``), not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from iotauth import __version__
from iotauth.errors import RefusalCode
from iotauth.metrics import CallbackCollector, histogram
from iotauth.rotation.renewer import IGNORED, REFUSED, UNREADABLE, Renewer

RESULTS = {"renew": ("issued", "reissued", REFUSED), "confirm": ("activated", REFUSED),
           UNREADABLE: (REFUSED, IGNORED)}
"""Every (type, result) pair a renewer can count, exported at 0 before the first."""


class Link(Protocol):
    """The MQTT connection's counts (:class:`~iotauth.rotation.service.LinkCounts`)."""

    @property
    def up(self) -> bool: ...
    @property
    def connects(self) -> int: ...
    @property
    def disconnects(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def subscribed(self) -> bool: ...
    @property
    def subscriptions_refused(self) -> int: ...


class Service(Protocol):
    """What the collector reads of :class:`~iotauth.rotation.service.RenewerService`."""

    @property
    def renewer(self) -> Renewer: ...
    @property
    def link_counts(self) -> Link: ...
    @property
    def queue(self) -> asyncio.Queue[Any]: ...
    @property
    def open_orders(self) -> set[str]: ...
    @property
    def orders_published(self) -> int: ...
    @property
    def orders_cleared(self) -> int: ...


def renewer_metrics(service: Service) -> CallbackCollector:
    """Requests by type and result, refusals by code, issuance latency, queue, orders, the MQTT connection."""

    def read() -> Iterator[Metric]:
        counts, link = service.renewer.counts, service.link_counts
        info = InfoMetricFamily("iotauth_renewer", "The renewal service's version.")
        info.add_metric([], {"version": __version__})
        yield info
        requests = CounterMetricFamily("iotauth_renewer_requests", "Messages on devices/+/rotation/request by type "
                                       "(renew, confirm, unreadable) and result (issued, reissued: a retry got its "
                                       "pending certificate again, activated, refused, ignored).",
                                       labels=["type", "result"])
        pairs = {(kind, result) for kind, results in RESULTS.items() for result in results} | set(counts.requests)
        for kind, result in sorted(pairs):
            requests.add_metric([kind, result], counts.requests.get((kind, result), 0))
        yield requests
        refusals = CounterMetricFamily("iotauth_renewer_refusals", "Requests refused, by the protocol's refusal "
                                       "code (the device and the reason are in the audit log).", labels=["code"])
        for code in sorted({c.value for c in RefusalCode} | set(counts.refusals)):
            refusals.add_metric([code], counts.refusals.get(code, 0))
        yield refusals
        yield histogram(counts.issuance, "iotauth_renewer_issuance_seconds", "Renewal requests answered with a "
                        "certificate: from taking the request up to the certificate signed and durably recorded.")
        yield GaugeMetricFamily("iotauth_renewer_queued_messages", "Messages received from the broker and not yet "
                                "decided.", value=service.queue.qsize())
        yield GaugeMetricFamily("iotauth_renewer_orders_open", "Operators' rotation orders open (published on the "
                                "devices' command topics, not yet closed by an activated renewal).",
                                value=len(service.open_orders))
        orders = CounterMetricFamily("iotauth_renewer_order_messages", "Retained messages on devices' "
                                     "commands/rotate topics: an order sent, or cleared after the renewal.",
                                     labels=["action"])
        orders.add_metric(["order"], service.orders_published)
        orders.add_metric(["clear"], service.orders_cleared)
        yield orders
        yield GaugeMetricFamily("iotauth_renewer_mqtt_connected", "1 while the renewer's MQTT session is up (it "
                                "answers nothing while 0).", value=int(link.up))
        yield GaugeMetricFamily("iotauth_renewer_mqtt_subscribed", "1 while the broker grants the renewer its "
                                "subscription to devices/+/rotation/request (it reads nothing while 0).",
                                value=int(link.subscribed))
        yield CounterMetricFamily("iotauth_renewer_mqtt_subscriptions_refused", "Subscriptions to the request topics "
                                  "the broker refused (the renewer profile's rights, or a managed Mosquitto that has "
                                  "not yet given a new renewer certificate its role).",
                                  value=link.subscriptions_refused)
        yield CounterMetricFamily("iotauth_renewer_mqtt_connects", "Sessions the broker accepted.",
                                  value=link.connects)
        yield CounterMetricFamily("iotauth_renewer_mqtt_disconnects", "Sessions lost (paho reconnects).",
                                  value=link.disconnects)
        yield CounterMetricFamily("iotauth_renewer_mqtt_refused", "CONNACKs refusing the renewer (its certificate "
                                  "unknown to that broker's registry, or revoked).", value=link.refused)

    return CallbackCollector(read)


__all__ = ["renewer_metrics"]
