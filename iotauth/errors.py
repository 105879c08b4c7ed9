"""The one exception hierarchy of iotauth.

Every message is written for the person who has to act on it: it says what was
wrong and, where there is one, what to do next. The CLI prints ``str(error)``
as a single line, so messages never rely on a traceback for context.
"""

from __future__ import annotations


class IotAuthError(Exception):
    """Root of every error iotauth raises on purpose."""


class ConfigError(IotAuthError):
    """The home directory or ``iotauth.toml`` is missing or malformed."""


class InvalidIdentity(IotAuthError, ValueError):
    """An identity value (device id, hardware id, profile name) is outside the safe alphabet."""


class PkiError(IotAuthError):
    """CA material is missing, unreadable or would be overwritten."""


class CaLocked(PkiError):
    """The CA key is encrypted and the passphrase is missing or wrong."""


class CsrRejected(PkiError):
    """A certificate request failed proof of possession or key policy."""


class CertificateRejected(PkiError):
    """A presented certificate failed chain, validity, usage or identity checks."""


class RegistryError(IotAuthError):
    """The device registry could not be read or written."""


class NotFound(RegistryError):
    """The device or certificate does not exist in the registry."""


class Conflict(RegistryError):
    """The change would break a registry invariant (duplicate hardware id, key, state)."""


class AuditChainBroken(RegistryError):
    """The hash-chained audit log does not verify."""


class ProvisioningError(IotAuthError):
    """A provisioning step failed on the device or on the link."""


class PolicyDenied(IotAuthError):
    """A topic action is outside the identity's policy.

    Args:
        reason: why the action was refused, for logs and the audit trail.
        name: the offending topic or filter.
    """

    def __init__(self, reason: str, name: str) -> None:
        super().__init__(f"{reason}: {name!r}")
        self.reason = reason
        self.name = name


class ProtocolError(IotAuthError):
    """A client broke the MQTT protocol or a broker limit; its connection is closed."""


class MalformedPacket(ProtocolError, ValueError):
    """The bytes are not a well-formed MQTT 3.1.1 packet (MQTT 3.1.1 §4.8: close the connection)."""


class UnsupportedProtocol(MalformedPacket):
    """A well-formed CONNECT of another protocol level (answered with CONNACK 0x01, or MQTT 5's 0x84)."""

    def __init__(self, level: int, message: str) -> None:
        super().__init__(message)
        self.level = level


class LimitExceeded(ProtocolError):
    """A client went past one of the broker's resource limits.

    Args:
        limit: the limit's configuration key (``max_subscriptions``, ...), named in the audit log.
        value: what the client asked for.
        maximum: the configured limit.
    """

    def __init__(self, limit: str, value: int, maximum: int, detail: str = "") -> None:
        super().__init__(f"{limit}: {value} > {maximum}" + (f" ({detail})" if detail else ""))
        self.limit = limit
        self.value = value
        self.maximum = maximum


class PacketTooLarge(LimitExceeded):
    """A packet's length (from its fixed header) is above ``max_packet_size``; its body is never buffered."""

    def __init__(self, size: int, maximum: int) -> None:
        super().__init__("max_packet_size", size, maximum, "packet refused from its fixed header")
