"""Profiles: what a class of identities may hold (key types, validity) and do (topics, limits, renewal).

Kept apart from :mod:`iotauth.config` (which reads them from ``iotauth.toml``
and re-exports these names): the two built-in profiles, ``default`` for
devices and ``renewer`` for the renewal service, are values every layer can
name without parsing a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta

from iotauth.limits import SessionLimits

KEY_TYPES = frozenset({"p256", "p384", "ed25519", "rsa"})
DEFAULT_PROFILE = "default"
RENEWER_PROFILE = "renewer"


@dataclass(frozen=True)
class Profile:
    """What a class of identities may hold (key types, validity) and do (topics).

    Topic templates may use ``{device_id}`` and ``{profile}``; they are filled in
    only with validated identity values by :mod:`iotauth.policy`.
    """

    name: str
    validity: timedelta = timedelta(days=365)
    key_types: frozenset[str] = frozenset({"p256", "p384"})
    rsa_min_bits: int = 2048
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    limits: SessionLimits = field(default_factory=SessionLimits)
    renew_after: float = 0.66
    """Fraction of a certificate's validity after which its device may renew it over MQTT (0: any time)."""


DEFAULT_DEVICE_PROFILE = Profile(
    name=DEFAULT_PROFILE,
    publish=("devices/{device_id}/telemetry/#", "devices/{device_id}/state", "devices/{device_id}/rotation/request"),
    subscribe=("devices/{device_id}/commands/#", "devices/{device_id}/rotation/response"),
)


def renewer_profile(limits: SessionLimits) -> Profile:
    """``[profiles.renewer]`` unless ``iotauth.toml`` sets it: the renewal service's identity (``iotauth renewer``).

    It reads every device's renewal requests and answers on every device's
    response and command topics, so its session may hold far more in flight
    and retained (one rotation order per device) than a device's.
    """
    return Profile(
        name=RENEWER_PROFILE,
        validity=timedelta(days=90),
        key_types=frozenset({"p256", "p384"}),
        publish=("devices/+/rotation/response", "devices/+/commands/rotate"),
        subscribe=("devices/+/rotation/request",),
        limits=replace(limits, max_inflight=1024, max_queued=200_000, max_queued_bytes=512 * 1024 * 1024,
                       max_retained=1_000_000, max_subscriptions=max(limits.max_subscriptions, 16)),
    )
