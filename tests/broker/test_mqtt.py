"""The gate's sans-I/O CONNECT codec: byte vectors, malformed input, and agreement with amqtt's parser."""

from __future__ import annotations

import asyncio
import struct

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.connect import ConnectPacket
from hypothesis import given, settings
from hypothesis import strategies as st

from iotauth.broker.mqtt import (
    Connect,
    MalformedPacket,
    UnsupportedProtocol,
    Will,
    connack,
    encode_connect,
    fixed_header,
    parse_connect,
)


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
def test_amqtt_parses_exactly_what_the_gate_decided(connect: Connect) -> None:
    """No parser differential: amqtt reads the same client id, session flag and will from the re-encoded CONNECT."""
    packet = encode_connect(connect)
    size, _ = fixed_header(packet)  # type: ignore[misc]
    assert parse_connect(packet[size:]) == connect
    parsed = asyncio.run(ConnectPacket.from_stream(BufferReader(packet)))
    assert parsed.client_id == connect.client_id
    assert parsed.clean_session_flag == connect.clean_session
    assert parsed.keep_alive == connect.keep_alive
    assert parsed.will_flag == (connect.will is not None)
    if connect.will is not None:
        assert (parsed.will_topic, parsed.will_message, parsed.will_qos, parsed.will_retain_flag) == (
            connect.will.topic, connect.will.message, connect.will.qos, connect.will.retain)
    assert parsed.username == connect.username
