"""The rotation protocol's messages (``firmware_tools/PROTOCOL.md``, part 2): JSON on a device's own topics.

Sans-I/O and shared, byte for byte, by the renewer (:mod:`iotauth.rotation.renewer`)
and the device side (``firmware_tools/agent/``, the benchmarks):

* a **request** (``type: renew``) carries a CSR for a *new* key and a signature by
  the device's *current* key; a **confirmation** (``type: confirm``) a signature by
  the *new* key over the new certificate's serial. Both are published on
  ``devices/<id>/rotation/request``;
* **responses** (``issued``, ``activated``, ``refused``) come back on
  ``devices/<id>/rotation/response``; an operator's **order** to renew now on
  ``devices/<id>/commands/rotate``.

What is signed is not the JSON (whose encoding a device library may change)
but a fixed byte string built from the fields::

    b"iotauth-rotation-v1" 00 type 00 device_id 00 request_id (16 raw bytes) 00 decimal(timestamp) 00 X

with ``X`` = ``certificate`` (64 hex digits) 00 SHA-256(CSR DER) (32 raw bytes)
for a request, and ``serial`` (lower-case hex) for a confirmation. The
signature follows the key: ECDSA (DER) with SHA-256 on P-256 and SHA-384 on
P-384, Ed25519, RSA PKCS#1 v1.5 with SHA-256.

Binary fields are standard base64 with padding, in canonical form (the one
encoding of those bytes); every field is checked, unknown fields are refused,
and a message is bounded in size and nesting before it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import NameOID

from iotauth import safejson
from iotauth.errors import InvalidIdentity, RefusalCode, RotationMessageError
from iotauth.identity import validate_device_id

VERSION = 1
DOMAIN = b"iotauth-rotation-v1"
REQUEST_ID_BYTES = 16
MAX_MESSAGE = 16 * 1024
"""A request or confirmation, in bytes (an RSA-4096 CSR is about 1.5 KiB of base64)."""
MAX_RESPONSE = 64 * 1024
MAX_CSR = 8 * 1024
MAX_SIGNATURE = 1024
MAX_TIMESTAMP = 2**40

_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_SERIAL = re.compile(r"[0-9a-f]{1,40}", re.ASCII)
_TOPIC = re.compile(r"devices/([^/]+)/rotation/request", re.ASCII)


class Kind(StrEnum):
    RENEW = "renew"
    CONFIRM = "confirm"


class Status(StrEnum):
    ISSUED = "issued"
    ACTIVATED = "activated"
    REFUSED = "refused"


# -- topics ------------------------------------------------------------------------------------


def request_topic(device_id: str) -> str:
    return f"devices/{validate_device_id(device_id)}/rotation/request"


def response_topic(device_id: str) -> str:
    return f"devices/{validate_device_id(device_id)}/rotation/response"


def command_topic(device_id: str) -> str:
    return f"devices/{validate_device_id(device_id)}/commands/rotate"


REQUEST_FILTER = "devices/+/rotation/request"


def device_of_request_topic(topic: str) -> str | None:
    """The device id a request topic names (validated), or None for any other topic."""
    found = _TOPIC.fullmatch(topic)
    if found is None:
        return None
    try:
        return validate_device_id(found.group(1))
    except InvalidIdentity:
        return None


# -- the signed bytes --------------------------------------------------------------------------


def signed_bytes(kind: Kind, device_id: str, request_id: bytes, timestamp: int, tail: bytes) -> bytes:
    """The bytes a request or confirmation signs (see the module docstring)."""
    return b"\0".join((DOMAIN, kind.value.encode(), device_id.encode(), request_id, str(timestamp).encode(), tail))


def renew_tail(certificate: str, csr_der: bytes) -> bytes:
    return certificate.encode() + b"\0" + hashlib.sha256(csr_der).digest()


def sign(key: PrivateKeyTypes, message: bytes, *, deterministic: bool = False) -> bytes:
    """Sign ``message`` the way the protocol asks for ``key``'s type (``deterministic``: RFC 6979 ECDSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
        return key.sign(message, ec.ECDSA(digest, deterministic_signing=deterministic))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(f"rotation messages cannot be signed with a {type(key).__name__}")


