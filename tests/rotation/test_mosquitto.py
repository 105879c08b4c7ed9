"""Rotation end to end on a managed Mosquitto: Debian's mosquitto 2.0.11, ``iotauth mosquitto follow``,
``iotauth renewer`` connected to Mosquitto like any client, and the reference agent, all as processes.

Mosquitto never asks iotauth about a connect: it reads the CRL the follower
writes and the dynamic-security clients the follower keeps. So here a
renewal is activated by the device's confirmation only; the follower then
writes a CRL that refuses the old certificate and kicks the device's
sessions (by user name, the device id). What is checked:

* a device renews; its new certificate works; the old one is refused at the
  TLS handshake; the audit log has every step;
* a session still on the old certificate is closed, while a session the
  device opened with its new certificate as early as it could survives the
  kick (the renewal is held on the CRL until the kick is done);
* a certificate superseded while the follower was down still loses its
  session when the follower comes back (the reconcile kicks);
* the agent never makes a pending certificate its only one, though Mosquitto
  accepts it until a CRL lists it; killed at every step from the confirmation
  on, it ends with one working identity;
* a request published on another device's topic never reaches the renewer;
  a replayed request and a replayed confirmation are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from firmware_tools.agent import CRASH_POINTS
from iotauth.errors import ConnectRefused
from iotauth.pki.keys import generate_private_key, load_private_key
from iotauth.registry import CertificateStatus, RevocationReason
from iotauth.rotation import messages
from iotauth.testing import CredentialFiles, Credentials, MqttClient
from tests.fixtures.broker import wait_for
from tests.fixtures.mosquitto import Attacker, ManagedEnv
from tests.fixtures.rotation import (
    RenewerProcess,
    agent,
    certificates,
    confirm_over,
    holds_its_active_key,
    open_window,
    request_over,
    state_dir,
)

REFUSED = 128  # SUBACK failure (MQTT 3.1.1)
AFTER_CONFIRM = CRASH_POINTS[CRASH_POINTS.index("confirmed"):]


@pytest.fixture(scope="module")
def stack(managed: ManagedEnv) -> Iterator[tuple[ManagedEnv, RenewerProcess]]:
    open_window(managed.home)
    renewer = RenewerProcess(managed.home, managed.device_port).start()  # ready once its subscription is granted
    try:
        yield managed, renewer
    finally:
        renewer.stop()


def live_creds(state: Path, device_id: str) -> CredentialFiles:
    return CredentialFiles(device_id, state / "fullchain.pem", state / "key.pem", state / "ca.pem")


def connected(env: ManagedEnv, creds: Credentials) -> MqttClient | None:
    try:
        return MqttClient(env.device_port, creds).connect()
    except ConnectRefused:
        return None


def refused_at_handshake(env: ManagedEnv, creds: Credentials) -> bool:
    try:
        MqttClient(env.device_port, creds).connect().close()
    except ConnectRefused as exc:
        return exc.code is None  # Mosquitto refuses a certificate on its CRL in the TLS handshake
    return False


def connects(env: ManagedEnv, creds: Credentials) -> bool:
    client = connected(env, creds)
    if client is not None:
        client.close()
    return client is not None


def held_on_crl(env: ManagedEnv, serial: str) -> bool:
    crl = x509.load_pem_x509_crl((env.directory / "crl.pem").read_bytes())
    return crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_a_device_renews_on_mosquitto_and_only_the_new_certificate_works(
        stack: tuple[ManagedEnv, RenewerProcess], tmp_path: Path) -> None:
    env, _ = stack
    creds = env.issue("mq-renew")
    state = state_dir(tmp_path / "mq-renew", creds, env.home, env.device_port)
    mark = env.last_event_id()
    done = agent(state)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["serial"] != creds.serial
    active = holds_its_active_key(env.home, "mq-renew", state)
    assert active.renewal_of == creds.serial
    env.wait_event("mosquitto.session.kicked", "mq-renew", after=mark)  # the follower applied the activation
    assert wait_for(lambda: connects(env, live_creds(state, "mq-renew")), 15, "the renewal let in")
    assert refused_at_handshake(env, creds)
    old = next(c for c in certificates(env.home, "mq-renew") if c.serial == creds.serial)
    assert old.status is CertificateStatus.REVOKED and old.revocation_reason is RevocationReason.SUPERSEDED
    steps = [(e.kind, e.data) for e in env.events("", "mq-renew") if e.id > mark]
    kinds = [kind for kind, _ in steps]
    assert kinds.index("certificate.issued") < kinds.index("certificate.activated") < kinds.index(
        "certificate.revoked") < kinds.index("mosquitto.session.kicked")
    issued = next(data for kind, data in steps if kind == "certificate.issued")
    activated = next(data for kind, data in steps if kind == "certificate.activated")
    assert issued["renewal_of"] == creds.serial and activated["via"] == "confirm"
    kicked = next(data for kind, data in steps if kind == "mosquitto.session.kicked")
    assert kicked["reason"] == "certificate-revoked" and kicked["crl_proven"] is True


def test_the_old_session_is_closed_and_a_session_on_the_renewal_is_not(
        stack: tuple[ManagedEnv, RenewerProcess]) -> None:
    env, _ = stack
    creds = env.issue("mq-kick")
    old = env.connect(creds)
    eager: Attacker | None = None
    try:
        new_key, serial = request_over(old, creds)
        wait_for(lambda: held_on_crl(env, serial), 15, "the pending renewal on the CRL")
        new_creds = env.pki.write("mq-kick-new", x509.load_pem_x509_certificate(
            next(c for c in certificates(env.home, "mq-kick") if c.serial == serial).pem.encode()), new_key)
        # The device reconnects with its renewal as fast as it can, from before the activation on.
        eager = Attacker(env.device_port, new_creds, once=True)
        eager.start()
        mark = env.last_event_id()
        confirm_over(old, "mq-kick", new_key, serial)
        old.wait_disconnected(15)  # Mosquitto closed it: its certificate was superseded
        kicked = env.wait_event("mosquitto.session.kicked", "mq-kick", after=mark)
        eager.join(15)
        assert eager.accepted, "the renewal never got in"
        assert eager.sessions_alive() == 1  # the follower's kick by user name did not close it
    finally:
        old.close()
        if eager is not None:
            eager.close()
    assert kicked.data["reason"] == "certificate-revoked" and kicked.data["crl_proven"] is True
    assert refused_at_handshake(env, creds)


def test_a_certificate_superseded_while_the_follower_is_down_loses_its_session(
        stack: tuple[ManagedEnv, RenewerProcess]) -> None:
    env, _ = stack
    creds = env.issue("mq-down")
    old = env.connect(creds)
    try:
        new_key, serial = request_over(old, creds)
        wait_for(lambda: held_on_crl(env, serial), 15, "the pending renewal on the CRL")
        env.follower.stop()
        try:
            old.subscribe(messages.response_topic("mq-down"))
            confirm_over(old, "mq-down", new_key, serial)
            answer = messages.decode_response(old.receive(timeout=30).payload)
            assert answer.status is messages.Status.ACTIVATED
            assert old.is_connected()  # nobody told Mosquitto yet
        finally:
            mark = env.last_event_id()
            env.restart_follower()
        old.wait_disconnected(15)
        kicked = env.wait_event("mosquitto.session.kicked", "mq-down", after=mark)
    finally:
        old.close()
    assert kicked.data["reason"] == "certificate-revoked" and kicked.data["trigger"] == "start"
    assert refused_at_handshake(env, creds)
    new_cert = next(c for c in certificates(env.home, "mq-down") if c.serial == serial)
    new_creds = env.pki.write("mq-down-new", x509.load_pem_x509_certificate(new_cert.pem.encode()), new_key)
    assert wait_for(lambda: connects(env, new_creds), 15, "the renewal let in")


def test_the_agent_keeps_its_old_identity_while_the_renewal_is_only_accepted(
        stack: tuple[ManagedEnv, RenewerProcess], tmp_path: Path) -> None:
    """Mosquitto accepts a pending renewal until a CRL lists it (here: the follower is down). The agent must not
    take that CONNACK 0 for an activation: without the renewer's answer it keeps the old identity."""
    env, renewer = stack
    creds = env.issue("mq-unsure")
    state = state_dir(tmp_path / "mq-unsure", creds, env.home, env.device_port)
    env.follower.stop()
    try:
        crashed = agent(state, "--crash-at", "issued", "renew")
        assert crashed.returncode == -9, crashed.stderr
        serial = json.loads((state / "rotation.json").read_text())["serial"]
        assert not held_on_crl(env, serial)
        renewer.stop()
        try:
            unsure = agent(state, "--timeout", "2", "--attempts", "2", "renew")
            assert unsure.returncode == 2, unsure.stderr
            assert "connects but is not active yet" in unsure.stderr
            live = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
            assert format(live.serial_number, "x") == creds.serial  # the old identity is still the live one
            assert (state / "next-key.pem").exists()
            statuses = {c.serial: c.status for c in certificates(env.home, "mq-unsure")}
            assert statuses[serial] is CertificateStatus.PENDING
        finally:
            renewer.start()
    finally:
        env.restart_follower()
    finished = agent(state)  # the renewer is back: the renewal completes
    assert finished.returncode == 0, finished.stderr
    holds_its_active_key(env.home, "mq-unsure", state)
    assert wait_for(lambda: connects(env, live_creds(state, "mq-unsure")), 15, "the renewal let in")


