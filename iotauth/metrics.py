"""Prometheus metrics for iotauth's long-running processes: read when scraped, served from the event loop.

Every process keeps its numbers as it already does: plain integers bumped on
the paths that count them (the broker's engine, admission control, audit
writer). A :class:`prometheus_client.registry.Collector` reads them when
Prometheus scrapes and ``prometheus_client`` writes the exposition format, so
metrics add no work to a PUBLISH or a CONNECT, and nothing here hand-writes
the format.

:class:`MetricsExporter` serves ``GET /metrics`` over plain HTTP from the
process's own event loop (uvicorn's HTTP protocol on a socket bound here), so
a scrape reads the counters on the thread that writes them: no locks, no
dictionary changing size under a reader. A process that wants metrics makes a
registry with :func:`new_registry` and calls :func:`start_exporter`; that is
the whole integration (``iotauth broker --metrics-bind``, ``iotauth export
rabbitmq --watch --metrics-bind``; ``iotauth serve`` adds ``/metrics`` to its
own application instead).

**Where it listens.** ``--metrics-bind PORT`` (or ``:PORT``) listens on
127.0.0.1 only; another interface must be named (``0.0.0.0:9108``). The
endpoint has no authentication and tells who connects, how often and which
devices are refused: keep it on loopback or a management network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from iotauth.config import parse_bind
from iotauth.errors import ConfigError
from iotauth.histogram import LATENCY_BUCKETS, LatencyHistogram

log = logging.getLogger("iotauth.metrics")

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 16
"""Concurrent scrape connections an exporter serves (more get a 503): Prometheus needs one or two."""


def metrics_bind(text: str) -> tuple[str, int]:
    """``PORT`` or ``:PORT``: loopback; ``HOST:PORT``: that host (``0.0.0.0:PORT`` for every interface)."""
    candidate = text.strip()
    if candidate.isdigit():
        candidate = f":{candidate}"
    host, port = parse_bind(candidate, 0)
    if candidate.startswith(":"):
        host = LOOPBACK
    if port == 0 and not candidate.endswith(":0"):
        raise ConfigError(f"bad metrics address {text!r}: give a port (PORT or HOST:PORT)")
    return host, port


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global one) with the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> Response:
    """The registry in the format the scraper asked for (Prometheus text, or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return Response(encoder(registry), media_type=None, headers={"Content-Type": content_type})


def histogram(observed: LatencyHistogram, name: str, documentation: str) -> HistogramMetricFamily:
    """A :class:`~iotauth.histogram.LatencyHistogram` as a Prometheus histogram."""
    return HistogramMetricFamily(name, documentation, buckets=observed.cumulative(), sum_value=observed.total)


def bounded_labels(counts: Iterable[tuple[str, int]], limit: int = 64) -> Iterator[tuple[str, int]]:
    """``(label, count)`` pairs, at most ``limit`` distinct labels; the rest summed as ``other``.

    Refusal reasons come from OpenSSL and the certificate checks, a finite set,
    but a label set must stay bounded whatever arrives.
    """
    ranked = sorted(counts, key=lambda pair: (-pair[1], pair[0]))
    yield from ranked[:limit]
    rest = sum(count for _label, count in ranked[limit:])
    if rest:
        yield "other", rest


class CallbackCollector:
    """A collector made of one function: the owner reads its numbers there (registries call ``collect``)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return list(self._read())

    def describe(self) -> Iterable[Metric]:
        return []


class _Server(uvicorn.Server):
    """uvicorn inside a process that owns its signals: SIGINT/SIGTERM stay the host process's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsExporter:
    """``GET /metrics`` over plain HTTP from the running event loop (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> tuple[str, int]:
        """Bind (a clear error if the address is taken or wrong) and serve in the background."""
        sock = _bind(self.host, self.port)
        self.address = (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
        app = Starlette(routes=[Route("/metrics", self._metrics, methods=["GET"])])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, server_header=False,
                                date_header=False, limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=15,
                                timeout_graceful_shutdown=2)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]),
                                                            name="iotauth-metrics")
        for _ in range(200):  # uvicorn binds nothing (the socket is ours); wait until it accepts
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            sock.close()
            self._task.result()
            raise ConfigError(f"metrics exporter on {self.host}:{self.port} stopped at once")
        if not _is_loopback(self.address[0]):
            log.warning("metrics on %s:%d are readable by anyone who can reach that address (no authentication)",
                        *self.address)
        return self.address

    async def _metrics(self, request: Request) -> Response:
        return exposition(self.registry, request.headers.get("accept"))

    async def close(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5.0)
        self._server = self._task = None


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen for metrics on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_exporter(registry: CollectorRegistry, bind: str) -> MetricsExporter:
    """Serve ``registry`` at ``http://<bind>/metrics`` until :meth:`MetricsExporter.close`."""
    host, port = metrics_bind(bind)
    exporter = MetricsExporter(registry, host, port)
    await exporter.start()
    log.info("metrics on http://%s:%d/metrics", *(exporter.address or (host, port)))
    return exporter


@contextlib.asynccontextmanager
async def exporting(bind: str | None, *collectors: Collector) -> AsyncIterator[MetricsExporter | None]:
    """Serve ``collectors`` (and the process's CPU and memory) on ``bind`` for the duration; nothing if ``None``.

    The one call a long-running command needs: ``async with exporting(metrics_bind, collector): await run()``.
    """
    if bind is None:
        yield None
        return
    exporter = await start_exporter(new_registry(*collectors), bind)
    try:
        yield exporter
    finally:
        await exporter.close()


def since(moment: float | None, now: Callable[[], float] = time.time) -> float:
    """Seconds from a wall-clock ``moment`` to now (0 when there is none yet)."""
    return 0.0 if moment is None else max(0.0, now() - moment)


__all__ = ["LATENCY_BUCKETS", "CallbackCollector", "MetricsExporter", "bounded_labels", "exporting", "exposition",
           "histogram", "metrics_bind", "new_registry", "since", "start_exporter"]

