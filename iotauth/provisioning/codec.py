"""Sans-I/O framing of the provisioning wire protocol (spec: ``firmware_tools/PROTOCOL.md``).

One raw frame, all integers big-endian::

    offset 0        1        2          4          6                6+N
           +--------+--------+----------+----------+----------------+-----------+
           | ver    | type   | seq      | length N | payload        | CRC-32    |
           | u8 = 1 | u8     | u16      | u16      | N <= 1024 bytes| u32       |
           +--------+--------+----------+----------+----------------+-----------+
           CRC-32 is zlib.crc32 (IEEE 802.3) over bytes 0 .. 6+N-1.

On the wire every raw frame is COBS-encoded and followed by one 0x00
delimiter. COBS output never contains 0x00, so after line noise, a partial
frame or a reset a receiver resynchronises at the next delimiter: garbage can
cost at most the frame it overlaps, never the parser. A raw frame is at most
``MAX_RAW`` (1034) bytes, so an encoded frame is at most ``MAX_ENCODED``
(1039) bytes plus the delimiter; anything longer is refused without being
buffered.

This module does no I/O and imports neither serial nor asyncio: the device
emulator and the station share it byte for byte. Every malformed input ends in
:class:`FrameError` (a :class:`ProtocolError`), which says how many bytes to
drop; no other exception escapes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from cobs import cobs

from iotauth.errors import FrameError, ProtocolError

VERSION = 1
MAX_PAYLOAD = 1024
HEADER = struct.Struct(">BBHH")
CRC = struct.Struct(">I")
MIN_RAW = HEADER.size + CRC.size
MAX_RAW = HEADER.size + MAX_PAYLOAD + CRC.size
MAX_ENCODED = MAX_RAW + (MAX_RAW + 253) // 254
DELIMITER = 0
SEQ_UNSOLICITED = 0


@dataclass(frozen=True)
class Frame:
    """One decoded frame: the header fields and the raw payload."""

    type: int
    seq: int
    payload: bytes = b""
    version: int = VERSION
    # The received CRC identifies a request exactly (the device's retransmit cache keys on seq + CRC).
    crc: int = field(default=0, compare=False)

    def encode(self) -> bytes:
        return encode(self.type, self.seq, self.payload, version=self.version)


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 as zlib computes it (polynomial 0x04C11DB7, reflected, init and xorout 0xFFFFFFFF)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def raw_frame(msg_type: int, seq: int, payload: bytes, *, version: int = VERSION) -> bytes:
    """The unstuffed frame: header, payload and CRC."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("oversize", f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
    if not (0 <= msg_type <= 0xFF and 0 <= seq <= 0xFFFF and 0 <= version <= 0xFF):
        raise ProtocolError("bad-header", "type, seq or version out of range")
    body = HEADER.pack(version, msg_type, seq, len(payload)) + payload
    return body + CRC.pack(crc32(body))


def encode(msg_type: int, seq: int, payload: bytes = b"", *, version: int = VERSION) -> bytes:
    """Bytes to put on the wire for one frame: COBS(raw frame) + 0x00."""
    return bytes(cobs.encode(raw_frame(msg_type, seq, payload, version=version))) + b"\x00"


def decode(buffer: bytes | bytearray | memoryview) -> tuple[int, Frame | None]:
    """Decode the first frame in ``buffer``.

    Returns:
        ``(consumed, frame)``: drop ``consumed`` bytes from the buffer, then
        use ``frame``. ``(0, None)`` means more bytes are needed;
        ``(n, None)`` with n > 0 means empty frames (bare delimiters) were skipped.

    Raises:
        FrameError: the bytes up to and including the next delimiter (or, for
            an over-long run without one, the whole buffer) are not a valid
            frame; ``consumed`` says how many to drop.
    """
    # Nothing past one maximal frame is examined, so copying more would make a buffer of many frames quadratic.
    data = bytes(buffer[: MAX_ENCODED + 1])
    skipped = 0
    while skipped < len(data) and data[skipped] == DELIMITER:
        skipped += 1
    if skipped:
        return skipped, None
    end = data.find(DELIMITER, 0, MAX_ENCODED + 1)
    if end < 0:
        if len(data) > MAX_ENCODED:
            # Drop only the scanned run (no delimiter in it); the rest of the runaway frame follows.
            raise FrameError("oversize", f"no delimiter within {MAX_ENCODED} bytes", MAX_ENCODED + 1,
                             unterminated=True)
        return 0, None
    consumed = end + 1
    return consumed, _unpack(data[:end], consumed)


def _unpack(stuffed: bytes, consumed: int) -> Frame:
    try:
        raw = bytes(cobs.decode(stuffed))
    except cobs.DecodeError as exc:
        raise FrameError("bad-cobs", f"COBS decoding failed: {exc}", consumed) from None
    if len(raw) < MIN_RAW:
        raise FrameError("short", f"frame of {len(raw)} bytes is shorter than the {MIN_RAW}-byte minimum", consumed)
    if len(raw) > MAX_RAW:
        raise FrameError("oversize", f"frame of {len(raw)} bytes exceeds {MAX_RAW}", consumed)
    body, (received_crc,) = raw[: -CRC.size], CRC.unpack(raw[-CRC.size :])
    if crc32(body) != received_crc:
        raise FrameError("bad-crc", "CRC-32 mismatch", consumed)
    version, msg_type, seq, length = HEADER.unpack_from(body)
    payload = body[HEADER.size :]
    if length != len(payload):
        raise FrameError("bad-length", f"length field says {length} bytes, frame carries {len(payload)}", consumed)
    return Frame(msg_type, seq, payload, version, received_crc)


class Deframer:
    """Turn a byte stream into frames and frame errors, in order.

    The one piece of state :func:`decode` cannot keep: after an over-long run
    without a delimiter, the rest of that run (up to the next 0x00) is skipped
    instead of being reported as a second broken frame.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def reset(self) -> None:
        self._buffer.clear()
        self._skipping = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FrameError]:
        """Add received bytes; return every complete frame (or error) they finish."""
        self._buffer += data
        events: list[Frame | FrameError] = []
        while self._buffer:
            if self._skipping:
                end = self._buffer.find(DELIMITER)
                if end < 0:
                    self._buffer.clear()
                    break
                del self._buffer[: end + 1]
                self._skipping = False
                continue
            try:
                consumed, frame = decode(self._buffer)
            except FrameError as exc:
                del self._buffer[: exc.consumed]
                self._skipping = exc.unterminated
                events.append(exc)
                continue
            if consumed == 0:
                break
            del self._buffer[:consumed]
            if frame is not None:
                events.append(frame)
        return events