def verify(public_key: CertificatePublicKeyTypes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature over ``message`` (any failure is False)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            digest = hashes.SHA384() if public_key.curve.key_size >= 384 else hashes.SHA256()
            public_key.verify(signature, message, ec.ECDSA(digest))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


# -- device -> renewer -------------------------------------------------------------------------


@dataclass(frozen=True)
class Renew:
    """A renewal request: a CSR for a new key, signed by the current key over the fields."""

    device_id: str
    request_id: bytes
    timestamp: int
    certificate: str
    """SHA-256 (hex) of the DER of the certificate the device holds now."""
    csr: bytes
    signature: bytes

    @property
    def kind(self) -> Kind:
        return Kind.RENEW

    @property
    def signed(self) -> bytes:
        return signed_bytes(Kind.RENEW, self.device_id, self.request_id, self.timestamp,
                            renew_tail(self.certificate, self.csr))

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": Kind.RENEW.value, "device_id": self.device_id,
                      "request_id": _b64(self.request_id), "timestamp": self.timestamp,
                      "certificate": self.certificate, "csr": _b64(self.csr), "signature": _b64(self.signature)})


@dataclass(frozen=True)
class Confirm:
    """The device stored the new certificate: a signature by the *new* key over its serial."""

    device_id: str
    request_id: bytes
    timestamp: int
    serial: str
    signature: bytes

    @property
    def kind(self) -> Kind:
        return Kind.CONFIRM

    @property
    def signed(self) -> bytes:
        return signed_bytes(Kind.CONFIRM, self.device_id, self.request_id, self.timestamp, self.serial.encode())

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": Kind.CONFIRM.value, "device_id": self.device_id,
                      "request_id": _b64(self.request_id), "timestamp": self.timestamp, "serial": self.serial,
                      "signature": _b64(self.signature)})


_FIELDS = {
    Kind.RENEW: {"v", "type", "device_id", "request_id", "timestamp", "certificate", "csr", "signature"},
    Kind.CONFIRM: {"v", "type", "device_id", "request_id", "timestamp", "serial", "signature"},
}


