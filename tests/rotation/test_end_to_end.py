"""Rotation end to end on ``iotauth broker``: the real broker, ``iotauth renewer`` and the reference agent as processes.

A device renews; its new certificate works; the old one is refused afterwards; a
session still on the old certificate is closed -- by the confirmation path and
by the first-connect path. Operators' orders reach a running agent, also when
they were made while the renewer was down. A device that never switches keeps
its certificate while the pending one expires.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.certs import now_utc
from iotauth.config import Home
from iotauth.errors import ConnectRefused
from iotauth.registry import CertificateStatus, RevocationReason, open_registry
from iotauth.testing import CredentialFiles
from tests.fixtures.broker import (
    BrokerProcess,
    DeviceCreds,
    Pki,
    audit_events,
    connect,
    iotauth_cli,
    wait_for,
)
from tests.fixtures.rotation import (
    RenewerProcess,
    agent,
    agent_process,
    certificates,
    confirm_over,
    holds_its_active_key,
    renewal_stack,
    request_over,
    state_dir,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki, RenewerProcess]]:
    with renewal_stack(tmp_path_factory.mktemp("rotation")) as stack:
        yield stack


def device(stack: tuple[BrokerProcess, Pki, RenewerProcess], name: str, tmp_path: Path) -> tuple[DeviceCreds, Path]:
    broker, pki, _ = stack
    creds = pki.issue(name)
    return creds, state_dir(tmp_path / name, creds, pki.home, broker.port)


def live_creds(state: Path, device_id: str) -> CredentialFiles:
    return CredentialFiles(device_id, state / "fullchain.pem", state / "key.pem", state / "ca.pem")


def test_a_device_renews_and_only_the_new_certificate_works(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                            tmp_path: Path) -> None:
    broker, pki, _ = stack
    creds, state = device(stack, "e2e-renew", tmp_path)
    done = agent(state)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["serial"] != creds.serial
    active = holds_its_active_key(pki.home, "e2e-renew", state)
    with connect(broker.port, live_creds(state, "e2e-renew")) as client:
        assert client.is_connected()
    with pytest.raises(ConnectRefused) as refused:
        connect(broker.port, creds)
    assert refused.value.code == 5
    old = next(c for c in certificates(pki.home, "e2e-renew") if c.serial == creds.serial)
    assert old.status is CertificateStatus.REVOKED and old.revocation_reason is RevocationReason.SUPERSEDED
    assert active.renewal_of == creds.serial


def test_a_session_still_on_the_old_certificate_is_closed(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                          tmp_path: Path) -> None:
    broker, pki, _ = stack
    creds = pki.issue("e2e-kick")
    with connect(broker.port, creds) as old_session:
        new_key, serial = request_over(old_session, creds)
        confirm_over(old_session, creds.device_id, new_key, serial)
        old_session.wait_disconnected(timeout=15)  # the broker closed it: its certificate was superseded
    kicked = [e for e in audit_events(pki.home, "broker.session.kicked") if e.device_id == "e2e-kick"]
    assert kicked and kicked[-1].data["reason"] == "certificate-revoked"
    assert kicked[-1].data["fingerprint"] == creds.fingerprint
    with pytest.raises(ConnectRefused):
        connect(broker.port, creds)


def test_the_first_connect_with_the_new_certificate_activates_it(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                                  tmp_path: Path) -> None:
    broker, pki, _ = stack
    creds = pki.issue("e2e-connect")
    with connect(broker.port, creds) as old_session:
        new_key, serial = request_over(old_session, creds)
        pending = next(c for c in certificates(pki.home, "e2e-connect") if c.serial == serial)
        assert pending.status is CertificateStatus.PENDING
        cert = x509.load_pem_x509_certificate(pending.pem.encode())
        new_creds = pki.write("e2e-connect-new", cert, new_key)
        with connect(broker.port, new_creds) as new_session:  # no confirmation: this CONNECT activates it
            assert new_session.is_connected()
            old_session.wait_disconnected(timeout=15)
            new_session.publish("devices/e2e-connect/telemetry/t", b"1")
    states = {c.serial: c for c in certificates(pki.home, "e2e-connect")}
    assert states[serial].status is CertificateStatus.ACTIVE
    assert states[creds.serial].revocation_reason is RevocationReason.SUPERSEDED
    activated = [e for e in audit_events(pki.home, "certificate.activated") if e.device_id == "e2e-connect"]
    assert activated[-1].data["via"] == "connect" and activated[-1].actor.startswith("broker@")
    with pytest.raises(ConnectRefused):
        connect(broker.port, creds)


def test_operators_orders_reach_a_running_agent(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                tmp_path: Path) -> None:
    _, pki, _ = stack
    creds, state = device(stack, "e2e-order", tmp_path)
    expiring = iotauth_cli(pki.home, "devices", "expiring", "--within", "400d", "--json")
    assert expiring.returncode == 0, expiring.stderr
    rows = {r["device_id"]: r for r in json.loads(expiring.stdout)}
    assert rows["e2e-order"]["serial"] == creds.serial and 364 < rows["e2e-order"]["days_left"] <= 365
    assert "iotauth-renewer" in rows  # the renewer is a device too (it renews itself)
    running = agent_process(state, "run", "--renew-at", "0")
    try:
        time.sleep(1.0)  # connected and subscribed (an order made earlier would wait for it, retained)
        waited = iotauth_cli(pki.home, "rotate", "e2e-order", "--wait", "--timeout", "60", "--json")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        report = json.loads(waited.stdout)
        assert report["renewed"] == 1 and report["not_renewed"] == [] and report["ordered"] == ["e2e-order"]
        wait_for(lambda: not (state / "rotation.json").exists() and
                 x509.load_pem_x509_certificate((state / "cert.pem").read_bytes()).serial_number != int(
                     creds.serial, 16), message="the agent switched its files")
    finally:
        running.terminate()
        running.wait(30)
    holds_its_active_key(pki.home, "e2e-order", state)
    requested = [e for e in audit_events(pki.home, "rotation.requested") if e.device_id == "e2e-order"]
    assert requested and requested[-1].data["serial"] == creds.serial


def test_orders_made_while_the_renewer_is_down_are_delivered(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                             tmp_path: Path) -> None:
    _, pki, renewer = stack
    _, state = device(stack, "e2e-later", tmp_path)
    renewer.stop()
    try:
        ordered = iotauth_cli(pki.home, "rotate", "e2e-later", "--json")
        assert ordered.returncode == 0 and json.loads(ordered.stdout)["ordered"] == ["e2e-later"]
    finally:
        renewer.start()
    running = agent_process(state, "run", "--renew-at", "0")
    try:
        wait_for(lambda: len(certificates(pki.home, "e2e-later")) == 2 and not (state / "rotation.json").exists()
                 and all(c.status is not CertificateStatus.PENDING for c in certificates(pki.home, "e2e-later")),
                 timeout=60, message="the order was delivered and carried out")
    finally:
        running.terminate()
        running.wait(30)
    holds_its_active_key(pki.home, "e2e-later", state)


def test_a_device_that_never_switches_keeps_its_certificate(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                             tmp_path: Path) -> None:
    broker, pki, _ = stack
    creds, state = device(stack, "e2e-stuck", tmp_path)
    crashed = agent(state, "--crash-at", "issued", "renew")
    assert crashed.returncode == -9
    pending = [c for c in certificates(pki.home, "e2e-stuck") if c.status is CertificateStatus.PENDING]
    assert len(pending) == 1

    async def sweep() -> None:  # what every long-running process does once the pending TTL has passed
        async with await open_registry(pki.home.registry_db) as registry:
            await registry.expire_pending(now_utc() + timedelta(seconds=1), RevocationReason.SUPERSEDED,
                                          actor="sweep")

    asyncio.run(sweep())
    with connect(broker.port, creds) as client:  # the old certificate still works
        assert client.is_connected()
    expired = agent(state)
    # The new certificate is refused (revoked by the sweep), the confirmation too: the agent says so and drops it.
    assert expired.returncode == 1 and "renewal-expired" in expired.stderr, expired.stderr
    assert not (state / "rotation.json").exists()
    again = agent(state)  # the next renewal starts from a new key
    assert again.returncode == 0, again.stderr
    holds_its_active_key(pki.home, "e2e-stuck", state)


def test_the_renewer_renews_its_own_certificate(stack: tuple[BrokerProcess, Pki, RenewerProcess]) -> None:
    _, pki, renewer = stack
    home: Home = pki.home
    own = [c for c in certificates(home, "iotauth-renewer") if c.status is CertificateStatus.ACTIVE]
    assert [c.serial for c in own] == [renewer.started["serial"]]
    assert (home.root / "renewer" / "renewer.key").stat().st_mode & 0o777 == 0o600
