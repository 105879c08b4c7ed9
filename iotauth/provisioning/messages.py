"""The provisioning messages and their payload encodings (spec: ``firmware_tools/PROTOCOL.md``).

Every message is a frozen dataclass with a ``TYPE``; ``payload()`` encodes it
and ``parse(payload)`` decodes it strictly: a short field, a value out of
range or a trailing byte is a ``bad-payload`` :class:`ProtocolError`, so the
device and the station agree on exactly one encoding. Integers are
big-endian; ``str8`` is a u8 byte count and UTF-8 text; ``bytes8`` a u8 count
and raw bytes.

Requests go host to device (``0x01``-``0x3F``); the answer to request ``t``
has type ``t | 0x80``; ``ERROR`` (``0x7F``) may answer any request.

This module is one piece on purpose: it is the catalogue of the protocol, one
message after another in the order of PROTOCOL.md, so a firmware developer can
read the two side by side; splitting it would only scatter the catalogue.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self, TypeVar

from iotauth.errors import ProtocolError
from iotauth.provisioning.codec import VERSION, Frame, encode

M = TypeVar("M", bound="Message")
HASH_SIZE = 32
NONCE_SIZE = 32
RESPONSE_BIT = 0x80
MAX_TEXT = 200
MIN_DEVICE_PAYLOAD = 64


class MsgType(IntEnum):
    HELLO = 0x01
    GENERATE_KEY = 0x02
    PUT_KEY = 0x03
    PUT_CERT = 0x04
    PUT_CONFIG = 0x05
    READ_BACK = 0x06
    PROVE = 0x07
    COMMIT = 0x08
    ERASE = 0x09
    ERROR = 0x7F
    INFO = 0x81
    CSR = 0x82
    KEY_ACK = 0x83
    CERT_ACK = 0x84
    CONFIG_ACK = 0x85
    HASHES = 0x86
    SIGNATURE = 0x87
    COMMITTED = 0x88
    ERASED = 0x89


class ErrorCode(IntEnum):
    BAD_FRAME = 0x01
    OVERSIZE = 0x02
    UNSUPPORTED_VERSION = 0x03
    UNKNOWN_TYPE = 0x04
    BAD_PAYLOAD = 0x05
    BAD_STATE = 0x06
    LOCKED = 0x07
    UNSUPPORTED = 0x08
    BAD_OFFSET = 0x09
    KEY_MISMATCH = 0x0A
    FLASH_WRITE = 0x0B
    BUSY = 0x0C
    CONFIRM_MISMATCH = 0x0D
    TOO_LARGE = 0x0E


# The device did nothing (or nothing lasting): the host may try again with a new seq.
RETRYABLE_ERRORS = frozenset({ErrorCode.BAD_FRAME, ErrorCode.OVERSIZE, ErrorCode.FLASH_WRITE, ErrorCode.BUSY})


class KeyType(IntEnum):
    P256 = 1
    P384 = 2
    ED25519 = 3

    @property
    def profile_name(self) -> str:
        """The name profiles use in ``key_types`` (``p256``, ``p384``, ``ed25519``)."""
        return self.name.lower()

    @classmethod
    def from_profile_name(cls, name: str) -> KeyType:
        return cls[name.upper()]

    @property
    def flag(self) -> KeyTypes:
        return KeyTypes(1 << (self.value - 1))


class KeyTypes(IntFlag):
    P256 = 0x01
    P384 = 0x02
    ED25519 = 0x04


class Capability(IntFlag):
    KEYGEN = 0x01
    PUT_KEY = 0x02


class DeviceState(IntFlag):
    HAS_KEY = 0x01
    HAS_CERT = 0x02
    HAS_CONFIG = 0x04
    COMMITTED = 0x08


class SigAlg(IntEnum):
    ECDSA_SHA256 = 1
    ECDSA_SHA384 = 2
    ED25519 = 3


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad-payload", message)


class _Reader:
    """Strict cursor over a payload: every read is bounds-checked."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise _bad(f"{self._what}: payload too short")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def bytes8(self) -> bytes:
        return self.take(self.u8())

    def str8(self) -> str:
        raw = self.bytes8()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{self._what}: text is not UTF-8") from None

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _bad(f"{self._what}: {len(self._data) - self._pos} unexpected trailing bytes")


