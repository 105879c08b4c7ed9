"""``iotauth mosquitto follow --metrics-bind``: the managed-Mosquitto follower scraped over HTTP, with the real
Mosquitto 2.0.11 and its dynamic-security plugin.

Counters move after real actions: a device issued (a dynsec sync), a device revoked with a live session (a kick by
its cause, a CRL rewrite), Mosquitto killed and started again (the control connection, a reconcile), Mosquitto
stopped while a revocation is applied (a CRL not seen in force). The feed lag returns to 0 once the follower is in
step. The exposition names no device, serial or fingerprint, and listens only where it was asked.
"""

from __future__ import annotations

import os
import signal
import socket
import urllib.request
from collections.abc import Callable

import pytest

from iotauth.export.metrics import MOSQUITTO_CAUSES, MOSQUITTO_FAILURES
from tests.fixtures.broker import wait_for
from tests.fixtures.metrics import Exposition, scrape
from tests.fixtures.mosquitto import ManagedEnv

Factory = Callable[..., ManagedEnv]
METRICS = ("--metrics-bind", "0")


def url(env: ManagedEnv) -> str:
    return f"http://{env.follower.status['metrics']}/metrics"


def until(env: ManagedEnv, check: Callable[[Exposition], bool], message: str, timeout: float = 30) -> Exposition:
    return wait_for(lambda: (lambda shown: shown if check(shown) else None)(scrape(url(env))), timeout, message)


def test_the_followers_counters_follow_its_work(managed_factory: Factory) -> None:
    env = managed_factory("mf-1", follower_args=METRICS, supervise=False)
    host, port = env.follower.status["metrics"].rsplit(":", 1)
    assert host == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.2", int(port)), timeout=2):
        pass  # loopback only means 127.0.0.1, not the rest of 127.0.0.0/8
    start = until(env, lambda s: s.value("iotauth_mosquitto_feed_lag_seconds") == 0, "in step")
    assert start.value("iotauth_mosquitto_control_up") == 1
    assert start.value("iotauth_mosquitto_reconciles_total", trigger="start") == 1
    assert start.value("iotauth_mosquitto_crl_writes_total") >= 1 and start.value(
        "iotauth_mosquitto_last_crl_timestamp_seconds") > 0
    assert start.value("iotauth_mosquitto_feed_last_read_age_seconds") < 30
    for cause in MOSQUITTO_CAUSES:  # every series exists before its first event, so rate() sees the first
        assert ("iotauth_mosquitto_kicks_total", frozenset({("cause", cause)})) in start.samples
    for kind in MOSQUITTO_FAILURES:
        assert start.value("iotauth_mosquitto_failures_total", kind=kind) == 0

    new = env.issue("mf-2")  # returns once the follower synced it
    synced = until(env, lambda s: s.value("iotauth_mosquitto_device_syncs_total", action="created") >= start.value(
        "iotauth_mosquitto_device_syncs_total", action="created") + 1, "a sync counted")
    assert synced.value("iotauth_mosquitto_control_commands_total") > start.value(
        "iotauth_mosquitto_control_commands_total")

    device = env.connect(env.devices["mf-1"])
    mark = env.last_event_id()
    assert env.cli("revoke", "mf-1").returncode == 0
    kicked = env.wait_event("mosquitto.session.kicked", "mf-1", after=mark)
    device.wait_disconnected(15)
    device.close()
    cause = kicked.data["reason"]
    assert cause == "device-revoked"
    shown = until(env, lambda s: s.value("iotauth_mosquitto_kicks_total", cause=cause) == 1, "a kick counted")
    assert shown.value("iotauth_mosquitto_crl_writes_total") > synced.value("iotauth_mosquitto_crl_writes_total")
    assert shown.value("iotauth_mosquitto_last_kick_timestamp_seconds") > 0
    caught_up = until(env, lambda s: s.value("iotauth_mosquitto_feed_lag_seconds") == 0
                      and s.value("iotauth_mosquitto_cursor") >= kicked.id, "caught up after the kick")
    no_leak(url(env), ["mf-1", "mf-2", env.devices["mf-1"].serial, env.devices["mf-1"].fingerprint, new.serial,
                       new.fingerprint])

    env.mosquitto.kill()
    until(env, lambda s: s.value("iotauth_mosquitto_control_up") == 0, "the control connection seen lost")
    env.mosquitto.start()
    back = until(env, lambda s: s.value("iotauth_mosquitto_control_up") == 1 and sum(
        s.value("iotauth_mosquitto_reconciles_total", trigger=t) for t in ("reconnected", "recovery")) >= 1,
                 "a reconcile after Mosquitto came back")
    assert back.value("iotauth_mosquitto_reconciles_total", trigger="start") == 1
    assert back.value("iotauth_mosquitto_kicks_total", cause=cause) == 1
    assert back.value("iotauth_mosquitto_cursor") >= caught_up.value("iotauth_mosquitto_cursor")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: Mosquitto must run as its own account")