@pytest.mark.parametrize("point", AFTER_CONFIRM)
def test_the_agent_killed_between_confirm_and_switch_still_connects(
        stack: tuple[ManagedEnv, RenewerProcess], tmp_path: Path, point: str) -> None:
    env, _ = stack
    device_id = f"mq-crash-{point}"
    creds = env.issue(device_id)
    state = state_dir(tmp_path / device_id, creds, env.home, env.device_port)
    crashed = agent(state, "--crash-at", point, "renew")
    assert crashed.returncode == -9, crashed.stderr
    again = agent(state)
    assert again.returncode == 0, again.stderr
    holds_its_active_key(env.home, device_id, state)
    assert wait_for(lambda: connects(env, live_creds(state, device_id)), 15, "the renewal let in")
    assert wait_for(lambda: refused_at_handshake(env, creds), 15, "the old certificate refused")


def test_a_request_on_another_devices_topic_never_reaches_the_renewer(
        stack: tuple[ManagedEnv, RenewerProcess]) -> None:
    env, _ = stack
    thief_creds, victim_creds = env.issue("mq-thief"), env.issue("mq-victim")
    mark = env.last_event_id()
    thief = env.connect(thief_creds)
    try:
        assert thief.subscribe(messages.response_topic("mq-victim")) == [REFUSED]  # nor may it read the answers
        assert thief.subscribe(messages.response_topic("mq-thief")) == [1]
        key = load_private_key(thief_creds.key.read_bytes(), None, "device key")
        cert = x509.load_pem_x509_certificate(thief_creds.cert.read_bytes())
        for claimed in ("mq-thief", "mq-victim"):
            request = messages.make_renew(key, cert, messages.make_csr(generate_private_key("p256"), claimed), claimed)
            thief.publish(messages.request_topic("mq-victim"), request.encode())
        # The control: on its own topic, but naming the victim. The renewer reads it (after everything the thief
        # published before) and refuses it: the message names another device than its topic.
        control = messages.make_renew(key, cert, messages.make_csr(generate_private_key("p256"), "mq-victim"),
                                      "mq-victim")
        thief.publish(messages.request_topic("mq-thief"), control.encode())
        answer = messages.decode_response(thief.receive(timeout=30).payload)
        assert answer.status is messages.Status.REFUSED and answer.error is not None
        assert answer.error.value == "bad-request"
        assert thief.receive_all(0.3) == []
    finally:
        thief.close()
    env.wait_event("rotation.refused", "mq-thief", after=mark)
    # Mosquitto dropped what was published on the victim's topic: the renewer never saw it.
    assert not [e for e in env.events("rotation.refused", "mq-victim") if e.id > mark]
    assert [c.serial for c in certificates(env.home, "mq-victim")] == [victim_creds.serial]
    assert [c.serial for c in certificates(env.home, "mq-thief")] == [thief_creds.serial]


