"""The amqtt plugin: configuration in amqtt's own style, and the thin auth/topic adapter.

Load it like any amqtt plugin, by dotted path with a table of options that
fills the nested :class:`IotAuthPlugin.Config` dataclass (amqtt checks it with
dacite, strictly)::

    config = {
        "listeners": {"default": {"type": "external"}},
        "plugins": {
            "iotauth.broker.IotAuthPlugin": {
                "home": "/var/lib/iotauth",
                "bind": "0.0.0.0:8883",
                "ws_bind": None,
                "fail_open": False,
            },
            # your own plugins may follow; their verdicts are AND-ed with iotauth's
        },
    }
    broker = iotauth.broker.IotAuthBroker(config)   # not amqtt.broker.Broker

Use :class:`~iotauth.broker.server.IotAuthBroker`, not ``amqtt.broker.Broker``:
a stock broker cannot authenticate safely (see :mod:`iotauth.broker.gate`), so
under one this plugin refuses every connection and every topic (it fails
closed) and says why in the log.

The plugin itself decides nothing: :meth:`authenticate` attaches the gate's
admission for *this* connection (from :data:`~iotauth.broker.guard.ADMISSION`)
to the session; :meth:`topic_filtering` asks that binding's compiled policy.
Both answer ``False``, never ``None``, when in doubt: amqtt ignores ``None``
from an auth plugin.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from cryptography import x509

from iotauth.broker.audit import BrokerAudit
from iotauth.broker.binding import ADMISSION, Binding, GuardOptions
from iotauth.broker.gate import GateOptions, server_context
from iotauth.broker.guard import Guard, stop_task
from iotauth.castore import client_verifier
from iotauth.config import Home, load_settings, registry_location
from iotauth.errors import ConfigError
from iotauth.policy import PolicySet
from iotauth.registry import Registry, open_registry

log = logging.getLogger("iotauth.broker")
BINDING_KEY = "iotauth.binding"


def binding_of(session: Session | None) -> Binding | None:
    if session is None:
        return None
    value = session.attributes.get(BINDING_KEY)
    return value if isinstance(value, Binding) else None


def load_policies(home: Home) -> PolicySet:
    """Parse and check every profile's topic rules from ``iotauth.toml`` (ConfigError if any is bad)."""
    return PolicySet.from_profiles(load_settings(home).profiles.values())


