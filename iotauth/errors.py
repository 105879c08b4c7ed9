"""The one exception hierarchy of iotauth.

Every message is written for the person who has to act on it: it says what was
wrong and, where there is one, what to do next. The CLI prints ``str(error)``
as a single line, so messages never rely on a traceback for context.
"""

from __future__ import annotations

from enum import StrEnum


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


class KeyUriError(PkiError):
    """A CA key URI (``file:`` or ``pkcs11:``) is malformed, or carries a secret it must not carry."""


class TokenError(PkiError):
    """A PKCS#11 module or token failed; the message names the module, the token or the object."""


class TokenLoginFailed(TokenError, CaLocked):
    """The token's user PIN is missing, wrong or locked: the CA is locked, exactly like a missing passphrase."""


class TokenMissing(TokenError):
    """No token (or more than one) matches the URI's token attributes, or the module cannot be loaded."""


class TokenObjectMissing(TokenError):
    """The token holds no private key (or more than one) matching the URI's ``object`` / ``id``."""


class MechanismRefused(TokenError):
    """The token refuses the mechanism iotauth needs (CKM_ECDSA, or EC key generation)."""


class CsrRejected(PkiError):
    """A certificate request failed proof of possession or key policy."""


class CertificateRejected(PkiError):
    """A presented certificate failed chain, validity, usage or identity checks."""


class Rejection(CertificateRejected):
    """A certificate check failed; ``code`` is a stable short reason for audit records."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RegistryError(IotAuthError):
    """The device registry could not be read or written."""


class NotFound(RegistryError):
    """The device or certificate does not exist in the registry."""


class Conflict(RegistryError):
    """The change would break a registry invariant (duplicate hardware id, key, state)."""


class ProfileMismatch(Conflict):
    """A certificate was requested under another profile than the device already has.

    The message names both profiles; front ends may add how to ask for the
    right one (the CLI: ``--profile``).
    """

    def __init__(self, device_id: str, profile: str, requested: str) -> None:
        super().__init__(f"device {device_id!r} has profile {profile!r}")
        self.device_id = device_id
        self.profile = profile
        self.requested = requested


class JournalWriteFailed(RegistryError):
    """Buffered audit records could not be appended to the log; ``lost`` says how many."""

    def __init__(self, message: str, lost: int) -> None:
        super().__init__(message)
        self.lost = lost


class RegistryMissing(RegistryError):
    """The registry database file does not exist (and was not to be created)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"registry database {path} does not exist")
        self.path = path


class RegistryReplaced(RegistryError):
    """The database at the registry's location is another registry than the one opened (another instance id)."""


class RefusalCode(StrEnum):
    """Why a renewal request or confirmation was refused: the exact ``error`` a device receives.

    The values are part of the rotation protocol (``firmware_tools/PROTOCOL.md``, part 2): firmware
    acts on them, so they never change. Some are decided by the renewer (shape, clock, signature,
    key type), the rest inside the registry's write transaction, where they can race.
    """

    BAD_REQUEST = "bad-request"
    BAD_SIGNATURE = "bad-signature"
    NOT_CURRENT_CERTIFICATE = "not-current-certificate"
    CERTIFICATE_EXPIRED = "certificate-expired"
    DEVICE_NOT_ACTIVE = "device-not-active"
    KEY_REUSED = "key-reused"
    KEY_TYPE_NOT_ALLOWED = "key-type-not-allowed"
    OUTSIDE_WINDOW = "outside-window"
    REPLAYED = "replayed"
    STALE = "stale"
    RATE_LIMITED = "rate-limited"
    RENEWAL_PENDING = "renewal-pending"
    RENEWAL_EXPIRED = "renewal-expired"
    INTERNAL = "internal"


