"""Validation of every identity value before it reaches a certificate, a topic or a path.

A device id is the one name a device has everywhere: certificate CN and URI SAN,
MQTT client id, topic templates and file names. So it is checked by exactly one
function, :func:`validate_device_id`, against an alphabet that cannot express a
path separator, an MQTT wildcard or level separator, a ``$`` system prefix, a
NUL byte, whitespace or a Unicode look-alike.

Deployments that use RabbitMQ narrow the alphabet further (``rabbitmq=True``,
from ``[rabbitmq] enabled`` in iotauth.toml): RabbitMQ's MQTT plugin turns
every ``/`` of a topic into ``.`` and checks and routes the result, so a ``.``
inside a device id is a level break there, and device ``x.y``'s topics are
``x``'s subtree. The other characters RabbitMQ treats specially in routing
keys and login names (``*``, ``#``, ``:``) are outside the alphabet already.
"""

from __future__ import annotations

import re

from iotauth.errors import InvalidIdentity

DEVICE_ID_MAX = 64
_DEVICE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", re.ASCII)
RABBITMQ_RESERVED = "."  # the routing-key level separator; see the module docstring
# Hardware ids come from device silicon (MACs, IMEIs, serials), so ':' is allowed.
_HARDWARE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", re.ASCII)
_PROFILE = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", re.ASCII)
SPIFFE_DEVICE_PATH = "/device/"


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdentity(f"{kind} must be text, got {type(value).__name__}")
    if pattern.fullmatch(value) is None:
        shown = value if value.isprintable() and len(value) <= 80 else ascii(value)[:80]
        raise InvalidIdentity(f"invalid {kind} {shown!r}: {rule}")
    return value


def validate_device_id(value: object, *, rabbitmq: bool = False) -> str:
    """Return ``value`` if it is a safe device id, else raise :class:`InvalidIdentity`.

    Args:
        rabbitmq: also refuse what RabbitMQ cannot keep apart (``.``); the
            home's setting, see :meth:`iotauth.config.Settings.check_device_id`.
    """
    checked = _check(
        "device id",
        value,
        _DEVICE_ID,
        "use 1-64 characters from A-Z a-z 0-9 . _ - and do not start with '.' or '-'",
    )
    if rabbitmq and RABBITMQ_RESERVED in checked:
        raise InvalidIdentity(
            f"invalid device id {checked!r} for RabbitMQ: it reads '.' as a topic level break, so this device "
            f"would share the topics of {checked.split('.')[0]!r}; with [rabbitmq] enabled = true in iotauth.toml "
            "device ids use only A-Z a-z 0-9 _ -"
        )
    return checked


def validate_hardware_id(value: object) -> str:
    """Return ``value`` if it is a safe hardware id (device id alphabet plus ':')."""
    return _check(
        "hardware id",
        value,
        _HARDWARE_ID,
        "use 1-64 characters from A-Z a-z 0-9 . _ : - starting with a letter or digit",
    )


def validate_profile_name(value: object) -> str:
    """Return ``value`` if it is a valid profile name (it is also a topic template value)."""
    return _check("profile name", value, _PROFILE, "use 1-32 characters from a-z 0-9 _ - starting with a letter")


def validate_trust_domain(value: object) -> str:
    """Return ``value`` if it is a lower-case DNS-style SPIFFE trust domain."""
    checked = _check("trust domain", value, _TRUST_DOMAIN, "use a lower-case DNS name such as 'factory.example.com'")
    if len(checked) > 253:
        raise InvalidIdentity("invalid trust domain: longer than 253 characters")
    return checked


def spiffe_id(trust_domain: str, device_id: str) -> str:
    """The URI SAN that names ``device_id`` inside ``trust_domain``."""
    return f"spiffe://{validate_trust_domain(trust_domain)}{SPIFFE_DEVICE_PATH}{validate_device_id(device_id)}"


def device_id_from_spiffe(uri: str, trust_domain: str) -> str:
    """Extract and validate the device id from a SPIFFE URI of ``trust_domain``.

    Raises:
        InvalidIdentity: the URI belongs to another trust domain, has another
            shape, or names an unsafe device id.
    """
    prefix = f"spiffe://{trust_domain}{SPIFFE_DEVICE_PATH}"
    if not uri.startswith(prefix):
        raise InvalidIdentity(f"URI SAN {uri[:120]!r} is not a device of trust domain {trust_domain!r}")
    return validate_device_id(uri[len(prefix) :])
