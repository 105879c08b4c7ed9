"""Policy reload: SIGHUP or an edited ``iotauth.toml`` changes the rights of sessions that are already live."""

from __future__ import annotations

import signal

from iotauth.config import Home
from tests.fixtures.broker import BrokerProcess, Device, Pki, connect, go_offline

OPS = """
[profiles.ops]
publish = ["#"]
subscribe = ["#"]
"""


def meter_profile(publish: list[str], subscribe: list[str]) -> str:
    quoted = lambda rules: "[" + ", ".join(f'"{r}"' for r in rules) + "]"  # noqa: E731
    return f"\n[profiles.meter]\npublish = {quoted(publish)}\nsubscribe = {quoted(subscribe)}\n"


class Config:
    """Rewrites ``iotauth.toml`` with a changing ``meter`` profile on top of what ``init`` wrote."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.base = home.config_file.read_text() + OPS

    def write(self, publish: list[str], subscribe: list[str], extra: str = "") -> None:
        self.home.config_file.write_text(self.base + meter_profile(publish, subscribe) + extra)


WIDE = (["meters/{device_id}/reading", "devices/{device_id}/state"],
        ["meters/{device_id}/cmd/#", "devices/{device_id}/commands/#"])
NARROW = (["devices/{device_id}/state"], ["devices/{device_id}/commands/#"])


def start(broker_factory) -> tuple[BrokerProcess, Pki, Config]:  # type: ignore[no-untyped-def]
    holder: dict[str, Config] = {}

    def configure(home: Home) -> None:
        holder["config"] = Config(home)
        holder["config"].write(*WIDE)

    broker, pki = broker_factory(configure=configure)
    return broker, pki, holder["config"]


def test_sighup_reload_applies_to_live_sessions(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker, pki, config = start(broker_factory)
    meter, ops = pki.issue("m1", "meter"), pki.issue("ops1", "ops")
    with connect(broker.port, meter) as device, connect(broker.port, ops) as operator:
        operator.subscribe("meters/+/reading")
        operator.subscribe("devices/+/state")
        assert device.subscribe("meters/m1/cmd/#") == [1]
        assert device.subscribe("devices/m1/commands/#") == [1]
        device.publish("meters/m1/reading", b"1")
        assert operator.receive().topic == "meters/m1/reading"
        operator.publish("meters/m1/cmd/x", b"before")
        assert device.receive().payload == b"before"

        config.write(*NARROW)
        broker.send_signal(signal.SIGHUP)
        broker.wait_log("subscriptions dropped")

        device.publish("meters/m1/reading", b"2")  # no longer allowed
        device.publish("devices/m1/state", b"ok")  # control
        assert [m.topic for m in operator.receive_all()] == ["devices/m1/state"]
        operator.publish("meters/m1/cmd/x", b"after")  # the live subscription was withdrawn
        operator.publish("devices/m1/commands/y", b"control")
        assert [m.payload for m in device.receive_all()] == [b"control"]
        assert device.subscribe("meters/m1/cmd/#") == [0x80]
    assert "1 subscriptions dropped" in broker.wait_log("policies reloaded")


def test_editing_the_file_reloads_without_a_signal(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker, pki, config = start(broker_factory)
    meter, ops = pki.issue("m2", "meter"), pki.issue("ops2", "ops")
    config.write(*NARROW)
    broker.wait_log("changed: reloading policies")
    with connect(broker.port, meter) as device, connect(broker.port, ops) as operator:
        operator.subscribe("meters/+/reading")
        device.publish("meters/m2/reading", b"denied")
        assert operator.receive_all() == []
        config.write(*WIDE)
        broker.wait_log("generation 3")
        device.publish("meters/m2/reading", b"allowed")
        assert operator.receive().payload == b"allowed"


def test_a_broken_config_keeps_the_previous_rules(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker, pki, config = start(broker_factory)
    meter, ops = pki.issue("m3", "meter"), pki.issue("ops3", "ops")
    config.write(["meters/{device}/oops"], NARROW[1])  # unknown placeholder
    broker.send_signal(signal.SIGHUP)
    broker.wait_log("policy reload failed, keeping the previous rules")
    with connect(broker.port, meter) as device, connect(broker.port, ops) as operator:
        operator.subscribe("meters/+/reading")
        device.publish("meters/m3/reading", b"still-wide")
        assert operator.receive().payload == b"still-wide"


def test_resumed_session_does_not_inherit_withdrawn_subscriptions(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker, pki, config = start(broker_factory)
    meter, ops = pki.issue("m4", "meter"), pki.issue("ops4", "ops")
    device = Device(broker.port, meter, clean_session=False).connect()
    assert device.subscribe("meters/m4/cmd/#") == [1]
    assert device.subscribe("devices/m4/commands/#") == [1]
    go_offline(broker, device)
    with connect(broker.port, ops) as operator:
        operator.publish("meters/m4/cmd/queued-before", b"q1")  # queued for the offline session
        config.write(*NARROW)
        broker.send_signal(signal.SIGHUP)
        broker.wait_log("policies reloaded")
        operator.publish("meters/m4/cmd/queued-after", b"q2")
        operator.publish("devices/m4/commands/ok", b"ok")
    with Device(broker.port, meter, clean_session=False).connect() as resumed:
        assert resumed.session_present
        assert [m.payload for m in resumed.receive_all()] == [b"ok"]