class RenewalRefused(IotAuthError):
    """A certificate renewal (or its confirmation) was refused; ``code`` is what the device is told.

    Attributes:
        code: the protocol's error code.
        retry_after: seconds after which the same request may succeed (a window, a rate limit), if known.
    """

    def __init__(self, code: RefusalCode, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class RotationMessageError(RenewalRefused):
    """A rotation message that is not what PROTOCOL.md part 2 allows (``bad-request``; no signature: ``bad-signature``).

    Attributes:
        request_id: the message's request id if it could be read (the refusal is then answered), else None.
    """

    def __init__(self, message: str, request_id: str | None = None,
                 code: RefusalCode = RefusalCode.BAD_REQUEST) -> None:
        super().__init__(code, message)
        self.request_id = request_id


class AuditChainBroken(RegistryError):
    """The hash-chained audit log does not verify."""


class AnchorError(IotAuthError):
    """An audit anchor (the log's head kept outside the home) cannot be read, written or understood."""


class ProvisioningError(IotAuthError):
    """A provisioning step failed on the device or on the link."""


class ProtocolError(ProvisioningError):
    """Bytes or a message that break the wire protocol.

    Args:
        code: a stable short name (``bad-crc``, ``oversize``, ``bad-payload``...).
        message: what was wrong, for logs.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FrameError(ProtocolError):
    """A frame that cannot be decoded.

    Attributes:
        consumed: how many bytes of the buffer belong to the bad frame.
        unterminated: the bad bytes did not end at a delimiter, so the rest of
            the frame (up to the next 0x00) is still to come and must be skipped.
    """

    def __init__(self, code: str, message: str, consumed: int, *, unterminated: bool = False) -> None:
        super().__init__(code, message)
        self.consumed = consumed
        self.unterminated = unterminated


class LinkClosed(ProvisioningError):
    """The device went away (unplugged, powered off, port closed)."""


class DeviceRefused(ProvisioningError):
    """The device answered a request with ERROR.

    Attributes:
        request: the name of the refused request (``PUT_CERT``...).
        code: the device's error code (:class:`~iotauth.provisioning.messages.ErrorCode`).
        arg: the error's argument (for ``BAD_OFFSET``, where the device stands).
    """

    def __init__(self, request: str, code: int, code_name: str, arg: int, text: str) -> None:
        super().__init__(f"device refused {request}: {code_name}" + (f" ({text})" if text else ""))
        self.request = request
        self.code = code
        self.arg = arg


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


class MqttViolation(IotAuthError):
    """A client broke the MQTT protocol or a broker limit; its connection is closed."""


class MalformedPacket(MqttViolation, ValueError):
    """The bytes are not a well-formed MQTT 3.1.1 packet (MQTT 3.1.1 §4.8: close the connection)."""


class UnsupportedProtocol(MalformedPacket):
    """A well-formed CONNECT of another protocol level (answered with CONNACK 0x01, or MQTT 5's 0x84)."""

    def __init__(self, level: int, message: str) -> None:
        super().__init__(message)
        self.level = level


class LimitExceeded(MqttViolation):
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


class ConnectRefused(IotAuthError):
    """An MQTT client (:mod:`iotauth.testing`) was not admitted.

    Attributes:
        code: the CONNACK return code, or None if TLS or the socket failed first.
    """

    def __init__(self, code: int | None, detail: str) -> None:
        super().__init__(f"connection refused ({code}): {detail}")
        self.code = code


class OutputNotWritten(IotAuthError):
    """A file the operator asked for could not be written; the message says what is already done and how to recover."""


class BadRequest(IotAuthError):
    """An HTTP request body or parameter is malformed (HTTP 400)."""


class DemoFailed(IotAuthError):
    """A step of ``iotauth demo`` did not behave as described."""


class PushError(IotAuthError):
    """A call that keeps an external broker in step with the registry (a kick, a ban) did not succeed."""


class PushUnavailable(PushError):
    """The broker's API could not be reached or answered 5xx/429: retried with backoff, never skipped."""


class PushUnauthorized(PushError):
    """The broker's API refused iotauth's credentials (401/403): loud, unhealthy, retried until fixed."""


class PushRejected(PushError):
    """The broker's API refused this one request for good (another 4xx): audited, then skipped."""


class RabbitmqApiError(IotAuthError):
    """No node of the RabbitMQ cluster's management API could carry out a kick."""


class RabbitmqApiRefused(RabbitmqApiError):
    """The management API refused iotauth's identity (401/403): nothing is kicked until that is fixed.

    RabbitMQ asks ``iotauth serve`` about that identity too, so a refusal also
    means ``serve`` is unreachable from RabbitMQ or holds another secret.
    """

    def __init__(self, status: int, url: str) -> None:
        super().__init__(
            f"RabbitMQ's management API at {url} refused iotauth's identity (HTTP {status}): check that "
            "'iotauth serve' is reachable from RabbitMQ (auth_http paths in rabbitmq.conf) and reads the same "
            "admin secret ($IOTAUTH_RABBITMQ_ADMIN_SECRET or <home>/rabbitmq/admin.secret)"
        )
        self.status = status


class MosquittoControlError(IotAuthError):
    """A managed Mosquitto did not do what the follower asked (a refused command, a CRL it did not load)."""


class MosquittoUnavailable(MosquittoControlError):
    """Mosquitto (its control listener, or its process) cannot be reached, or the connection broke mid-batch."""
