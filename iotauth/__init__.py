"""iotauth: per-device X.509 identities, provisioned over serial and enforced at the MQTT broker."""

from iotauth.errors import (
    AuditChainBroken,
    CaLocked,
    CertificateRejected,
    ConfigError,
    Conflict,
    CsrRejected,
    InvalidIdentity,
    IotAuthError,
    NotFound,
    PkiError,
    PolicyDenied,
    ProvisioningError,
    RegistryError,
    TokenError,
)
from iotauth.identity import validate_device_id

__version__ = "0.1.0"

__all__ = [
    "AuditChainBroken",
    "CaLocked",
    "CertificateRejected",
    "ConfigError",
    "Conflict",
    "CsrRejected",
    "InvalidIdentity",
    "IotAuthError",
    "NotFound",
    "PkiError",
    "PolicyDenied",
    "ProvisioningError",
    "RegistryError",
    "TokenError",
    "__version__",
    "validate_device_id",
]