def _str8(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise _bad("text longer than 255 bytes")
    return bytes([len(raw)]) + raw


def _bytes8(value: bytes) -> bytes:
    if len(value) > 255:
        raise _bad("field longer than 255 bytes")
    return bytes([len(value)]) + value


def _enum(kind: type[IntEnum], value: int, what: str) -> int:
    try:
        return kind(value)
    except ValueError:
        raise _bad(f"{what}: unknown value {value}") from None


def _hash(value: bytes, what: str) -> bytes:
    if len(value) != HASH_SIZE:
        raise _bad(f"{what} must be {HASH_SIZE} bytes")
    return value


class Message:
    """Base of all messages: a type and a strict payload encoding."""

    TYPE: ClassVar[MsgType]

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls: type[M], payload: bytes) -> M:
        _Reader(payload, cls.TYPE.name).end()
        return cls()

    def encode(self, seq: int) -> bytes:
        """The wire bytes of this message in a frame with sequence number ``seq``."""
        return encode(self.TYPE, seq, self.payload())


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO


@dataclass(frozen=True)
class GenerateKey(Message):
    """Make a key pair (unless one is kept) and return a chunk of its CSR from ``offset``."""

    TYPE: ClassVar[MsgType] = MsgType.GENERATE_KEY
    key_type: KeyType
    replace: bool = False
    offset: int = 0

    def __post_init__(self) -> None:
        if self.replace and self.offset:
            raise _bad("GENERATE_KEY: REPLACE is only valid at offset 0")

    def payload(self) -> bytes:
        return struct.pack(">BBH", self.key_type, 0x01 if self.replace else 0x00, self.offset)

    @classmethod
    def parse(cls, payload: bytes) -> GenerateKey:
        r = _Reader(payload, "GENERATE_KEY")
        key_type, flags, offset = r.u8(), r.u8(), r.u16()
        r.end()
        if flags & ~0x01:
            raise _bad("GENERATE_KEY: reserved flag bits set")
        return cls(KeyType(_enum(KeyType, key_type, "key type")), bool(flags & 0x01), offset)


@dataclass(frozen=True)
class _Chunk(Message):
    """``u16 total | u16 offset | data``: one piece of an object of ``total`` bytes."""

    total: int
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        if not (1 <= self.total <= 0xFFFF) or not (0 <= self.offset <= 0xFFFF):
            raise _bad(f"{self.TYPE.name}: total or offset out of range")
        if self.offset + len(self.data) > self.total:
            raise _bad(f"{self.TYPE.name}: chunk runs past the object's end")

    def payload(self) -> bytes:
        return struct.pack(">HH", self.total, self.offset) + self.data

    @classmethod
    def parse(cls: type[M], payload: bytes) -> M:
        r = _Reader(payload, cls.TYPE.name)
        total, offset, data = r.u16(), r.u16(), r.rest()
        return cls(total, offset, data)  # type: ignore[call-arg]


@dataclass(frozen=True)
class _Put(_Chunk):
    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise _bad(f"{self.TYPE.name}: empty chunk")


@dataclass(frozen=True)
class PutKey(_Put):
    """Host-generated-key mode: a PKCS#8 DER private key."""

    TYPE: ClassVar[MsgType] = MsgType.PUT_KEY


@dataclass(frozen=True)
class PutCert(_Put):
    """The device certificate and its CA chain (see :func:`objects.encode_cert_bundle`)."""

    TYPE: ClassVar[MsgType] = MsgType.PUT_CERT


@dataclass(frozen=True)
class PutConfig(_Put):
    """Broker, device id and trust anchors (see :class:`objects.DeviceConfig`)."""

    TYPE: ClassVar[MsgType] = MsgType.PUT_CONFIG


@dataclass(frozen=True)
class ReadBack(Message):
    TYPE: ClassVar[MsgType] = MsgType.READ_BACK


@dataclass(frozen=True)
class Prove(Message):
    """Sign the station's fresh nonce with the stored key."""

    TYPE: ClassVar[MsgType] = MsgType.PROVE
    nonce: bytes

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE:
            raise _bad(f"PROVE: nonce must be {NONCE_SIZE} bytes")

    def payload(self) -> bytes:
        return self.nonce

    @classmethod
    def parse(cls, payload: bytes) -> Prove:
        r = _Reader(payload, "PROVE")
        nonce = r.take(NONCE_SIZE)
        r.end()
        return cls(nonce)


