"""MQTT 3.1.1 packets, sans-I/O: a frame splitter, strict decoders and encoders. No asyncio, no sockets.

The broker reads every byte a client sends through :class:`FrameReader`, which
cuts the stream into whole packets *before* anything is decoded. A packet is
only ever decoded from its own bytes, so a packet that fails to decode cannot
leave the rest of its body to be read as further packets (MQTT 3.1.1 §4.8: a
protocol violation closes the connection, and the reader is never used again).
A length above the connection's limit is refused from the fixed header alone,
before its body is buffered.

The gate decodes the first packet (CONNECT) and hands the core a CONNECT
*re-encoded* from the values it decided on (:func:`encode_connect`), never the
client's original bytes, so no second parser can read a different client id,
clean-session flag or will out of the same packet.

Fixed header (§2.2)::

    byte 0        type (4 bits) | flags (4 bits)
    1..4 bytes    remaining length (base-128 varint, at most 4 bytes)

CONNECT (§3.1)::

    2+n           protocol name "MQTT"       (UTF-8 string: u16 length + bytes)
    1             protocol level 4
    1             connect flags  user|pass|will-retain|will-qos(2)|will|clean|reserved(0)
    2             keep alive (seconds)
    2+n           client id
    [2+n  2+n]    will topic, will message   (if will flag)
    [2+n]         user name                  (if user-name flag)
    [2+n]         password                   (if password flag)

PUBLISH (§3.3): flags ``dup|qos(2)|retain``; topic (UTF-8 string), packet id
(u16, QoS > 0 only), payload (the rest). PUBACK/PUBREC/PUBREL/PUBCOMP carry a
packet id (PUBREL's flags are ``0010``). SUBSCRIBE (flags ``0010``): packet id,
then ``filter, qos`` pairs; UNSUBSCRIBE (flags ``0010``): packet id, filters.
PINGREQ and DISCONNECT have no body.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from iotauth.errors import MalformedPacket, PacketTooLarge, UnsupportedProtocol

PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4
MAX_REMAINING_LENGTH = 268_435_455


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


CONNECT_TYPE = 0x10

# CONNACK return codes (3.2.2.3)
ACCEPTED = 0x00
UNACCEPTABLE_PROTOCOL = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
BAD_CREDENTIALS = 0x04
NOT_AUTHORISED = 0x05
SUBSCRIBE_FAILURE = 0x80

MQTT5_UNSUPPORTED_VERSION = bytes([0x20, 0x03, 0x00, 0x84, 0x00])
"""CONNACK in MQTT 5's form, reason 0x84 "Unsupported Protocol Version" (MQTT 5.0 §3.2.2.2): what an MQTT 5
client can parse. MQTT 3.1.1 clients never see it: only a CONNECT with protocol level 5 is answered so."""

_USERNAME, _PASSWORD, _WILL_RETAIN, _WILL, _CLEAN, _RESERVED = 0x80, 0x40, 0x20, 0x04, 0x02, 0x01
_U16 = struct.Struct("!H")


@dataclass(frozen=True)
class Will:
    topic: str
    message: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    client_id: str
    clean_session: bool
    keep_alive: int
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    requests: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


# -- framing -------------------------------------------------------------------------------


def fixed_header(buffer: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """``(header_size, remaining_length)`` of the packet at ``buffer[start:]``; ``None`` if incomplete.

    Raises:
        MalformedPacket: the length varint is longer than four bytes.
    """
    length, multiplier = 0, 1
    end = len(buffer)
    for index in range(start + 1, start + 5):
        if index >= end:
            return None
        byte = buffer[index]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return index + 1 - start, length
        multiplier *= 128
    raise MalformedPacket("remaining length is longer than four bytes")


class FrameReader:
    """Cuts a byte stream into whole packets ``(first_byte, body)``, refusing any longer than ``max_size``.

    ``max_size`` counts the whole packet (fixed header included), as MQTT 5's
    Maximum Packet Size does. After an exception the stream is unusable: the
    caller closes the connection.
    """

    __slots__ = ("_buffer", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Add ``data`` and yield every packet now complete (a generator: consume it fully)."""
        buffer = self._buffer + data if self._buffer else data
        at, end = 0, len(buffer)
        try:
            while at < end:
                header = fixed_header(buffer, at)
                if header is None:
                    break
                size, remaining = header
                total = size + remaining
                if total > self.max_size:
                    raise PacketTooLarge(total, self.max_size)
                if at + total > end:
                    break
                yield buffer[at], buffer[at + size : at + total]
                at += total
        finally:
            self._buffer = buffer[at:] if at < end else b""