def decode_request(payload: bytes) -> Renew | Confirm:
    """Parse a message from a request topic, checking every field.

    Raises:
        RotationMessageError: what is wrong; with the request id when it could be read (then it is answered).
    """
    try:
        data = safejson.loads(payload, max_bytes=MAX_MESSAGE, max_depth=2)
    except ValueError as exc:
        raise RotationMessageError(f"not a rotation message: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise RotationMessageError("a rotation message is a JSON object")
    request_id = _request_id(data.get("request_id"))
    answer_as = _b64(request_id) if request_id is not None else None
    try:
        return _fields(data, request_id)
    except RotationMessageError as exc:
        raise RotationMessageError(str(exc), answer_as, exc.code) from None


def _fields(data: dict[str, Any], request_id: bytes | None) -> Renew | Confirm:
    if data.get("v") != VERSION or isinstance(data.get("v"), bool):
        raise RotationMessageError(f"v must be {VERSION}")
    try:
        kind = Kind(str(data.get("type")))
    except ValueError:
        raise RotationMessageError("type must be 'renew' or 'confirm'") from None
    if data.get("signature") in (None, ""):
        raise RotationMessageError("the message carries no signature (the proof of the key)",
                                   code=RefusalCode.BAD_SIGNATURE)
    unknown = set(data) - _FIELDS[kind]
    missing = _FIELDS[kind] - set(data)
    if unknown or missing:
        raise RotationMessageError(f"fields: unknown {sorted(unknown)[:5]}, missing {sorted(missing)}")
    if request_id is None:
        raise RotationMessageError(f"request_id must be base64 of {REQUEST_ID_BYTES} bytes")
    try:
        device_id = validate_device_id(data["device_id"])
    except InvalidIdentity as exc:
        raise RotationMessageError(f"device_id: {exc}") from None
    stamp = data["timestamp"]
    if not isinstance(stamp, int) or isinstance(stamp, bool) or not 0 <= stamp < MAX_TIMESTAMP:
        raise RotationMessageError("timestamp must be an integer number of seconds since 1970 (UTC)")
    signature = _binary(data["signature"], "signature", MAX_SIGNATURE)
    if kind is Kind.RENEW:
        certificate = data["certificate"]
        if not isinstance(certificate, str) or _HEX64.fullmatch(certificate) is None:
            raise RotationMessageError("certificate must be the SHA-256 of the current certificate, 64 hex digits")
        return Renew(device_id, request_id, stamp, certificate, _binary(data["csr"], "csr", MAX_CSR), signature)
    serial = data["serial"]
    if not isinstance(serial, str) or _SERIAL.fullmatch(serial) is None:
        raise RotationMessageError("serial must be the certificate serial in lower-case hex")
    return Confirm(device_id, request_id, stamp, serial, signature)


def _request_id(value: object) -> bytes | None:
    try:
        raw = _binary(value, "request_id", REQUEST_ID_BYTES)
    except RotationMessageError:
        return None
    return raw if len(raw) == REQUEST_ID_BYTES else None


def _binary(value: object, name: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * ((limit + 2) // 3):
        raise RotationMessageError(f"{name} must be base64 of at most {limit} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RotationMessageError(f"{name} is not standard base64") from None
    if not raw or _b64(raw) != value:
        raise RotationMessageError(f"{name} is not canonical base64 (standard alphabet, padded)")
    return raw


# -- renewer -> device -------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """What the renewer answers on ``devices/<id>/rotation/response``."""

    request_id: str
    """As the device sent it (base64)."""
    status: Status
    serial: str | None = None
    not_after: str | None = None
    chain: str | None = None
    """``issued``: the new certificate then the issuing CA, PEM."""
    error: RefusalCode | None = None
    reason: str | None = None
    retry_after: int | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": VERSION, "request_id": self.request_id, "status": self.status.value}
        if self.status is Status.REFUSED:
            assert self.error is not None
            data.update(error=self.error.value, reason=(self.reason or "")[:300])
            if self.retry_after is not None:
                data["retry_after"] = self.retry_after
        else:
            data["serial"] = self.serial
            if self.status is Status.ISSUED:
                data.update(not_after=self.not_after, chain=self.chain)
        return _dump(data)


def issued(request_id: str, serial: str, not_after: str, chain_pem: str) -> Response:
    return Response(request_id, Status.ISSUED, serial=serial, not_after=not_after, chain=chain_pem)


def activated(request_id: str, serial: str) -> Response:
    return Response(request_id, Status.ACTIVATED, serial=serial)


def refused(request_id: str, error: RefusalCode, reason: str, retry_after: int | None = None) -> Response:
    return Response(request_id, Status.REFUSED, error=error, reason=reason, retry_after=retry_after)


def decode_response(payload: bytes) -> Response:
    """Parse a response (the device side); raises :class:`RotationMessageError` on anything malformed."""
    try:
        data = safejson.loads(payload, max_bytes=MAX_RESPONSE, max_depth=2)
    except ValueError as exc:
        raise RotationMessageError(f"not a rotation response: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or data.get("v") != VERSION or not isinstance(data.get("request_id"), str):
        raise RotationMessageError("not a rotation response")
    try:
        status = Status(str(data.get("status")))
    except ValueError:
        raise RotationMessageError("unknown response status") from None
    if status is Status.REFUSED:
        try:
            error = RefusalCode(str(data.get("error")))
        except ValueError:
            error = RefusalCode.INTERNAL  # a code added later: treat it as "try again later"
        retry = data.get("retry_after")
        return Response(data["request_id"], status, error=error, reason=str(data.get("reason", ""))[:300],
                        retry_after=retry if isinstance(retry, int) and not isinstance(retry, bool) else None)
    serial = data.get("serial")
    if not isinstance(serial, str) or _SERIAL.fullmatch(serial) is None:
        raise RotationMessageError("response without a valid serial")
    if status is Status.ACTIVATED:
        return Response(data["request_id"], status, serial=serial)
    chain, not_after = data.get("chain"), data.get("not_after")
    if not isinstance(chain, str) or not isinstance(not_after, str):
        raise RotationMessageError("an issued response carries chain and not_after")
    return Response(data["request_id"], status, serial=serial, not_after=not_after, chain=chain)


@dataclass(frozen=True)
class RotateOrder:
    """An operator's order on ``devices/<id>/commands/rotate``: renew ``serial`` now (ignore it if yours differs)."""

    serial: str
    requested_at: str

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": "rotate", "serial": self.serial, "requested_at": self.requested_at})


def decode_order(payload: bytes) -> RotateOrder:
    try:
        data = safejson.loads(payload, max_bytes=MAX_MESSAGE, max_depth=2)
    except ValueError as exc:
        raise RotationMessageError(f"not a rotation order: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or data.get("v") != VERSION or data.get("type") != "rotate":
        raise RotationMessageError("not a rotation order")
    serial, requested_at = data.get("serial"), data.get("requested_at")
    if not isinstance(serial, str) or _SERIAL.fullmatch(serial) is None or not isinstance(requested_at, str):
        raise RotationMessageError("a rotation order names a serial and when it was requested")
    return RotateOrder(serial, requested_at[:40])


# -- the device side -------------------------------------------------------------------------


def new_request_id() -> bytes:
    return secrets.token_bytes(REQUEST_ID_BYTES)


def certificate_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_csr(key: PrivateKeyTypes, device_id: str, *, deterministic: bool = False) -> bytes:
    """A DER CSR for ``key`` (the CA takes only its key from it; the CN is for people reading it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
    digest: hashes.SHA256 | hashes.SHA384 | None = hashes.SHA256()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        digest = None
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        digest = hashes.SHA384()
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"no CSR for a {type(key).__name__}")
    ecdsa = isinstance(key, ec.EllipticCurvePrivateKey) and deterministic
    csr = builder.sign(key, digest, ecdsa_deterministic=True if ecdsa else None)
    return csr.public_bytes(serialization.Encoding.DER)


def make_renew(current_key: PrivateKeyTypes, current_cert: x509.Certificate, csr_der: bytes, device_id: str, *,
               request_id: bytes | None = None, timestamp: int | None = None, deterministic: bool = False) -> Renew:
    """A signed request: the CSR of the new key, signed by ``current_key`` (whose certificate is ``current_cert``)."""
    rid = request_id if request_id is not None else new_request_id()
    stamp = timestamp if timestamp is not None else int(time.time())
    certificate = certificate_sha256(current_cert)
    message = signed_bytes(Kind.RENEW, device_id, rid, stamp, renew_tail(certificate, csr_der))
    return Renew(device_id, rid, stamp, certificate, csr_der, sign(current_key, message, deterministic=deterministic))


def make_confirm(new_key: PrivateKeyTypes, device_id: str, serial: str, *, request_id: bytes | None = None,
                 timestamp: int | None = None, deterministic: bool = False) -> Confirm:
    """A signed confirmation that the device holds ``new_key`` and stored the certificate ``serial``."""
    rid = request_id if request_id is not None else new_request_id()
    stamp = timestamp if timestamp is not None else int(time.time())
    message = signed_bytes(Kind.CONFIRM, device_id, rid, stamp, serial.encode())
    return Confirm(device_id, rid, stamp, serial, sign(new_key, message, deterministic=deterministic))


def b64(raw: bytes) -> str:
    """Standard, padded base64 (the protocol's only encoding of bytes)."""
    return _b64(raw)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