@dataclass(frozen=True)
class _FingerprintMessage(Message):
    """A message whose whole payload is one certificate fingerprint (32 bytes)."""

    fingerprint: bytes

    def __post_init__(self) -> None:
        _hash(self.fingerprint, f"{self.TYPE.name} fingerprint")

    def payload(self) -> bytes:
        return self.fingerprint

    @classmethod
    def parse(cls, payload: bytes) -> Self:
        r = _Reader(payload, cls.TYPE.name)
        fp = r.take(HASH_SIZE)
        r.end()
        return cls(fp)


@dataclass(frozen=True)
class Commit(_FingerprintMessage):
    """Mark the device provisioned with the certificate of this fingerprint."""

    TYPE: ClassVar[MsgType] = MsgType.COMMIT


@dataclass(frozen=True)
class Erase(Message):
    """Wipe key, certificate, chain, config and the committed mark; ``hardware_id`` confirms the target."""

    TYPE: ClassVar[MsgType] = MsgType.ERASE
    hardware_id: str

    def payload(self) -> bytes:
        return _str8(self.hardware_id)

    @classmethod
    def parse(cls, payload: bytes) -> Erase:
        r = _Reader(payload, "ERASE")
        hw = r.str8()
        r.end()
        return cls(hw)


# -- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Info(Message):
    """Who the device is, what it can do and what it already holds."""

    TYPE: ClassVar[MsgType] = MsgType.INFO
    protocol_version: int
    max_payload: int
    capabilities: Capability
    key_types: KeyTypes
    state: DeviceState
    hardware_id: str
    model: str
    firmware: str
    public_key: bytes = b""
    cert_fingerprint: bytes = b""

    def __post_init__(self) -> None:
        if not (MIN_DEVICE_PAYLOAD <= self.max_payload <= 0xFFFF):
            raise _bad(f"INFO: max payload {self.max_payload} is below the {MIN_DEVICE_PAYLOAD}-byte minimum")
        if self.cert_fingerprint and len(self.cert_fingerprint) != HASH_SIZE:
            raise _bad("INFO: certificate fingerprint must be empty or 32 bytes")

    def payload(self) -> bytes:
        return (
            struct.pack(
                ">BHBBB", self.protocol_version, self.max_payload, self.capabilities, self.key_types, self.state
            )
            + _str8(self.hardware_id)
            + _str8(self.model)
            + _str8(self.firmware)
            + _bytes8(self.public_key)
            + _bytes8(self.cert_fingerprint)
        )

    @classmethod
    def parse(cls, payload: bytes) -> Info:
        r = _Reader(payload, "INFO")
        version, max_payload, caps, key_types, state = r.u8(), r.u16(), r.u8(), r.u8(), r.u8()
        info = cls(
            version,
            max_payload,
            Capability(caps),
            KeyTypes(key_types),
            DeviceState(state),
            r.str8(),
            r.str8(),
            r.str8(),
            r.bytes8(),
            r.bytes8(),
        )
        r.end()
        return info


@dataclass(frozen=True)
class Csr(_Chunk):
    """A chunk of the DER CSR for the device's key (``u16 total | u16 offset | data``)."""

    TYPE: ClassVar[MsgType] = MsgType.CSR


@dataclass(frozen=True)
class _Ack(Message):
    """``u16 received | u8 complete | 32-byte SHA-256 of the stored object (zeros until complete)``."""

    received: int
    complete: bool
    sha256: bytes = bytes(HASH_SIZE)

    def __post_init__(self) -> None:
        _hash(self.sha256, f"{self.TYPE.name} hash")

    def payload(self) -> bytes:
        return struct.pack(">HB", self.received, 1 if self.complete else 0) + self.sha256

    @classmethod
    def parse(cls: type[M], payload: bytes) -> M:
        r = _Reader(payload, cls.TYPE.name)
        received, complete, digest = r.u16(), r.u8(), r.take(HASH_SIZE)
        r.end()
        if complete > 1:
            raise _bad(f"{cls.TYPE.name}: complete must be 0 or 1")
        return cls(received, bool(complete), digest)  # type: ignore[call-arg]


@dataclass(frozen=True)
class KeyAck(_Ack):
    TYPE: ClassVar[MsgType] = MsgType.KEY_ACK


@dataclass(frozen=True)
class CertAck(_Ack):
    TYPE: ClassVar[MsgType] = MsgType.CERT_ACK


@dataclass(frozen=True)
class ConfigAck(_Ack):
    TYPE: ClassVar[MsgType] = MsgType.CONFIG_ACK


