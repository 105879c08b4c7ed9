"""``iotauth broker --metrics-bind``: what a scrape shows follows what the broker decided, on either engine."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from iotauth.broker.metrics import SCOPES, topic_denial_reason
from iotauth.broker.throttle import Refusal
from iotauth.config import Home, load_settings
from iotauth.policy import Action, PolicySet
from tests.fixtures import iotauth_executable
from tests.fixtures.broker import (
    ENGINES,
    BrokerProcess,
    ConnectRefused,
    Device,
    Pki,
    audit_events,
    iotauth_cli,
    new_home,
    on_engines,
    wait_for,
)
from tests.fixtures.metrics import Exposition, scrape

engine = on_engines(*ENGINES)


@pytest.fixture
def observed(tmp_path: Path, engine: str) -> tuple[BrokerProcess, Pki]:
    home = new_home(tmp_path)
    pki = Pki(home, tmp_path / "devices")
    pki.issue("already-there")  # in the fleet summary read at start
    process = BrokerProcess(home, ("--metrics-bind", "0"), engine=engine).start()
    yield process, pki
    process.stop()


def metrics(broker: BrokerProcess) -> Exposition:
    assert broker.metrics_port is not None
    return scrape(f"http://127.0.0.1:{broker.metrics_port}/metrics")


def test_a_scrape_follows_connects_denials_topics_and_revocations(observed: tuple[BrokerProcess, Pki],
                                                                  engine: str) -> None:
    broker, pki = observed
    start = metrics(broker)
    assert start.value("iotauth_broker_connects_accepted_total") == 0
    assert start.value("iotauth_broker_info", engine=engine, version=start_version(start)) == 1
    assert start.value("iotauth_registry_devices", status="active") == 1
    assert start.value("iotauth_broker_registry_up") == 1 and start.value("iotauth_broker_audit_up") == 1

    creds = pki.issue("m-1")
    device = Device(broker.port, creds).connect()
    assert device.subscribe("#") == [0x80]
    device.publish("devices/someone-else/telemetry/t", qos=0)
    device.publish("devices/m-1/telemetry/t", qos=1)
    with pytest.raises(ConnectRefused):
        Device(broker.port, creds, client_id="not-m-1").connect()
    reasons = wait_for(lambda: {e.data["reason"] for e in audit_events(broker.home, "broker.connect.denied")},
                       message="denial audited")

    def settled() -> Exposition | None:
        now = metrics(broker)
        done = (now.value("iotauth_broker_connects_accepted_total") >= 1
                and now.total("iotauth_broker_connects_denied_total") >= 1
                and now.value("iotauth_broker_topic_denied_total", action="subscribe", reason="not-allowed") >= 1
                and now.value("iotauth_broker_topic_denied_total", action="publish", reason="not-allowed") >= 1)
        return now if done else None

    now = wait_for(settled, message="counters")
    for reason in reasons:
        assert now.value("iotauth_broker_connects_denied_total", reason=reason) >= 1, reason
    assert now.value("iotauth_broker_sessions", profile="default", state="connected") == 1
    if engine == "iotauth":
        assert now.value("iotauth_broker_messages_received_total") >= 1
    else:  # amqtt keeps no message counters of ours: the families are absent, not zero
        assert "iotauth_broker_messages_received" not in now.families

    result = iotauth_cli(broker.home, "revoke", "m-1", "--reason", "key-compromise")
    assert result.returncode == 0, result.stderr
    device.wait_disconnected(timeout=10.0)
    kick = wait_for(lambda: [e for e in audit_events(broker.home, "broker.session.kicked") if e.device_id == "m-1"],
                    message="kick audited")[-1]
    after = wait_for(lambda: (lambda m: m if m.value("iotauth_broker_revocation_disconnect_seconds_count") else None)(
        metrics(broker)), message="revocation latency observed")
    assert after.value("iotauth_broker_disconnects_total", reason=kick.data["reason"]) == 1
    assert after.value("iotauth_broker_revocation_disconnect_seconds_count") == 1
    assert after.value("iotauth_broker_revocation_disconnect_seconds_bucket", le="+Inf") == 1
    assert after.value("iotauth_broker_sessions", profile="default", state="connected") == 0
    assert after.value("iotauth_broker_feed_cursor") >= kick.data["trigger_event"]
    assert broker.stop() == 0  # SIGTERM still stops the broker: the exporter does not take the signals


def start_version(exposition: Exposition) -> str:
    [version] = [dict(labels)["version"] for (name, labels) in exposition.samples if name == "iotauth_broker_info"]
    return version


def test_connections_waiting_for_their_handshake_are_counted(observed: tuple[BrokerProcess, Pki]) -> None:
    broker, _pki = observed
    idle = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(3)]
    try:
        wait_for(lambda: metrics(broker).value("iotauth_broker_preauth_pending", phase="handshake") == 3,
                 message="three pending handshakes")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: metrics(broker).value("iotauth_broker_preauth_pending", phase="handshake") == 0,
             message="pending handshakes gone")
    closed = wait_for(lambda: metrics(broker).value("iotauth_broker_connects_denied_total",
                                                    reason="closed-before-handshake"), message="closed early")
    assert closed == 3


def test_a_taken_metrics_port_is_one_line_and_no_broker(tmp_path: Path) -> None:
    home = new_home(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([iotauth_executable(), "--home", str(home.root), "broker", "--bind", "127.0.0.1:0",
                                 "--metrics-bind", str(port)], capture_output=True, text=True, timeout=60,
                                check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: cannot listen for metrics on 127.0.0.1:{port}" in result.stderr


def test_every_refusal_has_a_source_class_and_every_policy_denial_a_reason(home: Home) -> None:
    assert set(SCOPES) == set(Refusal)
    policy = PolicySet.from_profiles(load_settings(home).profiles.values()).bind("default", "d-1")
    cases = {
        (Action.PUBLISH, "devices/+/telemetry"): "malformed",
        (Action.SUBSCRIBE, "a/#/b"): "malformed",
        (Action.PUBLISH, "$SYS/broker"): "system-topic",
        (Action.SUBSCRIBE, "devices/+/commands/#"): "not-allowed",
        (Action.PUBLISH, "devices/d-2/telemetry/t"): "not-allowed",
        (Action.RECEIVE, "devices/d-2/commands/x"): "not-allowed",
    }
    for (action, topic), expected in cases.items():
        assert topic_denial_reason(policy.denial_reason(action, topic)) == expected, (action, topic)
    assert topic_denial_reason(policy.denial_reason("connect", "x")) == "unknown-action"
    assert topic_denial_reason("certificate-revoked") == "session-revoked"  # a kicked binding's reason


def test_sigint_stops_a_broker_with_metrics_cleanly(observed: tuple[BrokerProcess, Pki]) -> None:
    broker, _pki = observed
    assert broker.stop(signal.SIGINT) == 0
    assert [e.kind for e in audit_events(broker.home)][-1] == "broker.stopped"
