"""Delivery details the Paho suite does not check: QoS downgrade, the retain flag, the offline queue's bound."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.broker import BrokerProcess, Pki, audit_events, configured_home, running_broker, wait_for
from tests.fixtures.raw_mqtt import PUBLISH, RawClient

PROFILES = """
[profiles.open]
publish = ["q/#"]
subscribe = ["q/#"]

[profiles.open.limits]
max_queued = 5
"""


@pytest.fixture(scope="module")
def open_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki]]:
    with running_broker(configured_home(tmp_path_factory.mktemp("delivery"), extra=PROFILES)) as started:
        yield started


@pytest.mark.parametrize(("granted", "published", "expected"), [(2, 0, 0), (2, 1, 1), (2, 2, 2), (1, 2, 1), (0, 2, 0)])
def test_qos_is_the_lower_of_publish_and_subscription(open_broker: tuple[BrokerProcess, Pki], granted: int,
                                                      published: int, expected: int) -> None:
    """MQTT 3.1.1 §3.8.4: delivered at min(publish QoS, granted QoS)."""
    broker, pki = open_broker
    sub, pub = pki.issue(f"qos-sub-{granted}{published}", "open"), pki.issue(f"qos-pub-{granted}{published}", "open")
    topic = f"q/{granted}{published}"
    with RawClient(broker.port, sub) as subscriber, RawClient(broker.port, pub) as publisher:
        subscriber.connect()
        publisher.connect()
        assert subscriber.subscribe([(topic, granted)]) == [granted]
        publisher.publish(topic, b"m", qos=published, packet_id=9)
        got = subscriber.expect(PUBLISH)
        assert (got.topic, got.payload, got.qos) == (topic, b"m", expected)


def test_the_retain_flag_only_on_replay(open_broker: tuple[BrokerProcess, Pki]) -> None:
    """MQTT-3.3.1-8/-9: retained messages sent on SUBSCRIBE carry RETAIN; live forwards do not."""
    broker, pki = open_broker
    sub, pub = pki.issue("retain-sub", "open"), pki.issue("retain-pub", "open")
    with RawClient(broker.port, pub) as publisher:
        publisher.connect()
        publisher.publish("q/retained", b"old", qos=1, packet_id=1, retain=True)
        with RawClient(broker.port, sub) as subscriber:
            subscriber.connect()
            assert subscriber.subscribe([("q/retained", 1)]) == [1]
            replay = subscriber.expect(PUBLISH)
            assert (replay.payload, replay.retain) == (b"old", True)
            publisher.publish("q/retained", b"new", qos=1, packet_id=2, retain=True)
            live = subscriber.expect(PUBLISH)
            assert (live.payload, live.retain) == (b"new", False)
        publisher.publish("q/retained", b"", qos=1, packet_id=3, retain=True)  # cleared


def test_an_offline_queue_keeps_its_bound_and_says_what_it_dropped(open_broker: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = open_broker
    sub, pub = pki.issue("queue-sub", "open"), pki.issue("queue-pub", "open")
    with RawClient(broker.port, sub) as subscriber:
        assert subscriber.connect(clean=False) == (0, False)
        assert subscriber.subscribe([("q/queue", 1)]) == [1]
        subscriber.disconnect()
    with RawClient(broker.port, pub) as publisher:
        publisher.connect()
        for n in range(8):
            publisher.publish("q/queue", str(n).encode(), qos=1, packet_id=n + 1)
    with RawClient(broker.port, sub) as subscriber:
        assert subscriber.connect(clean=False) == (0, True)
        got = [subscriber.expect(PUBLISH) for _ in range(5)]
        assert [p.payload for p in got] == [b"0", b"1", b"2", b"3", b"4"]  # max_queued = 5, oldest first
        for packet in got:
            subscriber.ack(packet)
        with pytest.raises(TimeoutError):
            subscriber.read(0.5)
    record = wait_for(lambda: [e for e in audit_events(broker.home, "broker.limit.exceeded")
                               if e.device_id == "queue-sub"], message="audit")[-1]
    assert record.data["limit"] == "max_queued" and record.data["detail"].startswith("3 messages dropped")