def test_replayed_requests_and_confirmations_are_refused(stack: tuple[ManagedEnv, RenewerProcess]) -> None:
    env, _ = stack
    creds = env.issue("mq-replay")
    device = env.connect(creds)
    try:
        assert device.subscribe(messages.response_topic("mq-replay")) == [1]
        key = load_private_key(creds.key.read_bytes(), None, "k")
        new_key = generate_private_key("p256")
        cert = x509.load_pem_x509_certificate(creds.cert.read_bytes())
        request = messages.make_renew(key, cert, messages.make_csr(new_key, "mq-replay"), "mq-replay").encode()
        answers = []
        for _ in range(2):
            device.publish(messages.request_topic("mq-replay"), request)
            answers.append(messages.decode_response(device.receive(timeout=30).payload))
        assert answers[0].status is messages.Status.ISSUED and answers[0].serial is not None
        assert answers[1].status is messages.Status.REFUSED and answers[1].error is not None
        assert answers[1].error.value == "replayed"
        confirm = messages.make_confirm(new_key, "mq-replay", answers[0].serial).encode()
        device.publish(messages.request_topic("mq-replay"), confirm)
        assert messages.decode_response(device.receive(timeout=30).payload).status is messages.Status.ACTIVATED
        device.wait_disconnected(15)  # the old certificate's session: kicked
    finally:
        device.close()
    new_cert = next(c for c in certificates(env.home, "mq-replay") if c.serial == answers[0].serial)
    new_creds = env.pki.write("mq-replay-new", x509.load_pem_x509_certificate(new_cert.pem.encode()), new_key)
    again: MqttClient = wait_for(lambda: connected(env, new_creds), 15, "the renewal let in")
    try:
        assert again.subscribe(messages.response_topic("mq-replay")) == [1]
        again.publish(messages.request_topic("mq-replay"), confirm)  # the same confirmation, replayed
        answer = messages.decode_response(again.receive(timeout=30).payload)
    finally:
        again.close()
    assert answer.status is messages.Status.REFUSED and answer.error is not None
    assert answer.error.value == "replayed"
