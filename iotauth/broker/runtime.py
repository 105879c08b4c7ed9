"""What a running iotauth broker holds, whichever host is behind the gate: built once from a home.

:func:`open_runtime` loads the trust material, ``iotauth.toml`` (profiles,
topic rules, limits) and the registry, and builds the guard; :class:`Runtime`
closes them again. The native broker (:mod:`iotauth.broker.server`) and the
amqtt host (:mod:`iotauth.broker.amqtt_host`) both start from here, so they
enforce the same identity, policy and revocation rules.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cryptography import x509

from iotauth.broker.audit import BrokerAudit
from iotauth.broker.binding import GuardOptions
from iotauth.broker.gate import server_context
from iotauth.broker.guard import Guard, stop_task
from iotauth.castore import client_verifier, trusted_issuing_pem
from iotauth.config import Home, Settings, load_settings, registry_location
from iotauth.limits import IntakeLimits, SessionLimits
from iotauth.policy import PolicySet
from iotauth.registry import Registry, open_registry
from iotauth.registry.expiry import expire_stale_pending

log = logging.getLogger("iotauth.broker")


@dataclass(frozen=True)
class BrokerOptions:
    """How to run the broker (``iotauth broker``'s flags; the amqtt plugin's ``Config`` maps onto it).

    Attributes:
        home: the iotauth home (CA, ``iotauth.toml``, registry); default ``$IOTAUTH_HOME``.
        registry: registry URL; default ``$IOTAUTH_REGISTRY`` or the home's SQLite file.
        bind: ``HOST:PORT`` of the MQTT-over-TLS listener. ``None`` disables it.
        ws_bind: ``HOST:PORT`` of the secure WebSocket listener, or ``None``.
        fail_open: DANGEROUS: admit certificate-valid clients when the registry is
            unreadable (see :class:`~iotauth.broker.guard.GuardOptions`).
        poll_interval: seconds between registry change-feed polls.
        registry_timeout: bound on each registry read and on the accept audit write.
        registry_grace: seconds live sessions survive a registry outage before they are dropped.
        sweep_interval: seconds between wall-clock expiry sweeps.
        watch_config: seconds between checks of ``iotauth.toml`` for changes (0: SIGHUP only).
        durable_accept: commit each accept record before CONNACK (one commit per connect).
        metrics_bind: ``PORT`` or ``HOST:PORT`` of the Prometheus exporter (``PORT`` alone: loopback), or ``None``.
    """

    home: str | None = None
    registry: str | None = None
    bind: str | None = "0.0.0.0:8883"
    ws_bind: str | None = None
    fail_open: bool = False
    poll_interval: float = 0.05
    registry_timeout: float = 2.0
    registry_grace: float = 10.0
    sweep_interval: float = 30.0
    watch_config: float = 1.0
    durable_accept: bool = False
    metrics_bind: str | None = None


@dataclass
class Runtime:
    """Everything a running iotauth broker holds."""

    home: Home
    settings: Settings
    registry: Registry
    owns_registry: bool
    guard: Guard
    context: ssl.SSLContext
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def intake_limits(self) -> IntakeLimits:
        return self.settings.intake_limits

    def session_limits(self, profile: str) -> SessionLimits:
        """The limits of a profile (a profile removed by a reload gets the defaults)."""
        found = self.settings.profiles.get(profile)
        return found.limits if found is not None else SessionLimits()

    def reload(self) -> bool:
        """Re-read ``iotauth.toml``: policies for every live session, and limits for new sessions."""
        if not self.guard.reload():
            return False
        try:
            self.settings = load_settings(self.home)
        except Exception as exc:  # the guard has just read the same file successfully; keep what we had
            log.error("could not reload limits: %s", exc)
        return True

    async def close(self) -> None:
        for task in self.tasks:
            await stop_task(task)
        await self.guard.close()
        if self.owns_registry:
            await self.registry.close()


def load_policies(home: Home) -> PolicySet:
    """Parse and check every profile's topic rules from ``iotauth.toml`` (ConfigError if any is bad)."""
    return PolicySet.from_profiles(load_settings(home).profiles.values())


class CrlSerials:
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


async def open_runtime(options: BrokerOptions, registry: Registry | None = None) -> Runtime:
    """Load trust material, settings and the registry, and build the guard (not yet started)."""
    home = Home.resolve(options.home)
    home.require_initialised()
    settings = load_settings(home)
    policies = PolicySet.from_profiles(settings.profiles.values())
    verifier = client_verifier(home, settings)
    context = server_context(home.server_cert, home.server_key, trusted_issuing_pem(home))
    owns = registry is None
    if registry is None:
        registry = await open_registry(registry_location(home, options.registry))
    guard = Guard(
        registry=registry,
        verifier=verifier,
        policies=policies,
        audit=BrokerAudit(registry, durable_accept=options.durable_accept),
        options=GuardOptions(
            fail_open=options.fail_open,
            poll_interval=float(options.poll_interval),
            registry_timeout=float(options.registry_timeout),
            registry_grace=float(options.registry_grace),
            sweep_interval=float(options.sweep_interval),
            renewal_ttl=settings.pending_ttl.total_seconds(),
        ),
        load_policies=lambda: load_policies(home),
        revoked_serials=CrlSerials(home.crl_der),
        expire_pending=partial(expire_stale_pending, registry, settings.pending_ttl, actor="iotauth-broker"),
    )
    runtime = Runtime(home, settings, registry, owns, guard, context)
    if options.watch_config > 0:
        runtime.tasks.append(asyncio.get_running_loop().create_task(
            _watch(home.config_file, float(options.watch_config), runtime), name="iotauth-config-watch"))
    if options.fail_open:
        log.warning("running with --fail-open: if the registry cannot be read, revoked devices may connect")
    return runtime


async def _watch(path: Path, interval: float, runtime: Runtime) -> None:
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
            runtime.reload()


__all__ = ["BrokerOptions", "Runtime", "load_policies", "open_runtime"]
