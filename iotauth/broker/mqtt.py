"""The few MQTT 3.1.1 packets the gate handles itself: CONNECT in, CONNACK out. Sans-I/O.

The gate reads the first packet of every connection *before* amqtt sees a
byte of it, decides, and -- when it admits the client -- hands amqtt a CONNECT
that it re-encoded from the values it decided on (:func:`encode_connect`),
never the client's original bytes. So amqtt cannot parse a different client
id, clean-session flag or will topic out of the same packet than the gate did:
there is no parser differential to exploit.

CONNECT layout (MQTT 3.1.1, section 3.1)::

    byte 0        0x10 (type 1, flags 0)
    1..4 bytes    remaining length (base-128 varint, at most 4 bytes)
    2+n           protocol name "MQTT"       (UTF-8 string: u16 length + bytes)
    1             protocol level 4
    1             connect flags  user|pass|will-retain|will-qos(2)|will|clean|reserved(0)
    2             keep alive (seconds)
    2+n           client id
    [2+n  2+n]    will topic, will message   (if will flag)
    [2+n]         user name                  (if user-name flag)
    [2+n]         password                   (if password flag)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iotauth.errors import MalformedPacket, UnsupportedProtocol

CONNECT_TYPE = 0x10
PROTOCOL_NAME = "MQTT"
PROTOCOL_LEVEL = 4

# CONNACK return codes (3.2.2.3)
ACCEPTED = 0x00
UNACCEPTABLE_PROTOCOL = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
NOT_AUTHORISED = 0x05

_USERNAME, _PASSWORD, _WILL_RETAIN, _WILL, _CLEAN, _RESERVED = 0x80, 0x40, 0x20, 0x04, 0x02, 0x01


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


def fixed_header(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """``(header_size, remaining_length)`` of a CONNECT at the start of ``buffer``; ``None`` if incomplete.

    Raises:
        MalformedPacket: the first byte is not CONNECT or the length varint is invalid.
    """
    if not buffer:
        return None
    if buffer[0] != CONNECT_TYPE:
        raise MalformedPacket(f"first packet is not CONNECT (byte 0x{buffer[0]:02x})")
    length, multiplier = 0, 1
    for index in range(1, 5):
        if index >= len(buffer):
            return None
        byte = buffer[index]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return index + 1, length
        multiplier *= 128
    raise MalformedPacket("remaining length is longer than four bytes")


class _Cursor:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, count: int) -> bytes:
        end = self.at + count
        if end > len(self.body):
            raise MalformedPacket("CONNECT is shorter than its fields")
        chunk, self.at = self.body[self.at : end], end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def data(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str) -> str:
        raw = self.data()
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
    """
    cursor = _Cursor(body)
    name = cursor.text("protocol name")
    level = cursor.u8()
    if name != PROTOCOL_NAME or level != PROTOCOL_LEVEL:
        if name in (PROTOCOL_NAME, "MQIsdp"):
            raise UnsupportedProtocol(f"protocol {name} level {level} is not MQTT 3.1.1")
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
    if cursor.at != len(body):
        raise MalformedPacket("trailing bytes after the CONNECT payload")
    return Connect(client_id, bool(flags & _CLEAN), keep_alive, will, username, password)


def _string(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("MQTT string longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def encode_connect(connect: Connect) -> bytes:
    """The canonical encoding of ``connect`` (what amqtt is handed)."""
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
    body = _string(PROTOCOL_NAME.encode()) + bytes([PROTOCOL_LEVEL, flags]) + struct.pack("!H", connect.keep_alive)
    body += payload
    return bytes([CONNECT_TYPE]) + _remaining_length(len(body)) + body


def connack(return_code: int, session_present: bool = False) -> bytes:
    return bytes([0x20, 0x02, 0x01 if session_present else 0x00, return_code])
