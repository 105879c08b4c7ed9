"""Raw MQTT over TLS against the gate: what a hostile client can do with bytes, not with a friendly library."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

from iotauth.broker.mqtt import Connect, encode_connect
from tests.fixtures.broker import BrokerProcess, DeviceCreds, Pki, audit_events, connect, wait_for

_GOOD = encode_connect(Connect("raw-reserved-flag", True, 30))
RESERVED_FLAG_SET = _GOOD[:9] + bytes([_GOOD[9] | 0x01]) + _GOOD[10:]  # byte 9 holds the connect flags


def tls_socket(broker: BrokerProcess, creds: DeviceCreds) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(creds.ca))
    context.load_cert_chain(creds.cert, creds.key)
    raw = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_until_closed(sock: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ssl.SSLError, ConnectionError, TimeoutError):
        pass
    return data


def publish(topic: str, payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + payload
    return bytes([0x30, len(body)]) + body


def subscribe(packet_id: int, topic_filter: str) -> bytes:
    body = struct.pack("!H", packet_id) + struct.pack("!H", len(topic_filter)) + topic_filter.encode() + b"\x01"
    return bytes([0x82, len(body)]) + body


def test_pipelined_packets_after_connect_are_kept_and_checked(broker: BrokerProcess, pki: Pki) -> None:
    sensor, ingest = pki.issue("pipe-sensor"), pki.issue("pipe-ingest", "ingest")
    with connect(broker.port, ingest) as service:
        service.subscribe("devices/+/telemetry/#")
        with tls_socket(broker, sensor) as sock:
            sock.sendall(encode_connect(Connect("pipe-sensor", True, 30))
                         + publish("devices/other/telemetry/spoof", b"evil")
                         + publish("devices/pipe-sensor/telemetry/ok", b"fine")
                         + subscribe(7, "devices/+/commands/#"))
            replies = sock.recv(4096)
            while len(replies) < 9:
                replies += sock.recv(4096)
            assert replies[:4] == b"\x20\x02\x00\x00"  # CONNACK accepted
            assert replies[4:9] == b"\x90\x03\x00\x07\x80"  # SUBACK: refused
        assert [m.payload for m in service.receive_all()] == [b"fine"]


def test_a_second_connect_can_not_switch_identity(broker: BrokerProcess, pki: Pki) -> None:
    attacker, victim = pki.issue("second-attacker"), pki.issue("second-victim")
    with connect(broker.port, victim) as live:
        live.subscribe("devices/second-victim/commands/#")
        with tls_socket(broker, attacker) as sock:
            sock.sendall(encode_connect(Connect("second-attacker", True, 30)))
            assert sock.recv(4) == b"\x20\x02\x00\x00"
            sock.sendall(encode_connect(Connect("second-victim", True, 30)))  # [MQTT-3.1.0-2]: a protocol violation
            read_until_closed(sock)
        assert live.is_connected()
        with connect(broker.port, pki.issue("second-ingest", "ingest")) as service:
            service.publish("devices/second-victim/commands/ping", b"still mine")
            assert live.receive().payload == b"still mine"


@pytest.mark.parametrize(
    ("name", "first_bytes", "reason"),
    [
        ("publish-first", publish("devices/x/telemetry/t", b"x"), "malformed-connect"),
        ("garbage", b"\xff" * 32, "malformed-connect"),
        ("oversized", b"\x10\xff\xff\xff\x01", "malformed-connect"),
        ("reserved-flag", RESERVED_FLAG_SET, "malformed-connect"),
    ],
)
def test_malformed_first_packets_get_no_connack(broker: BrokerProcess, pki: Pki, name: str, first_bytes: bytes,
                                                reason: str) -> None:
    creds = pki.issue(f"raw-{name}")
    before = len(audit_events(broker.home, "broker.connect.denied"))
    with tls_socket(broker, creds) as sock:
        sock.sendall(first_bytes)
        assert read_until_closed(sock) == b""
    denials = wait_for(lambda: audit_events(broker.home, "broker.connect.denied")[before:], message="audit")
    assert any(e.data["reason"] == reason for e in denials)


def test_mqtt5_connect_is_answered_in_mqtt5s_own_form(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("raw-mqtt5")
    body = struct.pack("!H", 4) + b"MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00" + struct.pack(
        "!H", len(creds.device_id)) + creds.device_id.encode()
    with tls_socket(broker, creds) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        # CONNACK, remaining length 3, no session, reason 0x84 "Unsupported Protocol Version", no properties
        assert read_until_closed(sock) == b"\x20\x03\x00\x84\x00"


def test_mqtt31_connect_is_answered_with_unacceptable_protocol(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("raw-mqtt31")
    body = struct.pack("!H", 6) + b"MQIsdp" + bytes([3, 0x02]) + struct.pack("!H", 30) + struct.pack(
        "!H", len(creds.device_id)) + creds.device_id.encode()
    with tls_socket(broker, creds) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        assert read_until_closed(sock) == b"\x20\x02\x00\x01"


@pytest.mark.parametrize("clean", [True, False])
def test_empty_client_id_is_identifier_rejected(broker: BrokerProcess, pki: Pki, clean: bool) -> None:
    """MQTT-3.1.3-8: a zero-length client id with CleanSession=0 gets 0x02. With CleanSession=1 the server
    may assign one, but the client id must be the certificate's device id, so it is refused the same way."""
    creds = pki.issue(f"raw-empty-id-{int(clean)}")
    with tls_socket(broker, creds) as sock:
        sock.sendall(encode_connect(Connect("", clean, 30)))
        assert read_until_closed(sock) == b"\x20\x02\x00\x02"
    record = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                               if e.data.get("fingerprint") == creds.fingerprint], message="audit")[-1]
    assert record.data["reason"] == "client-id-empty" and record.device_id == creds.device_id
