"""Property and fuzz tests: the decoder survives anything and only ever raises the protocol's own error."""

from __future__ import annotations

import contextlib
import struct
import zlib

from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotauth.provisioning.codec import (
    MAX_ENCODED,
    MAX_PAYLOAD,
    Deframer,
    Frame,
    FrameError,
    ProtocolError,
    decode,
    encode,
)
from iotauth.provisioning.messages import MESSAGES, parse_message
from iotauth.provisioning.objects import DeviceConfig, decode_cert_bundle

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=MAX_PAYLOAD),
)


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_random_bytes_never_raises_anything_else(data: bytes) -> None:
    buffer = data
    while True:
        try:
            consumed, _frame = decode(buffer)
        except FrameError as exc:
            dropped = exc.consumed
        else:
            dropped = 0
        if dropped:
            assert dropped <= len(buffer)
            buffer = buffer[dropped:]
            continue
        if consumed == 0:
            break
        buffer = buffer[consumed:]
    assert len(buffer) <= MAX_ENCODED  # never told to keep more than one frame's worth


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(1, 64), max_size=50))
def test_deframer_random_stream_in_random_chunks(data: bytes, cuts: list[int]) -> None:
    deframer = Deframer()
    position = 0
    for size in [*cuts, len(data)]:
        for event in deframer.feed(data[position : position + size]):
            assert isinstance(event, Frame | FrameError)
        position += size
    assert deframer.buffered <= MAX_ENCODED + 64


@FUZZ
@given(frames)
def test_round_trip(frame: Frame) -> None:
    wire = frame.encode()
    assert wire.count(0) == 1 and wire.endswith(b"\x00")
    consumed, decoded = decode(wire)
    assert consumed == len(wire) and decoded == frame


@FUZZ
@given(st.lists(frames, min_size=1, max_size=4), st.binary(max_size=64), st.integers(1, 97))
def test_frames_survive_garbage_and_any_split(frames_: list[Frame], garbage: bytes, chunk: int) -> None:
    """Garbage before a frame costs at most that garbage: every frame after a delimiter is recovered."""
    stream = garbage + b"\x00" + b"".join(f.encode() for f in frames_)
    deframer = Deframer()
    got = []
    for start in range(0, len(stream), chunk):
        got += [e for e in deframer.feed(stream[start : start + chunk]) if isinstance(e, Frame)]
    assert got[-len(frames_) :] == frames_


@FUZZ
@given(frames, st.integers(0, 2000), st.integers(0, 7))
def test_a_flipped_bit_is_detected(frame: Frame, position: int, bit: int) -> None:
    wire = bytearray(frame.encode())
    index = position % (len(wire) - 1)  # never the delimiter
    wire[index] ^= 1 << bit
    events = Deframer().feed(bytes(wire))
    assert events and all(isinstance(e, FrameError) for e in events)


@FUZZ
@given(frames, st.integers(1, 2000))
def test_truncated_frames_are_errors(frame: Frame, cut: int) -> None:
    wire = frame.encode()
    truncated = wire[: cut % (len(wire) - 1)] + b"\x00"
    for event in Deframer().feed(truncated):
        assert isinstance(event, FrameError)


@FUZZ
@given(st.integers(MAX_PAYLOAD + 1, 0xFFFF), st.binary(max_size=64))
def test_oversize_length_fields_are_refused(length: int, payload: bytes) -> None:
    body = struct.pack(">BBHH", 1, 4, 9, length) + payload
    wire = bytes(cobs.encode(body + struct.pack(">I", zlib.crc32(body)))) + b"\x00"
    events = Deframer().feed(wire)
    assert len(events) == 1 and isinstance(events[0], FrameError)


@FUZZ
@given(st.integers(MAX_ENCODED + 1, 6000))
def test_runaway_input_is_bounded_and_recovered(size: int) -> None:
    deframer = Deframer()
    events = deframer.feed(b"\x42" * size)
    assert [e.code for e in events if isinstance(e, FrameError)] == ["oversize"]
    assert deframer.buffered <= MAX_ENCODED
    hello = encode(1, 5)
    assert deframer.feed(b"\x00" + hello)[-1] == Frame(1, 5)


@FUZZ
@given(st.sampled_from(sorted(MESSAGES)), st.binary(max_size=300))
def test_message_parsers_only_raise_protocol_errors(msg_type: int, payload: bytes) -> None:
    try:
        message = parse_message(Frame(msg_type, 1, payload))
    except ProtocolError:
        return
    assert message.payload() == payload  # whatever parses, re-encodes to the same bytes (one encoding)


@FUZZ
@given(st.binary(max_size=600))
def test_object_decoders_only_raise_protocol_errors(data: bytes) -> None:
    for decoder in (decode_cert_bundle, DeviceConfig.decode):
        with contextlib.suppress(ProtocolError):
            decoder(data)
