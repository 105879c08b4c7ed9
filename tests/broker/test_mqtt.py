"""The gate's sans-I/O CONNECT codec: byte vectors, malformed input, round trips.

(That amqtt parses the re-encoded CONNECT the same way is an amqtt assumption: ``test_amqtt_contract.py``.)
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotauth.broker.mqtt import (
    Connect,
    Will,
    connack,
    encode_connect,
    fixed_header,
    parse_connect,
)
from iotauth.errors import MalformedPacket, UnsupportedProtocol


def s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def body(flags: int, payload: bytes, name: str = "MQTT", level: int = 4, keep_alive: int = 30) -> bytes:
    return s(name) + bytes([level, flags]) + struct.pack("!H", keep_alive) + payload


def test_minimal_connect_vector() -> None:
    packet = bytes.fromhex("101000044d5154540402003c000464657631")
    size, remaining = fixed_header(packet)  # type: ignore[misc]
    assert (size, remaining) == (2, 16)
    connect = parse_connect(packet[size:])
    assert connect == Connect("dev1", clean_session=True, keep_alive=60)
    assert encode_connect(connect) == packet


def test_full_connect_round_trips() -> None:
    connect = Connect("dev1", False, 10, Will("devices/dev1/state", b"\x00offline", 1, True), "user", b"\xffpw")
    packet = encode_connect(connect)
    size, remaining = fixed_header(packet)  # type: ignore[misc]
    assert size + remaining == len(packet)
    assert parse_connect(packet[size:]) == connect


def test_fixed_header_needs_more_bytes_or_rejects() -> None:
    assert fixed_header(b"") is None
    assert fixed_header(b"\x10") is None
    assert fixed_header(b"\x10\x80") is None
    assert fixed_header(b"\x10\xff\xff\xff\x7f") == (5, 268_435_455)
    with pytest.raises(MalformedPacket, match="four bytes"):
        fixed_header(b"\x10\xff\xff\xff\xff\x01")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (body(0x03, s("dev1")), "reserved"),
        (body(0x1C, s("dev1") + s("t") + s("m")), "QoS 3"),
        (body(0x08, s("dev1")), "without the will flag"),
        (body(0x20, s("dev1")), "without the will flag"),
        (body(0x40, s("dev1") + s("pw")), "password flag"),
        (body(0x02, s("dev1") + b"\x00"), "trailing"),
        (body(0x02, s(b"\xff\xfe")), "UTF-8"),
        (body(0x02, s("de\x00v")), "NUL"),
        (body(0x06, s("dev1") + s("topic")), "shorter"),
        (body(0x02, s("dev1"), name="HTTP"), "unknown protocol"),
        (b"\x00", "shorter"),
    ],
)
def test_malformed_connects_are_refused(raw: bytes, needle: str) -> None:
    with pytest.raises(MalformedPacket, match=needle):
        parse_connect(raw)


@pytest.mark.parametrize(("name", "level"), [("MQIsdp", 3), ("MQTT", 5), ("MQTT", 3)])
def test_other_protocol_levels_are_unsupported(name: str, level: int) -> None:
    with pytest.raises(UnsupportedProtocol):
        parse_connect(body(0x02, s("dev1"), name=name, level=level))


def test_connack_bytes() -> None:
    assert connack(0) == b"\x20\x02\x00\x00"
    assert connack(5) == b"\x20\x02\x00\x05"
    assert connack(0, session_present=True) == b"\x20\x02\x01\x00"


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(draw(_text.filter(bool)), draw(st.binary(max_size=40)), draw(st.integers(0, 2)),
                    draw(st.booleans()))
    username = draw(st.none() | _text)
    password = draw(st.none() | st.binary(max_size=20)) if username is not None else None
    # Only non-empty client ids: an empty one never equals a device id, so the gate never admits it.
    return Connect(draw(_text.filter(bool)), draw(st.booleans()), draw(st.integers(0, 65535)), will, username, password)


@settings(max_examples=300, deadline=None)
@given(connect=connects())
def test_any_connect_round_trips(connect: Connect) -> None:
    """What the gate decided is what it re-encodes for the host: ``parse_connect(encode_connect(c)) == c``."""
    packet = encode_connect(connect)
    size, _ = fixed_header(packet)  # type: ignore[misc]
    assert parse_connect(packet[size:]) == connect


# -- every packet after CONNECT ------------------------------------------------------------

from iotauth.broker.mqtt import (  # noqa: E402
    FrameReader,
    PacketType,
    Publish,
    encode_ack,
    encode_publish,
    parse_packet_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    suback,
    topic_field,
)
from iotauth.errors import PacketTooLarge  # noqa: E402

PUBLISH_QOS1 = bytes.fromhex("32120009") + b"a/b/c/d/e" + bytes.fromhex("0007") + b"hello"


def test_frames_split_across_reads_and_several_in_one() -> None:
    reader = FrameReader(1024)
    two = PUBLISH_QOS1 + bytes.fromhex("c000")  # a PUBLISH and a PINGREQ
    assert list(reader.feed(two[:3])) == []
    assert reader.buffered == 3
    frames = list(reader.feed(two[3:]))
    assert [(first >> 4, len(body)) for first, body in frames] == [(3, 18), (12, 0)]
    assert reader.buffered == 0


def test_an_oversize_frame_is_refused_from_its_header_alone() -> None:
    reader = FrameReader(100)
    with pytest.raises(PacketTooLarge, match="max_packet_size: 16388 > 100"):
        list(reader.feed(bytes([0x30, 0x80, 0x80, 0x01])))  # a 16 KiB PUBLISH announced, 0 bytes of body sent


def test_publish_vectors() -> None:
    first, body = next(FrameReader(1024).feed(PUBLISH_QOS1))
    assert parse_publish(first & 0x0F, body) == Publish("a/b/c/d/e", b"hello", 1, False, False, 7)
    assert encode_publish(topic_field("a/b/c/d/e"), b"hello", 1, False, packet_id=7) == PUBLISH_QOS1
    assert encode_publish(topic_field("t"), b"", 0, True) == bytes.fromhex("3103000174")
    assert encode_publish(topic_field("t"), b"x", 2, False, dup=True, packet_id=258) == bytes.fromhex(
        "3c06000174010278")
    long = encode_publish(topic_field("t"), b"x" * 200, 0, False)
    assert long[:3] == bytes([0x30, 0xCB, 0x01])  # remaining length 203 in two bytes


@pytest.mark.parametrize(
    ("flags", "body", "needle"),
    [
        (0x06, b"\x00\x01a\x00\x01", "QoS 3"),
        (0x00, b"\x00", "shorter than its topic"),
        (0x00, b"\x00\x05ab", "runs past"),
        (0x00, b"\x00\x01#", "wildcard"),
        (0x00, b"\x00\x03a/+", "wildcard"),
        (0x00, b"\x00\x00", "empty"),
        (0x00, b"\x00\x02\xff\xfe", "UTF-8"),
        (0x00, b"\x00\x02a\x00", "NUL"),
        (0x02, b"\x00\x01a", "no packet id"),
        (0x02, b"\x00\x01a\x00\x00", "packet id 0"),
    ],
)
def test_malformed_publishes(flags: int, body: bytes, needle: str) -> None:
    with pytest.raises(MalformedPacket, match=needle):
        parse_publish(flags, body)


def test_acknowledgement_vectors() -> None:
    assert encode_ack(PacketType.PUBACK, 7) == bytes.fromhex("40020007")
    assert encode_ack(PacketType.PUBREL, 0x0102) == bytes.fromhex("62020102")
    assert encode_ack(PacketType.UNSUBACK, 1) == bytes.fromhex("b0020001")
    assert parse_packet_id(PacketType.PUBREL, 0x02, b"\x01\x02") == 0x0102
    with pytest.raises(MalformedPacket, match="reserved flags"):
        parse_packet_id(PacketType.PUBREL, 0x00, b"\x00\x01")  # MQTT-3.6.1-1
    with pytest.raises(MalformedPacket, match="not 2"):
        parse_packet_id(PacketType.PUBACK, 0x00, b"\x00\x01\x00")


def test_subscribe_and_unsubscribe_vectors() -> None:
    body = b"\x00\x0a" + b"\x00\x03a/#\x01" + b"\x00\x01b\x02"
    assert parse_subscribe(0x02, body).requests == (("a/#", 1), ("b", 2))
    assert suback(10, [1, 0x80]) == bytes.fromhex("9004000a0180")
    for bad, needle in ((b"\x00\x01", "without a topic filter"), (b"\x00\x01\x00\x01a\x03", "QoS"),
                        (b"\x00\x01\x00\x01a\x05", "QoS")):
        with pytest.raises(MalformedPacket, match=needle):
            parse_subscribe(0x02, bad)
    with pytest.raises(MalformedPacket, match="reserved flags"):
        parse_subscribe(0x00, body)
    assert parse_unsubscribe(0x02, b"\x00\x02\x00\x01a\x00\x01b").filters == ("a", "b")
    with pytest.raises(MalformedPacket, match="without a topic filter"):
        parse_unsubscribe(0x02, b"\x00\x02")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_the_frame_reader_never_misbehaves_on_garbage(data: bytes, step: int) -> None:
    """Whatever arrives, in whatever pieces: whole frames within the limit, or one of our own errors."""
    reader = FrameReader(256)
    seen = 0
    try:
        for at in range(0, len(data), step):
            for first, body in reader.feed(data[at : at + step]):
                seen += 1 + len(body)
                assert len(body) <= 256
                kind = first >> 4
                if kind == PacketType.PUBLISH:
                    with contextlib.suppress(MalformedPacket):
                        parse_publish(first & 0x0F, body)
                elif kind == PacketType.SUBSCRIBE:
                    with contextlib.suppress(MalformedPacket):
                        parse_subscribe(first & 0x0F, body)
    except (MalformedPacket, PacketTooLarge):
        pass
    assert seen <= len(data)
