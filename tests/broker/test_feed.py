"""The change-feed follower notices a replaced registry file, as an operator (or an attacker) would replace it.

Reported attack: after ``mv registry.db x; cp x registry.db`` ``iotauth
revoke`` succeeded, but the broker kept reading the orphaned file, stayed
healthy and admitted the revoked device. The broker now reopens a copy of its
registry (same instance id) and enforces what is written there; anything else
at the path (nothing, an empty file, a foreign database, another registry) is
an outage: connects are refused with CONNACK 0x03 and live sessions dropped
after the grace period, until the right file is back.
"""

from __future__ import annotations

import sqlite3
import subprocess

import pytest

from tests.fixtures.broker import (
    ConnectRefused,
    Device,
    DeviceCreds,
    audit_events,
    connect,
    iotauth_cli,
    wait_for,
)


def sh(command: str, cwd: object) -> None:
    """Run a shell command the way an operator types it."""
    subprocess.run(["sh", "-c", command], cwd=str(cwd), check=True, timeout=30)


def test_a_copied_registry_is_reopened_and_a_revocation_in_it_kicks_and_refuses(broker_factory) -> None:  # type: ignore
    broker, pki = broker_factory("--registry-grace", "1")
    victim, bystander = pki.issue("rf-victim"), pki.issue("rf-bystander")
    device, other = connect(broker.port, victim), connect(broker.port, bystander)
    sh("mv registry.db orphan.db && cp orphan.db registry.db", broker.home.root)

    revoked = iotauth_cli(broker.home, "revoke", "rf-victim", "--reason", "key-compromise")
    assert revoked.returncode == 0, revoked.stderr

    device.wait_disconnected(timeout=30)
    broker.wait_log("reopened")
    with pytest.raises(ConnectRefused) as refused:
        connect(broker.port, victim)
    assert refused.value.code == 5  # not authorised: the revocation in the new file holds
    assert other.is_connected()  # the reopen itself drops nobody
    with connect(broker.port, bystander) as again:  # and the broker is healthy: it admits
        assert again.subscribe("devices/rf-bystander/commands/#") == [1]
    reopened = wait_for(lambda: audit_events(broker.home, "broker.registry.reopened"), timeout=30,
                        message="the reopen recorded in the new file")
    assert reopened[0].data["sessions"] >= 2
    other.close()


@pytest.mark.parametrize("replacement", ["removed", "empty", "foreign", "another-registry"])
def test_anything_but_a_copy_fails_closed_until_the_file_is_back(broker_factory, replacement: str) -> None:  # type: ignore
    broker, pki = broker_factory("--registry-grace", "1")
    live, late = pki.issue(f"fc-{replacement}-live"), pki.issue(f"fc-{replacement}-late")
    device = connect(broker.port, live)
    home = broker.home.root
    with sqlite3.connect(home / "registry.db") as conn:  # everything committed into the file we keep
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sh("mv registry.db kept.db && rm -f registry.db-wal registry.db-shm", home)
    if replacement == "empty":
        sh(": > registry.db", home)
    elif replacement == "foreign":
        with sqlite3.connect(home / "registry.db") as conn:
            conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    elif replacement == "another-registry":
        other = iotauth_cli(broker.home, "--home", str(home / "other"), "init")
        assert other.returncode == 0, other.stderr
        sh("cp other/registry.db registry.db", home)

    broker.wait_log("giving up registry")
    with pytest.raises(ConnectRefused) as refused:
        connect(broker.port, late)
    assert refused.value.code == 3  # server unavailable: never admitted without the right registry
    device.wait_disconnected(timeout=30)  # live sessions are dropped after the grace period
    broker.wait_log("failing closed")
    if replacement != "removed":
        assert (home / "registry.db").stat().st_size == 0 or replacement != "empty"  # nothing written into it
        sh("rm -f registry.db registry.db-wal registry.db-shm", home)

    sh("mv kept.db registry.db", home)  # the right file is back
    broker.wait_log("registry readable again")
    back = wait_for(lambda: admitted(broker.port, late), timeout=30, message="admitted again")
    with back:  # (the audit writer, which failed meanwhile, must have written again first)
        assert back.subscribe(f"devices/fc-{replacement}-late/commands/#") == [1]


def admitted(port: int, creds: DeviceCreds) -> Device | None:
    try:
        return connect(port, creds)
    except ConnectRefused as refused:
        if refused.code != 3:  # only "unavailable" may last a moment longer
            raise
        return None
