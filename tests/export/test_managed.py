"""Managed Mosquitto against the real broker: Debian's mosquitto 2.0.11 and its dynamic-security plugin.

Every test drives the real ``mosquitto`` and the real ``iotauth mosquitto follow``
process, with operators acting through the ``iotauth`` command line (another
process), and devices connecting with paho over mTLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from iotauth.config import Home
from iotauth.errors import ConnectRefused
from iotauth.export.managed.state import ADMIN_USERNAME
from iotauth.testing import MqttClient
from tests.fixtures.broker import DeviceCreds, Pki, event_time, iotauth_cli, wait_for
from tests.fixtures.mosquitto import Attacker, ManagedEnv

REFUSED = 128  # SUBACK failure (MQTT 3.1.1)


def refused(env: ManagedEnv, creds: DeviceCreds) -> bool:
    try:
        env.connect(creds).close()
    except ConnectRefused:
        return True
    return False


def test_devices_stay_within_their_topics(managed: ManagedEnv) -> None:
    s1, s2 = managed.issue("scope-1"), managed.issue("scope-2")
    ingest = managed.connect(managed.issue("ingest-2", "ingest"))  # a back-end service profile
    assert ingest.subscribe("devices/+/telemetry/#") == [1]
    one, two = managed.connect(s1), managed.connect(s2)
    try:
        # Too-wide subscriptions are refused outright (not silently filtered, as with acl_file).
        for wide in ("devices/+/commands/#", "#", "+/+/commands/#", "$SYS/#", "$CONTROL/dynamic-security/v1/response"):
            assert two.subscribe(wide) == [REFUSED], wide
        assert two.subscribe("devices/scope-2/commands/#") == [1]
        one.publish("devices/scope-1/telemetry/t", "genuine")
        one.publish("devices/scope-2/telemetry/t", "spoofed")
        one.publish("devices/scope-1/not-in-profile", "stray")
        # A device may not drive the control topic: this would delete another device's client.
        one.publish("$CONTROL/dynamic-security/v1",
                    json.dumps({"commands": [{"command": "deleteClient", "username": "scope-2"}]}))
        one.publish("devices/scope-1/telemetry/marker", "last")
        assert ingest.wait_for(lambda got: any(m.payload == b"last" for m in got))
        payloads = {m.payload for m in ingest.received}
        assert b"genuine" in payloads and b"spoofed" not in payloads and b"stray" not in payloads
        assert two.is_connected()
        one.publish("devices/scope-2/commands/stop", "not-from-a-peer")
        ingest.publish("devices/scope-2/commands/go", "from-ingest")
        assert two.receive().payload == b"from-ingest"
        assert two.receive_all(0.3) == []
    finally:
        for client in (one, two, ingest):
            client.close()
    assert not refused(managed, s2)  # scope-2's client survived the control-topic attempt


def test_a_certificate_cannot_take_another_devices_session(managed: ManagedEnv) -> None:
    victim_creds, attacker_creds = managed.issue("take-1"), managed.issue("take-2")
    victim = managed.connect(victim_creds)
    assert victim.subscribe("devices/take-1/commands/#") == [1]
    # take-2's certificate asks for take-1's client id: Mosquitto names it after the certificate instead.
    attacker = managed.connect(attacker_creds, client_id="take-1")
    try:
        assert attacker.subscribe("devices/take-1/commands/#") == [REFUSED]
        ingest = managed.connect(managed.issue("ingest-3", "ingest"))
        ingest.publish("devices/take-1/commands/reboot", "for-victim")
        assert victim.receive().payload == b"for-victim"
        assert victim.is_connected() and attacker.is_connected()
        ingest.close()
    finally:
        victim.close()
        attacker.close()


def test_revocation_drops_the_live_session_and_the_reconnect_is_refused(managed: ManagedEnv) -> None:
    creds = managed.issue("revoke-0")
    device = managed.connect(creds)
    assert device.subscribe("devices/revoke-0/commands/#") == [1]
    mark = managed.last_event_id()
    assert managed.cli("revoke", "revoke-0", "--reason", "key-compromise").returncode == 0
    device.wait_disconnected(15)
    device.close()
    kicked = managed.wait_event("mosquitto.session.kicked", "revoke-0", after=mark)
    assert kicked.data["reason"] == "device-revoked" and kicked.data["crl_proven"] is True
    assert refused(managed, creds)
    assert managed.events("mosquitto.device.synced", "revoke-0")  # its client was created, and audited


def test_no_reconnect_gets_through_a_revocation(managed: ManagedEnv) -> None:
    creds = managed.issue("revoke-1")
    attacker = Attacker(managed.device_port, creds)  # the stolen key, reconnecting in a tight loop
    attacker.start()
    wait_for(lambda: attacker.accepted, 10, "the attacker's first session")
    mark = managed.last_event_id()
    assert managed.cli("revoke", "revoke-1", "--reason", "key-compromise").returncode == 0
    kicked = managed.wait_event("mosquitto.session.kicked", "revoke-1", after=mark)
    time.sleep(1.0)
    attacker.stop.set()
    attacker.join(10)
    assert kicked.data["reason"] == "device-revoked" and kicked.data["crl_proven"] is True
    # The CRL was in force before the kick: nothing got in after it, and no session it let in survived.
    kick_time = event_time(kicked)
    assert [t for t in attacker.accepted if t > kick_time] == []
    assert attacker.sessions_alive() == 0
    assert refused(managed, creds)


def test_suspend_drops_the_session_and_resume_restores_access(managed: ManagedEnv) -> None:
    creds = managed.issue("suspend-1")
    device = managed.connect(creds)
    mark = managed.last_event_id()
    assert managed.cli("suspend", "suspend-1").returncode == 0
    device.wait_disconnected(15)
    device.close()
    kicked = managed.wait_event("mosquitto.session.kicked", "suspend-1", after=mark)
    assert kicked.data["reason"] == "device-suspended" and kicked.data["crl_proven"]
    assert refused(managed, creds)
    mark = managed.last_event_id()
    assert managed.cli("resume", "suspend-1").returncode == 0
    managed.wait_event("mosquitto.device.synced", "suspend-1", after=mark)
    back = wait_for(lambda: _try_connect(managed, creds), 15, "the resumed device's connect")
    try:
        assert back.subscribe("devices/suspend-1/commands/#") == [1]  # its rights are back, not just the door
    finally:
        back.close()


def test_a_profile_change_updates_rights(managed_factory: object) -> None:
    env: ManagedEnv = managed_factory("prof-1")  # type: ignore[operator]
    creds = env.devices["prof-1"]
    device = env.connect(creds)
    assert device.subscribe("devices/prof-1/alerts/#") == [REFUSED]
    config = env.home.config_file
    text = config.read_text()
    default_subscribe = 'subscribe = ["devices/{device_id}/commands/#", "devices/{device_id}/rotation/response"]'
    assert default_subscribe in text
    mark = env.last_event_id()
    config.write_text(text.replace(default_subscribe, 'subscribe = ["devices/{device_id}/alerts/#"]', 1))
    reconciled = env.wait_event("mosquitto.reconciled", after=mark)
    assert reconciled.data["trigger"] == "policy-reloaded" and reconciled.data["changed"] == 1
    device.wait_disconnected(15)  # moved to its new role: one kick, then it reconnects with the new rights
    device.close()
    again = env.connect(creds)
    try:
        assert again.subscribe("devices/prof-1/alerts/#") == [1]
        assert again.subscribe("devices/prof-1/commands/#") == [REFUSED]
    finally:
        again.close()


def test_killing_mosquitto_and_changing_the_registry_meanwhile_ends_in_step(managed_factory: object) -> None:
    env: ManagedEnv = managed_factory("kill-1", "kill-2", supervise=False)  # type: ignore[operator]
    one, two = env.devices["kill-1"], env.devices["kill-2"]
    env.mosquitto.kill()
    assert env.cli("revoke", "kill-1").returncode == 0
    three = env.pki.issue("kill-3")
    mark = env.last_event_id()
    env.mosquitto.start()
    reconciled = env.wait_event("mosquitto.reconciled", after=mark)
    assert reconciled.data["trigger"] in ("reconnected", "recovery")
    assert refused(env, one)
    for creds in (two, three):
        client = env.connect(creds)
        assert client.subscribe(f"devices/{creds.device_id}/commands/#") == [1]
        client.close()


def test_killing_the_follower_and_revoking_meanwhile_ends_in_step(managed_factory: object) -> None:
    env: ManagedEnv = managed_factory("fk-1")  # type: ignore[operator]
    creds = env.devices["fk-1"]
    device = env.connect(creds)
    env.follower.kill()  # kill -9: no clean shutdown
    assert env.cli("revoke", "fk-1").returncode == 0
    mark = env.last_event_id()
    env.restart_follower()  # in step before it reports: the reconcile at start withdrew fk-1
    kicked = env.wait_event("mosquitto.session.kicked", "fk-1", after=mark)
    assert kicked.data["reason"] == "reconcile" and kicked.data["crl_proven"]
    device.wait_disconnected(15)
    device.close()
    assert refused(env, creds)


def test_lost_state_is_rebuilt_from_the_registry_and_mosquitto_restarted(managed_factory: object) -> None:
    env: ManagedEnv = managed_factory("lost-1")  # type: ignore[operator]
    creds = env.devices["lost-1"]
    # A crash during one of Mosquitto 2.0.11's in-place saves leaves a truncated file: it starts with no clients.
    env.mosquitto.supervise = False
    env.mosquitto.kill()
    state = env.directory / "state" / "dynamic-security.json"
    state.write_text(state.read_text()[:100])
    mark = env.last_event_id()
    env.mosquitto.supervise = True
    env.mosquitto.start()
    rebuilt = env.wait_event("mosquitto.state.rebuilt", after=mark)
    assert rebuilt.data["restarted"] is True and rebuilt.data["devices"] >= 1
    env.wait_event("mosquitto.reconciled", after=rebuilt.id)
    client = wait_for(lambda: _try_connect(env, creds), 20, "a connect after the rebuild")
    try:
        assert client.subscribe("devices/lost-1/commands/#") == [1]
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: Mosquitto must run as its own account")
def test_a_crl_mosquitto_cannot_load_is_noticed_and_the_device_is_kicked_again_once_it_can(
    managed_factory: object,
) -> None:
    env: ManagedEnv = managed_factory("crl-1")  # type: ignore[operator]
    creds = env.devices["crl-1"]
    device = env.connect(creds)
    env.directory.chmod(0o700)  # Mosquitto (as 'mosquitto') can no longer open the CRL at SIGHUP
    try:
        mark = env.last_event_id()
        assert env.cli("revoke", "crl-1").returncode == 0
        unproven = env.wait_event("mosquitto.crl.unproven", after=mark)
        assert unproven.data["crl_proven"] is False
        kicked = env.wait_event("mosquitto.session.kicked", "crl-1", after=mark)
        assert kicked.data["crl_proven"] is False
        device.wait_disconnected(15)  # kicked anyway, and its client deleted: no rights
    finally:
        env.directory.chmod(0o750)
    device.close()
    again = env.wait_event("mosquitto.session.kicked", "crl-1", after=kicked.id)  # the retry proves a CRL
    assert again.data["reason"] == "crl-now-in-force" and again.data["crl_proven"]
    assert refused(env, creds)


def test_the_admin_credentials_stay_secret_and_on_loopback(managed: ManagedEnv) -> None:
    settings = json.loads((managed.directory / "managed.json").read_text())
    secret = managed.home.root / "mosquitto" / f"{settings['export_id']}.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) >= 32
    exported = b"".join(p.read_bytes() for p in managed.directory.rglob("*") if p.is_file())
    assert password.encode() not in exported  # only its PBKDF2 hash is in Mosquitto's state
    assert password not in managed.follower.output() and password not in managed.mosquitto.tail(10_000)
    assert settings["admin_host"] == "127.0.0.1"
    conf = (managed.directory / "mosquitto.conf").read_text()
    assert f"listener {managed.admin_port} 127.0.0.1" in conf
    # Nobody else logs in there: a wrong password, a device's name without one, no name at all.
    assert _connack(managed.admin_port, ADMIN_USERNAME, "wrong-password") == 5
    assert _connack(managed.admin_port, "scope-1", None) == 5
    assert _connack(managed.admin_port, None, None) == 5
    assert _connack(managed.admin_port, ADMIN_USERNAME, password) == 0
    result = managed.cli("export", "mosquitto", "--managed", "--out", str(managed.base / "other"),
                         "--admin-bind", "0.0.0.0:1884")
    assert result.returncode != 0 and "loopback" in result.stderr


def _try_connect(env: ManagedEnv, creds: DeviceCreds) -> MqttClient | None:
    try:
        return env.connect(creds)
    except ConnectRefused:
        time.sleep(0.2)
        return None


def _connack(port: int, username: str | None, password: str | None) -> int:
    """A plain MQTT 3.1.1 CONNECT on the control listener; the CONNACK return code."""
    def string(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = string("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + string("probe-client")
    body += (string(username) if username is not None else b"") + (string(password) if password is not None else b"")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        answer = sock.recv(4)
    return answer[3]


def test_with_a_postgresql_registry_notify_drives_the_kick(managed_factory: object, pg_registry: str) -> None:
    env: ManagedEnv = managed_factory(registry_url=pg_registry,  # type: ignore[operator]
                                      follower_args=("--poll-interval", "30"))  # NOTIFY, not polling
    creds = env.issue("pg-1")
    device = env.connect(creds)
    mark = env.last_event_id()
    assert env.cli("revoke", "pg-1").returncode == 0
    device.wait_disconnected(15)
    device.close()
    assert env.wait_event("mosquitto.session.kicked", "pg-1", after=mark).data["crl_proven"]
    assert refused(env, creds)


def test_revocations_overtake_a_long_run_of_grants(managed_factory: object) -> None:
    """Every saving control command rewrites Mosquitto's whole state file: with thousands of devices loaded,
    200 new devices are a minute of commands, and a revocation must not wait behind them."""

    def configure(home: Home, pki: Pki) -> None:
        asyncio.run(_issue_many(home, [f"load-{n}" for n in range(2000)]))

    env: ManagedEnv = managed_factory("ot-1", configure=configure)  # type: ignore[operator]
    creds = env.devices["ot-1"]
    device = env.connect(creds)
    mark = env.last_event_id()
    asyncio.run(_issue_many(env.home, [f"new-{n}" for n in range(200)]))
    assert env.cli("revoke", "ot-1").returncode == 0
    kicked = env.wait_event("mosquitto.session.kicked", "ot-1", after=mark)
    device.wait_disconnected(15)
    device.close()
    synced_before_kick = [e for e in env.events("mosquitto.device.synced") if mark < e.id < kicked.id]
    assert kicked.data["overtook"] is True and kicked.data["crl_proven"]
    assert len(synced_before_kick) < 200  # the kick did not wait for the grants queued ahead of it
    wait_for(lambda: len([e for e in env.events("mosquitto.device.synced") if e.id > mark]) >= 200, 600,
             "every new device synced")
    assert refused(env, creds)
    assert len(env.events("mosquitto.session.kicked", "ot-1")) == 1  # applied again later, without a second kick


async def _issue_many(home: Home, device_ids: list[str]) -> None:
    from iotauth.authority import open_authority
    from iotauth.pki.keys import generate_private_key
    from iotauth.registry import open_registry

    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        for start in range(0, len(device_ids), 500):
            await asyncio.gather(*(authority.issue_for_key(generate_private_key("p256").public_key(), d,
                                                           activate=True, actor="test")
                                   for d in device_ids[start:start + 500]))


def test_a_second_follower_for_the_same_mosquitto_is_refused(managed: ManagedEnv) -> None:
    result = managed.cli("mosquitto", "follow", str(managed.directory))
    assert result.returncode == 1
    assert f"another follower (pid {managed.follower.process.pid}) is already running" in result.stderr  # type: ignore[union-attr]


def test_follow_says_what_is_missing(home: Home, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    result = iotauth_cli(home, "mosquitto", "follow", str(plain))
    assert result.returncode == 1
    assert "is not a managed Mosquitto export (no managed.json)" in result.stderr
    assert "run 'iotauth export mosquitto --managed --out DIR' first" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
