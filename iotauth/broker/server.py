"""``iotauth broker``: the mTLS gate in front of iotauth's own MQTT engine.

:class:`Broker` wires the pieces together: the runtime (trust, settings,
registry, guard), the engine (:mod:`iotauth.broker.core`), and the gate's
listeners (:mod:`iotauth.broker.gate`). :func:`serve` runs one until SIGINT or
SIGTERM and reloads policies on SIGHUP.

amqtt is still available as a host for operators who embed iotauth in their
amqtt configuration (:mod:`iotauth.broker.amqtt_host`); the same gate and
guard stand in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from iotauth.broker.binding import Binding
from iotauth.broker.core.connection import start as start_connection
from iotauth.broker.core.engine import Engine
from iotauth.broker.gate import Gate, Host, Link
from iotauth.broker.guard import Guard
from iotauth.broker.mqtt import Connect
from iotauth.broker.runtime import BrokerOptions, Runtime, open_runtime
from iotauth.broker.tls import Receiver
from iotauth.config import parse_bind
from iotauth.errors import ConfigError
from iotauth.registry import EventKind, Registry

if TYPE_CHECKING:  # loaded only with --metrics-bind (prometheus_client, uvicorn)
    from iotauth.broker.core.engine import EngineStats
    from iotauth.broker.metrics import BrokerMetrics

log = logging.getLogger("iotauth.broker")


class EngineHost:
    """The gate's :class:`~iotauth.broker.gate.Host` for iotauth's engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def accept(self, link: Link, binding: Binding, connect: Connect) -> Receiver | None:
        return start_connection(self.engine, link, binding, connect)


class Broker:
    """iotauth's MQTT broker. See the module docstring."""

    def __init__(self, options: BrokerOptions, *, registry: Registry | None = None) -> None:
        self.options = options
        self._registry = registry
        self.runtime: Runtime | None = None
        self.engine: Engine | None = None
        self.gate: Gate | None = None
        self.metrics: BrokerMetrics | None = None

    @property
    def guard(self) -> Guard:
        if self.runtime is None:
            raise ConfigError("the broker is not started")
        return self.runtime.guard

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Where each listener listens (``mqtts``/``wss``/``metrics`` -> (host, port)); real ports even for 0."""
        return listening(self.gate, self.metrics)

    async def start(self) -> None:
        runtime = self.runtime = await open_runtime(self.options, self._registry)
        raise_file_limit()
        try:
            engine = self.engine = Engine(runtime.guard, runtime.session_limits)
            await runtime.guard.start(engine)
            self.gate = await open_gate(runtime, EngineHost(engine), self.options)
            self.metrics = await open_metrics(runtime, self.gate, self.options, engine.stats, "iotauth")
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        if self.gate is not None:
            await self.gate.close()
            self.gate = None
        if self.runtime is not None:
            self.runtime.guard.audit.event(EventKind.BROKER_STOPPED, None, {})
            await self.runtime.close()
            self.runtime = None

    def reload(self) -> bool:
        return self.runtime.reload() if self.runtime is not None else False


async def open_gate(runtime: Runtime, host: Host, options: BrokerOptions, engine: str = "iotauth") -> Gate:
    """The gate in front of ``host``, listening where ``options`` say (the caller closes it on failure)."""
    gate = Gate(runtime.guard, host, runtime.context, runtime.intake_limits)
    try:
        for listener, bind, default_port in (("mqtts", options.bind, 8883), ("wss", options.ws_bind, 8884)):
            if bind:
                address = await gate.listen(listener, *parse_bind(bind, default_port))
                log.info("listening (%s) on %s:%d", listener, *address)
    except BaseException:
        await gate.close()
        raise
    runtime.guard.audit.event(EventKind.BROKER_STARTED, None, {"engine": engine, "listeners": {
        name: f"{address_host}:{port}" for name, (address_host, port) in gate.addresses.items()}})
    return gate


async def open_metrics(runtime: Runtime, gate: Gate, options: BrokerOptions, stats: EngineStats | None,
                       engine: str) -> BrokerMetrics | None:
    """The metrics endpoint if ``--metrics-bind`` asks for one (prometheus_client is loaded only then)."""
    if not options.metrics_bind:
        return None
    from iotauth.broker.metrics import start_broker_metrics

    return await start_broker_metrics(options.metrics_bind, runtime, gate.throttle, stats, host=engine)


def listening(gate: Gate | None, metrics: BrokerMetrics | None) -> dict[str, tuple[str, int]]:
    """Where each listener listens (``mqtts``/``wss``/``metrics`` -> (host, port)); real ports even for 0."""
    found = dict(gate.addresses) if gate is not None else {}
    if metrics is not None and metrics.address is not None:
        found["metrics"] = metrics.address
    return found


def raise_file_limit() -> int:
    """Lift the soft open-files limit to the hard one: every session and every pending connection is a socket.

    Returns the limit, which caps how many connections the broker can hold at all; it is logged at start
    (raise the hard limit with the service manager, e.g. systemd's ``LimitNOFILE``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("open-files limit %d: at most that many connections, pending ones included", limit)
    return limit


@dataclass(frozen=True)
class Started:
    """What :func:`serve` reports once the listeners are up."""

    addresses: dict[str, tuple[str, int]]


class Runnable(Protocol):
    """A broker :func:`run` can drive (:class:`Broker`, or the amqtt host's ``IotAuthBroker``)."""

    @property
    def addresses(self) -> dict[str, tuple[str, int]]: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def reload(self) -> bool: ...


async def run(broker: Runnable, on_started: Callable[[Started], None] | None = None,
              stop: asyncio.Event | None = None) -> None:
    """Start ``broker`` and run it until SIGINT/SIGTERM (or ``stop``); SIGHUP reloads the policies."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    await broker.start()
    handled: list[signal.Signals] = []
    try:
        for signum, action in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set),
                               (signal.SIGHUP, broker.reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, action)
                handled.append(signum)
        if on_started is not None:
            on_started(Started(broker.addresses))
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await broker.shutdown()
        log.info("stopped")


async def serve(options: BrokerOptions, on_started: Callable[[Started], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run a :class:`Broker` (see :func:`run`)."""
    await run(Broker(options), on_started, stop)


__all__ = ["Broker", "BrokerOptions", "EngineHost", "Runnable", "Started", "run", "serve"]