# -- decoding ------------------------------------------------------------------------------


class _Cursor:
    __slots__ = ("at", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, count: int) -> bytes:
        end = self.at + count
        if end > len(self.body):
            raise MalformedPacket("packet is shorter than its fields")
        chunk, self.at = self.body[self.at : end], end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def data(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str) -> str:
        return _text(self.data(), what)

    @property
    def exhausted(self) -> bool:
        return self.at >= len(self.body)


def _text(raw: bytes, what: str) -> str:
    """A UTF-8 string field (§1.5.3): well-formed, no NUL (MQTT-1.5.3-1, -2)."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{what} is not valid UTF-8") from exc
    if "\x00" in value:
        raise MalformedPacket(f"{what} contains NUL")
    return value


def parse_connect(body: bytes) -> Connect:
    """Decode the variable header and payload of a CONNECT (everything after the fixed header).

    Strict on purpose: reserved bits, inconsistent will flags, a password
    without a user name and trailing bytes are all malformed.

    Raises:
        UnsupportedProtocol: a well-formed CONNECT of another MQTT protocol level.
        MalformedPacket: anything else that is not a valid MQTT 3.1.1 CONNECT.
    """
    cursor = _Cursor(body)
    name = cursor.text("protocol name")
    level = cursor.u8()
    if name != PROTOCOL_NAME or level != PROTOCOL_LEVEL:
        if name in (PROTOCOL_NAME, "MQIsdp"):
            raise UnsupportedProtocol(level, f"protocol {name} level {level} is not MQTT 3.1.1")
        raise MalformedPacket(f"unknown protocol name {name[:16]!r}")
    flags = cursor.u8()
    keep_alive = cursor.u16()
    if flags & _RESERVED:
        raise MalformedPacket("reserved connect flag is set")
    will_qos = (flags >> 3) & 0x03
    has_will = bool(flags & _WILL)
    if will_qos == 3:
        raise MalformedPacket("will QoS 3 is invalid")
    if not has_will and (will_qos or flags & _WILL_RETAIN):
        raise MalformedPacket("will QoS/retain set without the will flag")
    if flags & _PASSWORD and not flags & _USERNAME:
        raise MalformedPacket("password flag without user name flag")
    client_id = cursor.text("client id")
    will = None
    if has_will:
        will = Will(cursor.text("will topic"), cursor.data(), will_qos, bool(flags & _WILL_RETAIN))
    username = cursor.text("user name") if flags & _USERNAME else None
    password = cursor.data() if flags & _PASSWORD else None
    if not cursor.exhausted:
        raise MalformedPacket("trailing bytes after the CONNECT payload")
    return Connect(client_id, bool(flags & _CLEAN), keep_alive, will, username, password)


def parse_publish(flags: int, body: bytes) -> Publish:
    """A PUBLISH from a client (§3.3): QoS 0-2, a valid topic *name*, a packet id when QoS > 0.

    The topic must not contain wildcards (MQTT-3.3.2-2) or NUL; the payload is opaque.
    """
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    if len(body) < 2:
        raise MalformedPacket("PUBLISH is shorter than its topic length")
    size = (body[0] << 8) | body[1]
    end = 2 + size
    if end > len(body):
        raise MalformedPacket("PUBLISH topic runs past the packet")
    raw = body[2:end]
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket("PUBLISH topic is not valid UTF-8") from exc
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise MalformedPacket("PUBLISH topic is empty or contains a wildcard or NUL")
    packet_id = 0
    if qos:
        if end + 2 > len(body):
            raise MalformedPacket("PUBLISH has no packet id")
        packet_id = (body[end] << 8) | body[end + 1]
        if packet_id == 0:
            raise MalformedPacket("PUBLISH packet id 0")
        end += 2
    return Publish(topic, body[end:], qos, bool(flags & 0x01), bool(flags & 0x08), packet_id)


def parse_packet_id(kind: PacketType, flags: int, body: bytes) -> int:
    """The packet id of a PUBACK, PUBREC, PUBREL or PUBCOMP (exactly two bytes; PUBREL's flags are 0010)."""
    expected = 0x02 if kind is PacketType.PUBREL else 0x00
    if flags != expected:
        raise MalformedPacket(f"{kind.name} with reserved flags 0x{flags:x}")
    if len(body) != 2:
        raise MalformedPacket(f"{kind.name} body is {len(body)} bytes, not 2")
    return (body[0] << 8) | body[1]


def parse_subscribe(flags: int, body: bytes) -> Subscribe:
    """SUBSCRIBE (§3.8): flags 0010, a packet id, one or more (filter, requested QoS) pairs."""
    if flags != 0x02:
        raise MalformedPacket(f"SUBSCRIBE with reserved flags 0x{flags:x}")
    cursor = _Cursor(body)
    packet_id = cursor.u16()
    requests = []
    while not cursor.exhausted:
        topic_filter = cursor.text("topic filter")
        options = cursor.u8()
        if options & 0xFC or options == 3:
            raise MalformedPacket("SUBSCRIBE requested QoS is invalid")
        requests.append((topic_filter, options))
    if not requests:
        raise MalformedPacket("SUBSCRIBE without a topic filter")  # MQTT-3.8.3-3
    return Subscribe(packet_id, tuple(requests))


def parse_unsubscribe(flags: int, body: bytes) -> Unsubscribe:
    """UNSUBSCRIBE (§3.10): flags 0010, a packet id, one or more filters."""
    if flags != 0x02:
        raise MalformedPacket(f"UNSUBSCRIBE with reserved flags 0x{flags:x}")
    cursor = _Cursor(body)
    packet_id = cursor.u16()
    filters = []
    while not cursor.exhausted:
        filters.append(cursor.text("topic filter"))
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")  # MQTT-3.10.3-2
    return Unsubscribe(packet_id, tuple(filters))


def check_empty(kind: PacketType, flags: int, body: bytes) -> None:
    """PINGREQ and DISCONNECT: no flags, no body."""
    if flags or body:
        raise MalformedPacket(f"{kind.name} with flags or a body")


# -- encoding ------------------------------------------------------------------------------


def remaining_length(length: int) -> bytes:
    if length < 128:
        return bytes((length,))
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("MQTT string longer than 65535 bytes")
    return _U16.pack(len(data)) + data


def encode_connect(connect: Connect) -> bytes:
    """The canonical encoding of ``connect`` (what a host is handed)."""
    flags = _CLEAN if connect.clean_session else 0
    payload = bytearray(_string(connect.client_id.encode()))
    if connect.will is not None:
        flags |= _WILL | (connect.will.qos << 3) | (_WILL_RETAIN if connect.will.retain else 0)
        payload += _string(connect.will.topic.encode()) + _string(connect.will.message)
    if connect.username is not None:
        flags |= _USERNAME
        payload += _string(connect.username.encode())
    if connect.password is not None:
        flags |= _PASSWORD
        payload += _string(connect.password)
    body = _string(PROTOCOL_NAME.encode()) + bytes([PROTOCOL_LEVEL, flags]) + _U16.pack(connect.keep_alive)
    body += payload
    return bytes([CONNECT_TYPE]) + remaining_length(len(body)) + body


def connack(return_code: int, session_present: bool = False) -> bytes:
    return bytes([0x20, 0x02, 0x01 if session_present else 0x00, return_code])


def encode_publish(topic_field: bytes, payload: bytes, qos: int, retain: bool, dup: bool = False,
                   packet_id: int = 0) -> bytes:
    """A PUBLISH from a pre-encoded topic field (u16 length + UTF-8), shared by every copy of a message."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if qos:
        size = len(topic_field) + 2 + len(payload)
        return b"".join((bytes((first,)), remaining_length(size), topic_field, _U16.pack(packet_id), payload))
    size = len(topic_field) + len(payload)
    return b"".join((bytes((first,)), remaining_length(size), topic_field, payload))


def topic_field(topic: str) -> bytes:
    return _string(topic.encode())


def encode_ack(kind: PacketType, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0010), PUBCOMP or UNSUBACK."""
    first = (kind << 4) | (0x02 if kind is PacketType.PUBREL else 0)
    return bytes((first, 0x02, packet_id >> 8, packet_id & 0xFF))


def suback(packet_id: int, codes: list[int]) -> bytes:
    return bytes((0x90,)) + remaining_length(2 + len(codes)) + _U16.pack(packet_id) + bytes(codes)


PINGRESP = bytes([0xD0, 0x00])
