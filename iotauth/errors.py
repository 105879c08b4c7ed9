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
