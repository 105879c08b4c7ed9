"""Adversarial session tests: a spoofing CONNECT must leave every other client exactly as it was.

Stock amqtt changes sessions before it authenticates: a clean-session CONNECT
deletes the client id's session, a persistent CONNECT re-uses it (and the cert
plugin then checks the *victim's* TLS connection), and take-over of a connected
client happens even when authentication fails. Each path an attacker could
take is tried here -- no certificate, a certificate of another device, a
certificate from another CA naming the victim, a certificate signed by our CA
naming the victim but unknown to the registry -- with clean and persistent
sessions, while the victim is online and while it is offline with QoS 1
messages queued. Afterwards the victim's live connection, session,
subscriptions and queued messages must all be intact.
"""

from __future__ import annotations

import itertools

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
    go_offline,
    on_engines,
    wait_for,
)
from tests.fixtures.pki import TRUST_DOMAIN

# Spoofed CONNECTs and retained leaks: most of all on amqtt, whose own code changes sessions before auth.
engine = on_engines(*ENGINES)

ATTACKS = ["no-certificate", "other-device-certificate", "foreign-ca-certificate", "unregistered-certificate"]
_ids = itertools.count()


def attacker_credentials(pki: Pki, kind: str, victim: DeviceCreds) -> DeviceCreds | None:
    if kind == "no-certificate":
        return None
    if kind == "other-device-certificate":
        return pki.issue(f"attacker-{next(_ids)}")
    uris = [f"spiffe://{TRUST_DOMAIN}/device/{victim.device_id}"]
    if kind == "foreign-ca-certificate":
        return pki.forge(f"forged-{next(_ids)}", common_name=victim.device_id, uris=uris, signer="stranger")
    return pki.forge(f"unregistered-{next(_ids)}", common_name=victim.device_id, uris=uris)


@pytest.fixture(scope="module")
def commander(broker: BrokerProcess, pki: Pki) -> Device:
    """A back-end service (ingest profile) that sends commands to devices."""
    with connect(broker.port, pki.issue("session-commander", "ingest")) as service:
        yield service


@pytest.mark.parametrize("victim_online", [True, False], ids=["victim-online", "victim-offline"])
@pytest.mark.parametrize("attacker_clean", [True, False], ids=["clean-session", "persistent-session"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_spoofed_connect_leaves_the_victim_untouched(
    broker: BrokerProcess, pki: Pki, commander: Device, attack: str, attacker_clean: bool, victim_online: bool
) -> None:
    victim_creds = pki.issue(f"victim-{next(_ids)}")
    commands = f"devices/{victim_creds.device_id}/commands"
    victim = Device(broker.port, victim_creds, clean_session=False).connect()
    assert victim.subscribe(f"{commands}/#", qos=1) == [1]
    commander.publish(f"{commands}/before", b"before")
    assert victim.receive().payload == b"before"
    if not victim_online:
        go_offline(broker, victim)
        commander.publish(f"{commands}/queued", b"queued", qos=1)

    spoof = attacker_credentials(pki, attack, victim_creds)
    with pytest.raises(ConnectRefused) as refused:
        Device(broker.port, spoof, client_id=victim_creds.device_id, clean_session=attacker_clean,
               ca=victim_creds.ca).connect()
    assert refused.value.code != 0

    if victim_online:
        assert victim.is_connected(), "the spoofing CONNECT took over the victim's connection"
        commander.publish(f"{commands}/after", b"after")
        assert victim.receive().payload == b"after"
        victim.close()
    resumed = Device(broker.port, victim_creds, clean_session=False).connect()
    try:
        assert resumed.session_present, "the victim's persistent session was deleted"
        if not victim_online:
            queued = resumed.receive()
            assert (queued.topic, queued.payload) == (f"{commands}/queued", b"queued")
        commander.publish(f"{commands}/resumed", b"resumed")  # the subscription survived, unrenewed
        assert resumed.receive().payload == b"resumed"
    finally:
        resumed.close()

    denied = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                               if e.data.get("client_id") in (victim_creds.device_id, None)], message="audit")
    assert denied


def test_attacker_can_not_hijack_by_racing_a_reconnect(broker: BrokerProcess, pki: Pki, commander: Device) -> None:
    """Many spoofing CONNECTs interleaved with the victim's own reconnects: the victim always gets its session."""
    victim_creds = pki.issue(f"victim-race-{next(_ids)}")
    attacker = pki.issue(f"attacker-race-{next(_ids)}")
    commands = f"devices/{victim_creds.device_id}/commands"
    first = Device(broker.port, victim_creds, clean_session=False).connect()
    first.subscribe(f"{commands}/#")
    go_offline(broker, first)
    for round_ in range(5):
        for clean in (True, False):
            with pytest.raises(ConnectRefused):
                Device(broker.port, attacker, client_id=victim_creds.device_id, clean_session=clean).connect()
        commander.publish(f"{commands}/r{round_}", str(round_).encode())
        victim = Device(broker.port, victim_creds, clean_session=False).connect()
        assert victim.session_present
        assert victim.receive().payload == str(round_).encode()
        go_offline(broker, victim)


def test_retained_messages_do_not_leak_across_identities(broker: BrokerProcess, pki: Pki) -> None:
    """Stock amqtt pushes to a new client the retained messages matching *any* client's filters."""
    ingest = pki.issue("leak-ingest", "ingest")
    owner, other = pki.issue("leak-owner"), pki.issue("leak-other")
    with connect(broker.port, ingest) as service:
        service.subscribe("devices/+/telemetry/#")  # a wide filter held by someone else
        with connect(broker.port, owner) as device:
            device.publish("devices/leak-owner/telemetry/location", b"secret", retain=True)
        assert service.receive().payload == b"secret"
        service.publish("devices/leak-other/commands/config", b"for-other", retain=True)

        with connect(broker.port, other) as intruder:
            assert intruder.receive_all(0.7) == [], "retained telemetry of another device leaked on CONNECT"
            assert intruder.subscribe("devices/leak-other/commands/#") == [1]
            delivered = intruder.receive_all(0.7)
            assert [(m.topic, m.payload, m.retain) for m in delivered] == [
                ("devices/leak-other/commands/config", b"for-other", True)
            ]
        with Device(broker.port, other, clean_session=False).connect() as persistent:
            persistent.subscribe("devices/leak-other/commands/#")
            persistent.receive_all(0.5)
        with Device(broker.port, other, clean_session=False).connect() as resumed:
            assert resumed.session_present
            assert all(m.topic.startswith("devices/leak-other/") for m in resumed.receive_all(0.7))
