"""``iotauth serve``'s ``/metrics``: decisions by endpoint and result, request latency, the revocation pushes.

* **Decisions.** Each broker-facing front end (EMQX in :mod:`iotauth.http.emqx`,
  mosquitto-go-auth in :mod:`iotauth.http.brokers`, RabbitMQ in
  :mod:`iotauth.http.rabbitmq`) says what it answered with :func:`decided`;
  :class:`MetricsMiddleware` counts it once the response is sent, labelled with
  the route's path template (``/emqx/authz``), so the label set is the route
  table, whatever paths arrive. Results: ``allow``, ``deny``, ``error`` (bad
  input or a failure, answered as a deny) and ``outside-networks`` (the caller
  is not on ``[serve] broker_networks``).
* **Latency.** Every request's time in the application, by route, as a
  histogram.
* **Pushes.** The EMQX push follower's state, cursor, deliveries, failures
  and the time of its last successful push, read from its health record when
  scraped.

``/metrics`` answers only ``[serve] metrics_networks`` (loopback by default;
``[]`` answers nobody), judged like the broker endpoints by the TCP peer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from typing import Protocol

from prometheus_client import Counter, Histogram, Info
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from iotauth import __version__
from iotauth.metrics import LATENCY_BUCKETS, exposition, new_registry

DECISION_KEY = "iotauth.decision"
UNMATCHED = "unmatched"


class Result(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ERROR = "error"
    OUTSIDE_NETWORKS = "outside-networks"


def decided(request: Request, result: Result) -> None:
    """Record what a broker-facing endpoint answered (counted by :class:`MetricsMiddleware`)."""
    request.scope[DECISION_KEY] = result


class PushStatus(Protocol):
    """What ``/healthz`` and ``/metrics`` read of a push follower (``PushHealth``)."""

    @property
    def healthy(self) -> bool: ...

    def as_dict(self) -> dict[str, object]: ...


class ServeMetrics:
    """The service's registry: its own counters and histogram, and a collector over the pushes."""

    def __init__(self, pushes: Callable[[], Sequence[PushStatus]] = list) -> None:
        self.registry = new_registry()
        Info("iotauth_serve", "iotauth serve's version.", registry=self.registry).info({"version": __version__})
        self.decisions = Counter("iotauth_serve_decisions", "Answers of the broker-facing endpoints, by endpoint "
                                 "and result.", ["endpoint", "result"], registry=self.registry)
        self.latency = Histogram("iotauth_serve_request_duration_seconds", "Time from request to response in "
                                 "iotauth serve, by route.", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.registry.register(PushCollector(pushes))

    def observe(self, endpoint: str, seconds: float, decision: object) -> None:
        self.latency.labels(endpoint).observe(seconds)
        if isinstance(decision, Result):
            self.decisions.labels(endpoint, decision.value).inc()


class PushCollector:
    """The revocation pushes' health records as metrics (read when scraped)."""

    STATES = ("starting", "ok", "retrying", "unauthorized", "stopped")

    def __init__(self, pushes: Callable[[], Sequence[PushStatus]]) -> None:
        self._pushes = pushes

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("iotauth_push_up", "1 while the revocation push to the target is healthy.",
                               labels=["target"])
        state = GaugeMetricFamily("iotauth_push_state", "The push's state (1 for the current one).",
                                  labels=["target", "state"])
        cursor = GaugeMetricFamily("iotauth_push_cursor", "Id of the last registry event delivered.",
                                   labels=["target"])
        last = GaugeMetricFamily("iotauth_push_last_success_timestamp_seconds", "When the push last delivered "
                                 "to the target (Unix seconds; 0 before the first delivery).", labels=["target"])
        delivered = CounterMetricFamily("iotauth_push_delivered", "Devices whose revocation state reached the "
                                        "target.", labels=["target"])
        failures = CounterMetricFamily("iotauth_push_failures", "Failed attempts (the target unreachable, 5xx, "
                                       "credentials refused), retried.", labels=["target"])
        rejected = CounterMetricFamily("iotauth_push_rejected", "Requests the target refused for good (skipped, "
                                       "audited).", labels=["target"])
        for push in self._pushes():
            data = push.as_dict()
            target = str(data.get("target"))
            up.add_metric([target], 1 if push.healthy else 0)
            for name in self.STATES:
                state.add_metric([target, name], 1 if data.get("state") == name else 0)
            cursor.add_metric([target], _number(data.get("cursor")))
            last.add_metric([target], _number(data.get("last_success")))
            delivered.add_metric([target], _number(data.get("delivered")))
            failures.add_metric([target], _number(data.get("failures")))
            rejected.add_metric([target], _number(data.get("rejected")))
        yield from (up, state, cursor, last, delivered, failures, rejected)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


class MetricsMiddleware:
    """Times every request and counts the decision its endpoint recorded (pure ASGI: it never reads bodies)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe(endpoint, time.perf_counter() - started, scope.get(DECISION_KEY))


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` for ``[serve] metrics_networks`` only."""
    state = request.app.state.iotauth
    host = request.client.host if request.client else None
    if not state.access.metrics_allowed(host):
        return PlainTextResponse("metrics are served only to [serve] metrics_networks\n", status_code=403)
    return exposition(state.metrics.registry, request.headers.get("accept"))


__all__ = ["DECISION_KEY", "MetricsMiddleware", "PushCollector", "Result", "ServeMetrics", "decided",
           "metrics_endpoint"]

