"""A real 3-node RabbitMQ 3.10 cluster authorised by iotauth: what the export and serve promise, attacked.

The deployment (``tests/fixtures/rabbitmq.py``) is one per session: serve on
TLS, the exported configuration, three nodes running as ``rabbitmq``, and the
follower (``iotauth export rabbitmq --watch``). Each test uses its own device
ids. RabbitMQ 3.10 closes the connection on a refused PUBLISH or SUBSCRIBE (it
has no SUBACK failure code), which is what "refused" means below.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from iotauth.errors import ConnectRefused
from iotauth.testing import CredentialFiles, MqttClient
from tests.fixtures.broker import Pki, event_time
from tests.fixtures.metrics import scrape
from tests.fixtures.rabbitmq import WAIT, RabbitDeployment
from tests.fixtures.raw_mqtt import connect_packet

pytestmark = pytest.mark.timeout(300)


def connect(rabbit: RabbitDeployment, device: str, node: int, profile: str = "default") -> MqttClient:
    return rabbit.client(rabbit.issue(device, profile), node).connect()


def refused(client: MqttClient) -> int | None:
    """The CONNACK code of a refused connection (``None``: TLS or the socket refused it first)."""
    with pytest.raises(ConnectRefused) as caught:
        client.connect(timeout=WAIT)
    return caught.value.code


def tls_refusal(rabbit: RabbitDeployment, context: ssl.SSLContext, node: int, client_id: str) -> str:
    """Handshake and CONNECT on a raw socket; the TLS error the node answered with ('' if it let us in)."""
    raw = socket.create_connection(("127.0.0.1", rabbit.cluster.nodes[node].mqtt_port), timeout=WAIT)
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(connect_packet(client_id))
            tls.recv(4)
    except ssl.SSLError as exc:
        return str(exc)
    except ConnectionError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def stays_connected(client: MqttClient, seconds: float = 1.0) -> bool:
    return not client.disconnected.wait(seconds) and client.is_connected()


def test_a_device_on_node_1_and_an_ingest_service_on_node_3_exchange_messages(rabbit: RabbitDeployment) -> None:
    device = connect(rabbit, "xn-sensor", 0)
    ingest = connect(rabbit, "xn-ingest", 2, "ingest")
    try:
        assert ingest.subscribe("devices/+/telemetry/#") == [1]
        assert device.subscribe("devices/xn-sensor/commands/#") == [1]
        device.publish("devices/xn-sensor/telemetry/temp", "21.5")
        received = ingest.receive(WAIT)
        assert (received.topic, received.payload) == ("devices/xn-sensor/telemetry/temp", b"21.5")
        ingest.publish("devices/xn-sensor/commands/reboot", "now")
        command = device.receive(WAIT)
        assert (command.topic, command.payload) == ("devices/xn-sensor/commands/reboot", b"now")
    finally:
        device.close()
        ingest.close()


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        ("publish", "devices/oos-other/telemetry/temp"),  # another device's topic
        ("publish", "devices/oos-pub.x/telemetry"),  # a '.' is a level break in RabbitMQ: not a way out either
        ("publish", "devices/oos-pub/commands/x"),  # its own subtree, but not a publish right
        ("subscribe", "devices/+/telemetry/#"),  # wider than its own subtree
        ("subscribe", "#"),
        ("subscribe", "devices/oos-other/commands/#"),
    ],
)
def test_out_of_scope_publish_and_subscribe_are_refused(rabbit: RabbitDeployment, action: str, topic: str) -> None:
    watcher = connect(rabbit, "oos-watch", 2, "ingest")
    device = connect(rabbit, "oos-pub", 1)
    try:
        assert watcher.subscribe("devices/+/telemetry/#") == [1]
        if action == "publish":
            device.client.publish(topic, b"smuggled", qos=1)
        else:
            device.client.subscribe(topic, 1)
        device.wait_disconnected(WAIT)  # RabbitMQ 3.10 answers a refused PUBLISH/SUBSCRIBE by closing
        honest = connect(rabbit, "oos-honest", 1)
        honest.publish("devices/oos-honest/telemetry/marker", "after")
        assert watcher.wait_for(lambda msgs: any(m.topic.endswith("/marker") for m in msgs), WAIT)
        assert all(m.payload != b"smuggled" for m in watcher.received)
        honest.close()
    finally:
        device.close()
        watcher.close()


def test_username_and_password_cannot_borrow_another_identity(rabbit: RabbitDeployment) -> None:
    victim_creds = rabbit.issue("spoof-victim")
    attacker_creds = rabbit.issue("spoof-attacker")
    victim = rabbit.client(victim_creds, 0).connect()
    try:
        # RabbitMQ lets a username and password override the certificate: serve refuses every password login.
        for username, password in [("spoof-victim", "x"), ("spoof-attacker", ""), ("iotauth@admin", "guess")]:
            attempt = rabbit.client(attacker_creds, 1)
            attempt.client.username_pw_set(username, password)
            assert refused(attempt) in (4, 5)
        # Even the management identity's real password gives no MQTT session.
        insider = rabbit.client(attacker_creds, 2)
        insider.client.username_pw_set("iotauth@admin", rabbit.home.rabbitmq_admin_secret.read_text().strip())
        assert refused(insider) in (4, 5)
        # The victim's client id with the attacker's certificate: refused, and the victim is NOT kicked
        # (without serve's client_id == username check RabbitMQ kicks it cluster-wide in ~0.1 s, measured).
        assert refused(rabbit.client(attacker_creds, 2, client_id="spoof-victim")) == 5
        assert stays_connected(victim, 1.5)
        victim.publish("devices/spoof-victim/telemetry/still-here", "1")
    finally:
        victim.close()


@pytest.mark.parametrize(
    ("name", "signer", "common_name", "register"),
    [
        ("stranger", "stranger", "cert-stranger", False),  # another CA that copied our issuing CA's name
        ("unknown", "issuing", "cert-unknown", False),  # our CA, but the registry never recorded it
        ("admin", "issuing", "iotauth@admin", False),  # the management identity's name in a certificate
        ("vhost", "issuing", "/:cert-known", False),  # RabbitMQ splits 'vhost:user' at the last ':'
        ("dotted", "issuing", "cert-known.x", True),  # recorded (say, before [rabbitmq] was enabled) but ambiguous
    ],
)
def test_certificates_naming_no_usable_device_get_no_session(
    rabbit: RabbitDeployment, tmp_path: Path, name: str, signer: str, common_name: str, register: bool
) -> None:
    rabbit.issue("cert-known")
    forged = Pki(rabbit.home, tmp_path).forge(name, signer=signer, common_name=common_name, register=register)
    creds = CredentialFiles(common_name, forged.cert, forged.key, rabbit.home.root_cert)
    assert refused(rabbit.client(creds, 0, client_id=common_name.split(":")[-1])) in (None, 4, 5)


def test_revoke_drops_the_busy_session_on_another_node_and_the_crl_refuses_the_reconnect(
    rabbit: RabbitDeployment,
) -> None:
    creds = rabbit.issue("rv-sensor")
    device = rabbit.client(creds, 1).connect()  # node 2; the follower kicks through node 1's API first
    assert device.subscribe("devices/rv-sensor/commands/#") == [1]
    stop = time.monotonic() + WAIT
    revoked_at = None
    try:
        while not device.disconnected.is_set() and time.monotonic() < stop:
            # Busy: the same topic again and again, so RabbitMQ answers from its per-connection cache
            # and never asks serve: only a kick can end this session.
            device.client.publish("devices/rv-sensor/telemetry/t", b"1", qos=0)
            if revoked_at is None:
                time.sleep(0.3)
                rabbit.iotauth("revoke", "rv-sensor", "--reason", "key-compromise")
                revoked_at = time.monotonic()
            time.sleep(0.05)
        dropped_at = device.wait_disconnected(1)
    finally:
        device.close()
    assert revoked_at is not None and dropped_at - revoked_at < WAIT
    kicked = rabbit.wait_event("rv-sensor", "rabbitmq.session.kicked")
    assert kicked.data["closed"] >= 1 and kicked.data["cause"] == "event"
    assert rabbit.follower is not None and rabbit.follower.metrics_port is not None
    shown = scrape(f"http://127.0.0.1:{rabbit.follower.metrics_port}/metrics")
    assert shown.value("iotauth_rabbitmq_kicks_total", cause="event") >= 1
    assert shown.value("iotauth_rabbitmq_crl_writes_total") >= 2  # at start, and for the revocation
    assert shown.value("iotauth_rabbitmq_last_kick_timestamp_seconds") >= event_time(kicked) - 60
    # The reconnect is refused at the TLS handshake: the CRL was rewritten before the kick.
    assert "CERTIFICATE_REVOKED" in tls_refusal(rabbit, rabbit.tls_context(creds), 0, "rv-sensor")
    assert rabbit.connections("rv-sensor") == 0


def test_suspend_kicks_and_refuses_until_resumed(rabbit: RabbitDeployment) -> None:
    creds = rabbit.issue("sus-sensor")
    device = rabbit.client(creds, 2).connect()
    rabbit.iotauth("suspend", "sus-sensor")
    device.wait_disconnected(WAIT)
    device.close()
    assert refused(rabbit.client(creds, 0)) in (None, 4, 5)
    rabbit.iotauth("resume", "sus-sensor")
    deadline = time.monotonic() + WAIT
    while True:  # the follower rewrites the CRL (no longer on hold) a moment after the resume
        try:
            rabbit.client(creds, 0).connect().close()
            break
        except ConnectRefused:
            assert time.monotonic() < deadline, "a resumed device was still refused"
            time.sleep(0.2)


def test_a_follower_that_was_down_kicks_what_it_missed(rabbit: RabbitDeployment) -> None:
    assert rabbit.follower is not None
    creds = rabbit.issue("down-sensor")
    device = rabbit.client(creds, 0).connect()
    try:
        rabbit.follower.process.send_signal(signal.SIGKILL)  # no clean shutdown: the cursor is what was saved
        rabbit.follower.process.wait(10)
        rabbit.iotauth("revoke", "down-sensor")
        assert stays_connected(device, 1.5), "nothing but the follower closes a live RabbitMQ session"
        rabbit.follower = rabbit.start_follower()
        device.wait_disconnected(WAIT)
        assert rabbit.wait_event("down-sensor", "rabbitmq.session.kicked").data["cause"] == "replay"
    finally:
        device.close()


def test_a_follower_whose_identity_is_refused_fails_loudly(rabbit: RabbitDeployment) -> None:
    wrong = rabbit.start_follower(env={"IOTAUTH_RABBITMQ_ADMIN_SECRET": "not-the-secret"}, wait=False)
    try:
        assert wrong.process.wait(60) == 1
        assert "refused iotauth's identity (HTTP 401)" in wrong.output()
    finally:
        wrong.stop()


def test_without_serve_nobody_gets_in_and_everyone_does_again_once_it_is_back(rabbit: RabbitDeployment) -> None:
    """RabbitMQ refuses a login its HTTP backend cannot answer (it fails closed); sessions already open go on."""
    creds = rabbit.issue("sd-sensor")
    live = rabbit.client(rabbit.issue("sd-live"), 1).connect()
    rabbit.stop_serve()
    try:
        assert refused(rabbit.client(creds, 0)) in (None, 4, 5)
        assert stays_connected(live, 0.5)
    finally:
        rabbit.restart_serve()
    rabbit.client(creds, 0).connect().close()
    live.close()


def test_with_one_node_down_devices_keep_working_and_revocation_still_kicks(rabbit: RabbitDeployment) -> None:
    """Node 1 is the seed, the usual MQTT Raft leader and the follower's first management URL."""
    ingest = connect(rabbit, "nd-ingest", 2, "ingest")
    victim_creds = rabbit.issue("nd-victim")
    rabbit.cluster.stop_node(0)
    try:
        assert ingest.subscribe("devices/+/telemetry/#") == [1]
        device = connect(rabbit, "nd-sensor", 1)
        device.publish("devices/nd-sensor/telemetry/t", "up")
        assert ingest.receive(WAIT).topic == "devices/nd-sensor/telemetry/t"
        victim = rabbit.client(victim_creds, 2).connect()
        rabbit.iotauth("revoke", "nd-victim")
        victim.wait_disconnected(WAIT)
        victim.close()
        kicked = rabbit.wait_event("nd-victim", "rabbitmq.session.kicked")
        assert kicked.data["node"] != rabbit.cluster.nodes[0].management_url
        device.close()
    finally:
        ingest.close()
        rabbit.cluster.restart_node(0)