class _CrlSerials:
    """Serials on the published CRL file, re-read when it changes (used only by ``fail_open``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[str] = frozenset()

    def __call__(self) -> Collection[str]:
        try:
            stat = self._path.stat()
        except OSError:
            return self._serials
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                crl = x509.load_der_x509_crl(self._path.read_bytes())
                self._serials = frozenset(format(entry.serial_number, "x") for entry in crl)
                self._stamp = stamp
            except (OSError, ValueError) as exc:
                log.error("cannot read CRL %s: %s", self._path, exc)
        return self._serials


@dataclass
class Runtime:
    """Everything a running iotauth broker holds: built by :meth:`IotAuthPlugin.open`."""

    home: Home
    registry: Registry
    owns_registry: bool
    guard: Guard
    context: ssl.SSLContext
    gate_options: GateOptions
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.tasks:
            await stop_task(task)
        await self.guard.close()
        if self.owns_registry:
            await self.registry.close()


class IotAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Authentication and topic authorization for :class:`~iotauth.broker.server.IotAuthBroker`."""

    @dataclass
    class Config:
        """Options, as written under the plugin's key in an amqtt config.

        Attributes:
            home: the iotauth home (CA, ``iotauth.toml``, registry); default ``$IOTAUTH_HOME``.
            registry: registry URL; default ``$IOTAUTH_REGISTRY`` or the home's SQLite file.
            bind: ``HOST:PORT`` of the MQTT-over-TLS listener (the gate). ``None`` disables it.
            ws_bind: ``HOST:PORT`` of the secure WebSocket listener, or ``None``.
            fail_open: DANGEROUS: admit certificate-valid clients when the registry is
                unreadable (see :class:`~iotauth.broker.guard.GuardOptions`).
            poll_interval: seconds between registry change-feed polls.
            registry_timeout: bound on each registry read and on the accept audit write.
            registry_grace: seconds live sessions survive a registry outage before the
                broker fails closed and drops them.
            sweep_interval: seconds between wall-clock expiry sweeps.
            connect_timeout: seconds a client has to send CONNECT after TLS.
            handshake_timeout: seconds a client has to complete the TLS handshake.
            max_connect_bytes: largest CONNECT accepted.
            watch_config: seconds between checks of ``iotauth.toml`` for changes (0: SIGHUP only).
            durable_accept: commit each accept record to the audit log before CONNACK
                (costs one commit per connect; by default records are group-committed
                within 50 ms and the broker stops admitting while they cannot be written).
        """

        home: str | None = None
        registry: str | None = None
        bind: str | None = "0.0.0.0:8883"
        ws_bind: str | None = None
        fail_open: bool = False
        poll_interval: float | int = 0.05
        registry_timeout: float | int = 2.0
        registry_grace: float | int = 10.0
        sweep_interval: float | int = 30.0
        connect_timeout: float | int = 10.0
        handshake_timeout: float | int = 10.0
        max_connect_bytes: int = 65_536
        watch_config: float | int = 1.0
        durable_accept: bool = False

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.runtime: Runtime | None = None
        self._warned = False

    @property
    def options(self) -> IotAuthPlugin.Config:
        config = self.context.config
        if not isinstance(config, IotAuthPlugin.Config):  # loaded some other way: refuse to guess
            raise ConfigError("IotAuthPlugin must be configured through amqtt's 'plugins' table")
        return config

    async def open(self, registry: Registry | None = None) -> Runtime:
        """Load trust material, policies and the registry; build the guard."""
        if self.runtime is not None:
            return self.runtime
        options = self.options
        home = Home.resolve(options.home)
        home.require_initialised()
        settings = load_settings(home)
        policies = PolicySet.from_profiles(settings.profiles.values())
        verifier = client_verifier(home, settings)
        context = server_context(home.server_cert, home.server_key, home.chain_file)
        owns = registry is None
        if registry is None:
            registry = await open_registry(registry_location(home, options.registry))
        guard_options = GuardOptions(
            fail_open=options.fail_open,
            poll_interval=float(options.poll_interval),
            registry_timeout=float(options.registry_timeout),
            registry_grace=float(options.registry_grace),
            sweep_interval=float(options.sweep_interval),
        )
        guard = Guard(
            registry=registry,
            verifier=verifier,
            policies=policies,
            audit=BrokerAudit(registry, durable_accept=options.durable_accept),
            options=guard_options,
            load_policies=lambda: load_policies(home),
            revoked_serials=_CrlSerials(home.crl_der),
        )
        gate_options = GateOptions(
            handshake_timeout=float(options.handshake_timeout),
            connect_timeout=float(options.connect_timeout),
            max_connect_bytes=options.max_connect_bytes,
        )
        self.runtime = Runtime(home, registry, owns, guard, context, gate_options)
        if options.watch_config > 0:
            self.runtime.tasks.append(asyncio.get_running_loop().create_task(
                _watch(home.config_file, float(options.watch_config), guard), name="iotauth-config-watch"))
        if options.fail_open:
            log.warning("running with --fail-open: if the registry cannot be read, revoked devices may connect")
        return self.runtime

    async def close(self) -> None:
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            await runtime.close()

    async def authenticate(self, *, session: Session) -> bool | None:
        binding = ADMISSION.get()
        if binding is None or self.runtime is None:
            if not self._warned:
                self._warned = True
                log.error("refusing a connection that did not come through the iotauth gate: "
                          "run iotauth.broker.IotAuthBroker, not amqtt.broker.Broker")
            return False
        will_topic = session.will_topic if session.will_flag else None
        if not self.runtime.guard.attach(binding, session, session.client_id, will_topic):
            return False
        previous = binding_of(session)  # a resumed persistent session: its old binding is done
        if previous is not None and previous is not binding:
            previous.cancel_timer()
        session.attributes[BINDING_KEY] = binding
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        binding = binding_of(session)
        if binding is None or topic is None or action is None:
            return False
        if binding.allows(action.value, topic):
            return True
        if self.runtime is not None:
            self.runtime.guard.topic_denied(binding, action.value, topic)
        return False


async def _watch(path: Path, interval: float, guard: Guard) -> None:
    """Reload the policies when ``iotauth.toml`` changes (in addition to SIGHUP)."""

    def stamp() -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        current = stamp()
        if current != last and current is not None:
            last = current
            log.info("%s changed: reloading policies", path)
            guard.reload()


__all__ = ["BINDING_KEY", "IotAuthPlugin", "Runtime", "binding_of", "load_policies"]
