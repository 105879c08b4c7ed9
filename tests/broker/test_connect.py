"""Authentication and topic scope on a real broker: paho and mosquitto clients over real TLS.

One broker serves the whole module; every test uses device ids of its own.
Each rejection case has its own test and checks two things: the client never
gets CONNACK 0, and the audit log records the denial with its reason.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.fixtures.broker import (
    ENGINES,
    BrokerProcess,
    ConnectRefused,
    Device,
    DeviceCreds,
    Pki,
    audit_events,
    connect,
    mosquitto,
    on_engines,
    wait_for,
)
from tests.fixtures.pki import TRUST_DOMAIN

# Identity and topic scope are the gate's and the guard's: they must hold whichever engine is behind them.
engine = on_engines(*ENGINES)


def denial(broker: BrokerProcess, *, fingerprint: str | None = None, peer_client_id: str | None = None) -> dict:
    """The audit record of a denied connect, found by certificate fingerprint or by client id."""

    def find() -> dict | None:
        for event in reversed(audit_events(broker.home, "broker.connect.denied")):
            data = event.data
            if fingerprint is not None and data.get("fingerprint") == fingerprint:
                return {**data, "device_id": event.device_id}
            if peer_client_id is not None and data.get("client_id") == peer_client_id:
                return {**data, "device_id": event.device_id}
        return None

    return wait_for(find, message="denial audit record")


def refused(broker: BrokerProcess, creds: DeviceCreds | None, **kwargs: object) -> ConnectRefused:
    with pytest.raises(ConnectRefused) as caught:
        connect(broker.port, creds, **kwargs)
    return caught.value


# -- in scope ------------------------------------------------------------------------------


def test_devices_publish_and_subscribe_within_their_scope(broker: BrokerProcess, pki: Pki) -> None:
    sensor, ingest = pki.issue("scope-sensor"), pki.issue("scope-ingest", "ingest")
    with connect(broker.port, sensor) as device, connect(broker.port, ingest) as service:
        assert device.subscribe("devices/scope-sensor/commands/#") == [1]
        assert service.subscribe("devices/+/telemetry/#") == [1]
        assert service.subscribe("devices/+/state") == [1]
        device.publish("devices/scope-sensor/telemetry/temp", b"21.5")
        device.publish("devices/scope-sensor/state", b"ok")
        got = {(m.topic, m.payload) for m in (service.receive(), service.receive())}
        assert got == {("devices/scope-sensor/telemetry/temp", b"21.5"), ("devices/scope-sensor/state", b"ok")}
        service.publish("devices/scope-sensor/commands/reboot", b"now")
        assert device.receive().payload == b"now"
    accepted = [e for e in audit_events(broker.home, "broker.connect.accepted") if e.device_id == "scope-sensor"]
    assert accepted and accepted[-1].data["fingerprint"] == sensor.fingerprint
    assert accepted[-1].data["peer"].startswith("127.0.0.1:") and accepted[-1].data["client_id"] == "scope-sensor"


def test_out_of_scope_publishes_are_delivered_to_no_one(broker: BrokerProcess, pki: Pki) -> None:
    victim, attacker, ingest = pki.issue("oos-victim"), pki.issue("oos-attacker"), pki.issue("oos-ingest", "ingest")
    with connect(broker.port, victim) as v, connect(broker.port, ingest) as service, \
            connect(broker.port, attacker) as a:
        v.subscribe("devices/oos-victim/commands/#")
        service.subscribe("devices/+/telemetry/#")
        service.subscribe("devices/+/state")
        a.subscribe("devices/oos-attacker/commands/#")
        for topic in ("devices/oos-victim/commands/unlock", "devices/oos-victim/telemetry/spoof",
                      "devices/oos-victim/state", "devices/oos-attacker/commands/self",
                      "devices/oos-attacker/elsewhere"):
            a.publish(topic, b"evil", qos=1)
        a.publish("devices/oos-attacker/telemetry/ok", b"fine")  # control: in scope
        a.client.publish("$SYS/broker/x", b"evil", qos=0)  # amqtt closes connections that publish to '$' topics
        assert [m.topic for m in service.receive_all()] == ["devices/oos-attacker/telemetry/ok"]
        assert v.receive_all(0.2) == []
        assert a.receive_all(0.2) == []
    counted = wait_for(lambda: [e for e in audit_events(broker.home, "broker.publish.denied")
                                if e.device_id == "oos-attacker"], message="aggregated publish denials")
    assert sum(e.data["count"] for e in counted) >= 5


@pytest.mark.parametrize(
    "topic_filter",
    ["devices/+/commands/#", "#", "+/scope2/commands/#", "devices/#", "devices/scope2/#", "$SYS/#",
     "devices/other/commands/#", "devices/scope2/telemetry/#"],
)
def test_out_of_scope_subscribes_get_the_failure_code(broker: BrokerProcess, pki: Pki, topic_filter: str) -> None:
    creds = pki.issue(f"sub-{abs(hash(topic_filter)) % 10**8}")
    scoped = topic_filter.replace("scope2", creds.device_id)
    with connect(broker.port, creds) as device:
        assert device.subscribe(scoped) == [0x80]
        assert device.subscribe(f"devices/{creds.device_id}/commands/#") == [1]


def test_mosquitto_clients_work_the_same(broker: BrokerProcess, pki: Pki) -> None:
    sensor, ingest = pki.issue("mosq-sensor"), pki.issue("mosq-ingest", "ingest")
    import subprocess
    import threading

    holder: dict[str, subprocess.CompletedProcess[str]] = {}
    listener = threading.Thread(target=lambda: holder.setdefault("sub", mosquitto(
        "sub", broker.port, sensor, "-t", "devices/mosq-sensor/commands/#", "-C", "1", "-v", "-W", "15")))
    listener.start()
    wait_for(lambda: any(e.device_id == "mosq-sensor" for e in audit_events(broker.home, "broker.connect.accepted")),
             message="mosquitto_sub connected")
    import time

    time.sleep(0.3)  # let SUBSCRIBE land after CONNACK
    sent = mosquitto("pub", broker.port, ingest, "-t", "devices/mosq-sensor/commands/led", "-m", "on", "-q", "1")
    assert sent.returncode == 0, sent.stderr
    listener.join(20)
    assert holder["sub"].returncode == 0, holder["sub"].stderr
    assert holder["sub"].stdout.strip() == "devices/mosq-sensor/commands/led on"

    ok = mosquitto("pub", broker.port, sensor, "-t", "devices/mosq-sensor/telemetry/t", "-m", "1", "-q", "1")
    assert ok.returncode == 0, ok.stderr
    spoofed = mosquitto("pub", broker.port, sensor, "-t", "x", "-m", "1", client_id="mosq-ingest")
    assert spoofed.returncode != 0 and "not authori" in spoofed.stderr.lower()
    anonymous = mosquitto("pub", broker.port, None, "--cafile", str(sensor.ca), "-i", "mosq-sensor", "-t", "x",
                          "-m", "1")
    assert anonymous.returncode != 0


# -- every rejection case ------------------------------------------------------------------


def test_no_client_certificate(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("rej-nocert")
    error = refused(broker, None, client_id="rej-nocert", ca=creds.ca)
    assert error.code is None  # refused in the TLS handshake, before any MQTT
    records = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                                if e.data["reason"] == "tls-no-client-certificate"], message="audit")
    assert records[-1].device_id is None and records[-1].data["peer"].startswith("127.0.0.1:")


def test_expired_certificate(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-expired", not_before_offset=timedelta(days=-3), lifetime=timedelta(days=1), register=True)
    assert refused(broker, creds).code is None
    wait_for(lambda: any(e.data["reason"] == "tls-certificate-has-expired"
                         for e in audit_events(broker.home, "broker.connect.denied")), message="audit")


def test_not_yet_valid_certificate(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-future", not_before_offset=timedelta(days=1), register=True)
    assert refused(broker, creds).code is None
    wait_for(lambda: any(e.data["reason"] == "tls-certificate-is-not-yet-valid"
                         for e in audit_events(broker.home, "broker.connect.denied")), message="audit")


def test_certificate_from_another_ca(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-stranger", signer="stranger")
    assert refused(broker, creds).code is None
    wait_for(lambda: any(e.data["reason"].startswith("tls-unable-to-get-local-issuer")
                         for e in audit_events(broker.home, "broker.connect.denied")), message="audit")


def test_self_signed_certificate(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-selfsigned", signer="self")
    assert refused(broker, creds).code is None
    wait_for(lambda: any(e.data["reason"].startswith("tls-self-signed")
                         for e in audit_events(broker.home, "broker.connect.denied")), message="audit")


def test_certificate_without_client_auth_eku(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-noeku", client_auth=False, register=True)
    assert refused(broker, creds).code == 5
    record = denial(broker, fingerprint=creds.fingerprint)
    assert record["reason"] == "certificate-chain" and "extension" in record["detail"].lower()


def test_ca_certificate_used_as_a_client(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.ca_as_client()
    error = refused(broker, creds, client_id="rej-ca")
    assert error.code in (None, 5)
    record = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                               if e.data.get("fingerprint") == creds.fingerprint
                               or e.data["reason"] == "tls-unsupported-certificate-purpose"], message="audit")
    assert record[-1].data["reason"] in ("certificate-chain", "tls-unsupported-certificate-purpose")


def test_pending_certificate(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("rej-pending", pending=True)
    assert refused(broker, creds).code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "certificate-pending"


def test_suspended_device(broker: BrokerProcess, pki: Pki) -> None:
    import asyncio

    from iotauth.registry import open_registry

    creds = pki.issue("rej-suspended")

    async def suspend() -> None:
        async with await open_registry(broker.home.registry_db) as registry:
            await registry.suspend("rej-suspended", actor="test")

    asyncio.run(suspend())
    assert refused(broker, creds).code == 5
    record = denial(broker, fingerprint=creds.fingerprint)
    assert record["reason"] == "device-suspended" and record["device_id"] == "rej-suspended"


def test_revoked_certificate(broker: BrokerProcess, pki: Pki) -> None:
    import asyncio

    from iotauth.registry import RevocationReason, open_registry

    creds = pki.issue("rej-revoked")

    async def revoke() -> None:
        async with await open_registry(broker.home.registry_db) as registry:
            await registry.revoke("rej-revoked", RevocationReason.KEY_COMPROMISE, actor="test")

    asyncio.run(revoke())
    assert refused(broker, creds).code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "certificate-revoked"


def test_unknown_serial_signed_by_our_ca(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-unknown")  # a perfect certificate the registry never recorded
    assert refused(broker, creds).code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "certificate-unknown"


def test_client_id_mismatch(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("rej-mismatch")
    pki.issue("rej-mismatch-other")
    assert refused(broker, creds, client_id="rej-mismatch-other").code == 5
    record = denial(broker, peer_client_id="rej-mismatch-other")
    assert record["reason"] == "client-id-mismatch" and record["device_id"] == "rej-mismatch"


@pytest.mark.parametrize("hostile", ["evil/dev", "dev+", "dev#", "+", "#"])
def test_identity_with_separator_or_wildcard(broker: BrokerProcess, pki: Pki, hostile: str) -> None:
    creds = pki.forge(f"rej-hostile-{hostile}", common_name=hostile,
                      uris=[f"spiffe://{TRUST_DOMAIN}/device/{hostile}"])
    assert refused(broker, creds, client_id=hostile).code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "certificate-identity"


def test_cn_that_disagrees_with_the_uri_san(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.forge("rej-cn", common_name="rej-cn-a", uris=[f"spiffe://{TRUST_DOMAIN}/device/rej-cn-b"],
                      register=False)
    assert refused(broker, creds, client_id="rej-cn-b").code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "certificate-identity"


def test_will_topic_outside_the_policy_is_refused(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("rej-will")
    with pytest.raises(ConnectRefused) as caught:
        Device(broker.port, creds, will=("devices/someone-else/commands/unlock", b"x")).connect()
    assert caught.value.code == 5
    assert denial(broker, fingerprint=creds.fingerprint)["reason"] == "will-topic-denied"
    with Device(broker.port, creds, will=("devices/rej-will/state", b"offline")).connect():
        pass  # a will inside the policy is fine