@dataclass(frozen=True)
class Hashes(Message):
    """SHA-256 of each stored item; all zeros for an item the device does not hold."""

    TYPE: ClassVar[MsgType] = MsgType.HASHES
    state: DeviceState
    key: bytes
    cert: bytes
    chain: bytes
    config: bytes

    def __post_init__(self) -> None:
        for name in ("key", "cert", "chain", "config"):
            _hash(getattr(self, name), f"HASHES {name}")

    def payload(self) -> bytes:
        return bytes([self.state]) + self.key + self.cert + self.chain + self.config

    @classmethod
    def parse(cls, payload: bytes) -> Hashes:
        r = _Reader(payload, "HASHES")
        hashes = cls(DeviceState(r.u8()), r.take(HASH_SIZE), r.take(HASH_SIZE), r.take(HASH_SIZE), r.take(HASH_SIZE))
        r.end()
        return hashes


@dataclass(frozen=True)
class Signature(Message):
    TYPE: ClassVar[MsgType] = MsgType.SIGNATURE
    algorithm: SigAlg
    signature: bytes

    def __post_init__(self) -> None:
        if not (1 <= len(self.signature) <= 255):
            raise _bad("SIGNATURE: signature must be 1-255 bytes")

    def payload(self) -> bytes:
        return bytes([self.algorithm]) + self.signature

    @classmethod
    def parse(cls, payload: bytes) -> Signature:
        r = _Reader(payload, "SIGNATURE")
        alg = SigAlg(_enum(SigAlg, r.u8(), "signature algorithm"))
        return cls(alg, r.rest())


@dataclass(frozen=True)
class Committed(_FingerprintMessage):
    TYPE: ClassVar[MsgType] = MsgType.COMMITTED


@dataclass(frozen=True)
class Erased(Message):
    TYPE: ClassVar[MsgType] = MsgType.ERASED


@dataclass(frozen=True)
class Error(Message):
    """``u8 code | u16 arg | str8 text``; ``arg`` carries e.g. the expected offset of BAD_OFFSET."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int
    arg: int = 0
    text: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.code <= 0xFF and 0 <= self.arg <= 0xFFFF):
            raise _bad("ERROR: code or arg out of range")
        if len(self.text.encode("utf-8")) > MAX_TEXT:
            raise _bad(f"ERROR: text longer than {MAX_TEXT} bytes")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_ERRORS

    @property
    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"0x{self.code:02X}"

    def payload(self) -> bytes:
        return struct.pack(">BH", self.code, self.arg) + _str8(self.text)

    @classmethod
    def parse(cls, payload: bytes) -> Error:
        r = _Reader(payload, "ERROR")
        code, arg, text = r.u8(), r.u16(), r.str8()
        r.end()
        if len(text.encode("utf-8")) > MAX_TEXT:
            raise _bad(f"ERROR: text longer than {MAX_TEXT} bytes")
        return cls(code, arg, text)


MESSAGES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, GenerateKey, PutKey, PutCert, PutConfig, ReadBack, Prove, Commit, Erase,
        Info, Csr, KeyAck, CertAck, ConfigAck, Hashes, Signature, Committed, Erased, Error,
    )
}
REQUESTS = frozenset(t for t in MESSAGES if t < MsgType.ERROR)


def response_type(request: MsgType) -> MsgType:
    return MsgType(request | RESPONSE_BIT)


def parse_message(frame: Frame) -> Message:
    """Decode a frame's payload into its message.

    Raises:
        ProtocolError: ``unsupported-version``, ``unknown-type`` or ``bad-payload``.
    """
    if frame.version != VERSION:
        raise ProtocolError("unsupported-version", f"protocol version {frame.version} (this side speaks {VERSION})")
    cls = MESSAGES.get(frame.type)
    if cls is None:
        raise ProtocolError("unknown-type", f"unknown message type 0x{frame.type:02X}")
    try:
        return cls.parse(frame.payload)
    except ProtocolError:
        raise
    except (ValueError, TypeError, struct.error) as exc:  # enum/flag construction on hostile input
        raise _bad(f"{cls.TYPE.name}: {exc}") from None


ERROR_FOR_PROTOCOL_CODE: dict[str, ErrorCode] = {
    "unsupported-version": ErrorCode.UNSUPPORTED_VERSION,
    "unknown-type": ErrorCode.UNKNOWN_TYPE,
    "bad-payload": ErrorCode.BAD_PAYLOAD,
    "oversize": ErrorCode.OVERSIZE,
}
