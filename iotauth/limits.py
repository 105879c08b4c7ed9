"""The broker's resource limits, before and after authentication, with their safe defaults.

Two groups, because they protect against different people:

* :class:`IntakeLimits` bound what *anyone on the network* can make the broker
  hold before it knows who they are: connections still in the TLS handshake
  or waiting for CONNECT, per address, per network (/24 for IPv4, /64 for
  IPv6) and in total, how fast one address may open connections that fail,
  and how long each phase may take (shorter under pressure). They come from
  ``[broker.limits]`` in ``iotauth.toml``.
* :class:`SessionLimits` bound what *one authenticated device* can make the
  broker hold: packet size, subscriptions, messages in flight, queued for it
  while offline, and retained on its behalf. Defaults come from
  ``[broker.limits]``; a profile overrides any of them in
  ``[profiles.NAME.limits]`` (an ingest service may need more subscriptions
  than a sensor). A device that breaks one is disconnected and the limit is
  named in the audit log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from iotauth.errors import ConfigError


@dataclass(frozen=True)
class IntakeLimits:
    """Before authentication. See the module docstring; every field is a ``[broker.limits]`` key."""

    max_pending: int = 4096
    max_pending_per_address: int = 64
    max_pending_per_network: int = 256
    max_waiting_per_address: int = 4096
    max_waiting: int = 16_384
    wait_timeout: float = 30.0
    failures_per_second: float = 20.0
    failure_burst: int = 200
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    min_timeout: float = 1.0
    max_connect_bytes: int = 65_536

    def __post_init__(self) -> None:
        _positive(self, tuple(f.name for f in fields(self)))
        if not 0 < self.min_timeout <= min(self.handshake_timeout, self.connect_timeout, self.wait_timeout):
            raise ConfigError("[broker.limits] min_timeout must be > 0 and at most the wait, handshake and connect "
                              "timeouts")

    def timeout(self, base: float, load: float) -> float:
        """A phase deadline that shrinks linearly from ``base`` at half ``load`` (0..1) to ``min_timeout`` at full."""
        if load <= 0.5:
            return base
        return max(self.min_timeout, base - (base - self.min_timeout) * min(1.0, (load - 0.5) * 2))


@dataclass(frozen=True)
class SessionLimits:
    """After authentication, per session. See the module docstring."""

    max_packet_size: int = 262_144
    max_subscriptions: int = 100
    max_filters_per_subscribe: int = 16
    max_inflight: int = 32
    max_queued: int = 1000
    max_queued_bytes: int = 4 * 1024 * 1024
    max_retained: int = 100

    def __post_init__(self) -> None:
        _positive(self, tuple(f.name for f in fields(self)))
        if self.max_packet_size > 268_435_460:
            raise ConfigError("max_packet_size cannot exceed MQTT's 268435460 bytes")
        if self.max_inflight > 65_535:
            raise ConfigError("max_inflight cannot exceed 65535 (the packet id space)")


INTAKE_KEYS = frozenset(f.name for f in fields(IntakeLimits))
SESSION_KEYS = frozenset(f.name for f in fields(SessionLimits))


def _positive(limits: object, names: tuple[str, ...]) -> None:
    kinds = {f.name: f.type for f in fields(limits)}  # type: ignore[arg-type]
    for name in names:
        value = getattr(limits, name)
        wanted = int if kinds[name] == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted) or value <= 0:
            what = "a positive whole number" if wanted is int else "a positive number"
            raise ConfigError(f"limit {name} must be {what}, got {value!r}")


def parse_limits(table: Mapping[str, Any], where: str) -> tuple[IntakeLimits, SessionLimits]:
    """``[broker.limits]``: intake and default session limits; unknown keys are an error (a typo is not a limit)."""
    unknown = set(table) - INTAKE_KEYS - SESSION_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown limit(s) {', '.join(sorted(unknown))}")
    intake = IntakeLimits(**{k: v for k, v in table.items() if k in INTAKE_KEYS})
    session = SessionLimits(**{k: v for k, v in table.items() if k in SESSION_KEYS})
    return intake, session


def override(defaults: SessionLimits, table: Mapping[str, Any], where: str) -> SessionLimits:
    """A profile's ``limits`` table over the defaults (session limits only)."""
    unknown = set(table) - SESSION_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown or non-session limit(s) {', '.join(sorted(unknown))}")
    try:
        return replace(defaults, **dict(table))
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