def test_a_crl_not_seen_in_force_is_counted(managed_factory: Factory) -> None:
    """Mosquitto (as its own account) cannot open the CRL at SIGHUP: the canary is never refused."""
    env = managed_factory("mu-1", follower_args=METRICS)
    device = env.connect(env.devices["mu-1"])
    before = until(env, lambda s: s.value("iotauth_mosquitto_feed_lag_seconds") == 0, "in step")
    mark = env.last_event_id()
    env.directory.chmod(0o700)
    try:
        assert env.cli("revoke", "mu-1").returncode == 0
        env.wait_event("mosquitto.crl.unproven", after=mark)
        env.wait_event("mosquitto.session.kicked", "mu-1", after=mark)  # kicked anyway, its client deleted
        device.wait_disconnected(15)
    finally:
        env.directory.chmod(0o750)
        device.close()
    shown = until(env, lambda s: s.value("iotauth_mosquitto_kicks_total", cause="device-revoked") == 1,
                  "the withdrawal counted")
    assert shown.value("iotauth_mosquitto_crl_unproven_total") == before.value(
        "iotauth_mosquitto_crl_unproven_total") + 1


def test_a_hung_mosquitto_is_a_failure_and_a_reconcile(managed_factory: Factory) -> None:
    """Mosquitto stopped (SIGSTOP) while a revocation waits: its control API never answers, the follower gives up
    on that batch (about 30 s), counts the failure, and reconciles once Mosquitto answers again."""
    env = managed_factory("mh-1", follower_args=METRICS)
    before = until(env, lambda s: s.value("iotauth_mosquitto_feed_lag_seconds") == 0, "in step")
    os.kill(env.mosquitto.pid, signal.SIGSTOP)
    try:
        assert env.cli("revoke", "mh-1").returncode == 0
        hung = until(env, lambda s: s.value("iotauth_mosquitto_failures_total", kind="mosquitto-unavailable") == 1,
                     "the failure counted", timeout=90)
        assert hung.value("iotauth_mosquitto_feed_lag_seconds") > 0  # the revocation is not applied yet
        assert hung.value("iotauth_mosquitto_kicks_total", cause="device-revoked") == 0
    finally:
        os.kill(env.mosquitto.pid, signal.SIGCONT)
    after = until(env, lambda s: s.value("iotauth_mosquitto_feed_lag_seconds") == 0 and s.value(
        "iotauth_mosquitto_reconciles_total", trigger="recovery") == before.value(
        "iotauth_mosquitto_reconciles_total", trigger="recovery") + 1, "recovered", timeout=60)
    assert after.value("iotauth_mosquitto_failures_total", kind="control-error") == 0
    withdrawn = env.wait_event("mosquitto.session.kicked", "mh-1")  # by the recovery's reconcile
    assert withdrawn.data["reason"] == "reconcile"
    assert after.value("iotauth_mosquitto_kicks_total", cause="reconcile") == before.value(
        "iotauth_mosquitto_kicks_total", cause="reconcile") + 1


def no_leak(address: str, private: list[str]) -> None:
    with urllib.request.urlopen(address, timeout=10) as answer:  # noqa: S310 - a test URL
        text = answer.read().decode()
    for value in private:
        assert value not in text, value
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for marker in ("BEGIN", "devices/", "spiffe://", "iotauth:follower"):
        assert marker not in samples, marker

