"""What one authenticated device can make the broker hold, and what it costs that device to try.

Each limit of ``[broker.limits]`` / ``[profiles.NAME.limits]`` is broken on purpose by a raw client: the
connection is closed and the audit log names the limit. Protocol violations close the connection without
the rest of the bad packet ever being read as packets of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.fixtures.broker import BrokerProcess, Pki, audit_events, configured_home, connect, running_broker, wait_for
from tests.fixtures.raw_mqtt import (
    PUBLISH,
    PUBREC,
    RawClient,
    mqtt_string,
    packet,
    publish_packet,
    subscribe_packet,
    varint,
)

LIMITS = """
[broker.limits]
max_packet_size = 4096
max_subscriptions = 5
max_filters_per_subscribe = 3
max_inflight = 4
max_retained = 3

[profiles.wide]
publish = ["#"]
subscribe = ["#"]

[profiles.wide.limits]
max_subscriptions = 50
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki]]:
    with running_broker(configured_home(tmp_path_factory.mktemp("limits"), limits=LIMITS)) as started:
        yield started


def limit_record(broker: BrokerProcess, device_id: str, kind: str = "broker.limit.exceeded") -> dict:
    def find() -> dict | None:
        for event in reversed(audit_events(broker.home, kind)):
            if event.device_id == device_id:
                return event.data
        return None

    return wait_for(find, message=f"{kind} for {device_id}")


def test_a_packet_over_the_size_limit_is_refused_from_its_header(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-size")
    with RawClient(broker.port, creds) as client:
        assert client.connect() == (0, False)
        topic = mqtt_string("devices/lim-size/telemetry/big")
        client.send(bytes([0x30]) + varint(64 * 1024 * 1024) + topic + b"x" * 1000)  # claims 64 MiB, sends 1 KB
        assert client.closed()
    record = limit_record(broker, "lim-size")
    assert record["limit"] == "max_packet_size" and "67108869 > 4096" in record["detail"]


def test_too_many_filters_in_one_subscribe(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-filters")
    with RawClient(broker.port, creds) as client:
        client.connect()
        client.send(subscribe_packet(1, [(f"devices/lim-filters/commands/{n}", 1) for n in range(4)]))
        assert client.closed()
    assert limit_record(broker, "lim-filters")["limit"] == "max_filters_per_subscribe"


def test_too_many_subscriptions_and_a_profile_override(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-subs")
    with RawClient(broker.port, creds) as client:
        client.connect()
        for n in range(5):
            assert client.subscribe([(f"devices/lim-subs/commands/{n}", 1)], packet_id=n + 1) == [1]
        assert client.subscribe([("devices/lim-subs/commands/0", 0)], packet_id=9) == [0]  # replacing is fine
        client.send(subscribe_packet(10, [("devices/lim-subs/commands/5", 1)]))
        assert client.closed()
    assert limit_record(broker, "lim-subs")["limit"] == "max_subscriptions"
    wide = pki.issue("lim-wide", "wide")
    with RawClient(broker.port, wide) as client:
        client.connect()
        for n in range(10):  # 10 > the default 5: the profile's own limit applies
            assert client.subscribe([(f"x/{n}", 0)], packet_id=n + 1) == [0]


def test_unreleased_qos2_messages_are_bounded_even_on_denied_topics(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-qos2")
    with RawClient(broker.port, creds) as client:
        client.connect()
        for packet_id in range(1, 5):  # max_inflight = 4: PUBREC each, never PUBREL
            client.send(publish_packet("devices/someone-else/commands/x", b"y", qos=2, packet_id=packet_id))
            assert client.expect(PUBREC).packet_id == packet_id
        client.send(publish_packet("devices/someone-else/commands/x", b"y", qos=2, packet_id=5))
        assert client.closed()
    assert limit_record(broker, "lim-qos2")["limit"] == "max_inflight"


def test_retained_messages_per_device(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-retain")
    with RawClient(broker.port, creds) as client:
        client.connect()
        for n in range(3):
            client.publish(f"devices/lim-retain/telemetry/{n}", b"v", qos=1, packet_id=n + 1, retain=True)
        client.publish("devices/lim-retain/telemetry/0", b"v2", qos=1, packet_id=7, retain=True)  # replace: fine
        client.publish("devices/lim-retain/telemetry/1", b"", qos=1, packet_id=8, retain=True)  # clear: frees one
        client.publish("devices/lim-retain/telemetry/3", b"v", qos=1, packet_id=9, retain=True)
        client.send(publish_packet("devices/lim-retain/telemetry/4", b"v", qos=1, packet_id=10, retain=True))
        assert client.closed()
    assert limit_record(broker, "lim-retain")["limit"] == "max_retained"


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("wildcard-topic", publish_packet("devices/lim-x/telemetry/#", b"\x30\x00" * 8)),
        ("invalid-utf8", publish_packet(b"devices/\xff\xfe/telemetry", b"\x30\x00" * 8)),
        ("qos3", packet(0x36, mqtt_string("devices/lim-x/telemetry/a") + b"\x00\x01" + b"\x30\x00" * 8)),
        ("server-packet", packet(0x20, b"\x00\x00")),
        ("pubrel-flags", packet(0x60, b"\x00\x01")),
        ("subscribe-flags", packet(0x80, struct.pack("!H", 1) + mqtt_string("devices/lim-x/commands/a") + b"\x00")),
        ("empty-subscribe", packet(0x82, struct.pack("!H", 1))),
        ("second-connect", packet(0x10, mqtt_string("MQTT") + b"\x04\x02\x00\x1e" + mqtt_string("lim-x"))),
    ],
)
def test_malformed_packets_close_the_connection_and_nothing_inside_is_parsed(
        limited: tuple[BrokerProcess, Pki], name: str, bad: bytes) -> None:
    """The payloads are full of bytes that would be PUBLISH packets if parsing ever desynchronised."""
    broker, pki = limited
    creds, ingest = pki.issue(f"lim-bad-{name}"), pki.issue(f"lim-ingest-{name}", "ingest")
    with connect(broker.port, ingest) as watcher:
        watcher.subscribe(f"devices/lim-bad-{name}/telemetry/#")
        with RawClient(broker.port, creds) as client:
            client.connect()
            client.send(bad + publish_packet(f"devices/lim-bad-{name}/telemetry/after", b"must not arrive"))
            assert client.closed()
        assert watcher.receive_all(0.5) == []
    record = limit_record(broker, f"lim-bad-{name}", "broker.protocol.violation")
    assert record["limit"] == "protocol-violation"


def test_a_denied_dollar_publish_is_audited_and_keeps_the_connection(limited: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = limited
    creds = pki.issue("lim-dollar", "wide")
    with RawClient(broker.port, creds) as client:
        client.connect()
        assert client.subscribe([("+/+", 1)]) == [1]
        client.publish("$SYS/fake", b"x", qos=1, packet_id=3)  # acknowledged (3.1.1 has no negative PUBACK)
        client.publish("x/y", b"ok", qos=1, packet_id=4)
        delivered = [p for p in client.held if p.kind == PUBLISH]
        if not delivered:
            delivered = [client.expect(PUBLISH)]
        assert [p.topic for p in delivered] == ["x/y"]
    denied = wait_for(lambda: [e for e in audit_events(broker.home, "broker.publish.denied")
                               if e.device_id == "lim-dollar"], message="publish denial")
    assert denied[0].data["reason"] == "system topics are never allowed"
