"""The reference agent on the state directory the emulator keeps, provisioned by the real station over a pty.

``python -m firmware_tools.agent --state DIR renew`` reads the broker's
address from the ``config.json`` the station wrote, renews through
``iotauth renewer`` on ``iotauth broker``, and leaves the board's directory
holding the new key and certificate; a power cycle of the emulator keeps
them. The agent's small pure parts (orders, the due time, what a refusal at
the handshake means, an unprovisioned directory) are checked directly.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_tools.agent import EXIT_STATE, StateDir, due_at, ordered
from firmware_tools.agent.session import refused_as_revoked
from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.provisioning.station import Station
from iotauth.rotation import messages
from iotauth.testing import CredentialFiles, free_port
from tests.fixtures.broker import BrokerProcess, Pki, connect
from tests.fixtures.devices import EmulatorFactory
from tests.fixtures.rotation import RenewerProcess, agent, holds_its_active_key, open_window, state_dir


async def test_the_agent_renews_the_emulators_state_directory(
    emulator: EmulatorFactory, station_factory: Callable[..., Station], home: Home, authority: Authority
) -> None:
    port = free_port()
    authority.settings = replace(authority.settings, broker_port=port)  # what the station writes to the board
    board = emulator()
    provisioned = await station_factory().provision(board.port)
    assert provisioned.ok, provisioned.error
    device_id = str(provisioned.device_id)
    assert json.loads((board.state / "config.json").read_text())["broker_port"] == port
    open_window(home)
    broker = await asyncio.to_thread(BrokerProcess(home, port=port).start)
    renewer = RenewerProcess(home, port)
    try:
        await asyncio.to_thread(renewer.start)
        done = await asyncio.to_thread(agent, board.state)  # no --host/--port: config.json says where
        assert done.returncode == 0, done.stderr
        serial = json.loads(done.stdout)["serial"]
        await asyncio.to_thread(holds_its_active_key, home, device_id, board.state)
        status = json.loads((await asyncio.to_thread(agent, board.state, "status")).stdout)
        assert status == {"device_id": device_id, "serial": serial, "not_after": status["not_after"],
                          "rotation": None}
        board.stop()
        board.start()  # a power cycle: the emulator's exports are not rewritten from its provisioning flash
        creds = CredentialFiles(device_id, board.state / "fullchain.pem", board.state / "key.pem",
                                board.state / "ca.pem")
        with await asyncio.to_thread(connect, port, creds) as client:
            assert client.is_connected()
        assert format(x509.load_pem_x509_certificate((board.state / "cert.pem").read_bytes()).serial_number,
                      "x") == serial
    finally:
        await asyncio.to_thread(renewer.stop)
        await asyncio.to_thread(broker.stop)


def test_an_unprovisioned_directory_is_a_clear_error(tmp_path: Path) -> None:
    done = agent(tmp_path, "renew")
    assert done.returncode == EXIT_STATE
    assert done.stderr.startswith("error: not-provisioned: ") and "Traceback" not in done.stderr


def test_only_an_order_for_the_current_certificate_counts(home: Home, tmp_path: Path) -> None:
    creds = Pki(home, tmp_path / "creds").issue("order-1")
    state = StateDir(state_dir(tmp_path / "order-1", creds, home, 8883))
    topic = messages.command_topic("order-1")
    assert ordered(state, topic, messages.RotateOrder(creds.serial, "2030-01-01T00:00:00Z").encode())
    assert not ordered(state, topic, messages.RotateOrder("abc123", "2030-01-01T00:00:00Z").encode())  # renewed since
    assert not ordered(state, topic, b"")  # the renewer cleared it
    assert not ordered(state, topic, b"{not json")
    assert not ordered(state, messages.command_topic("order-2"),
                       messages.RotateOrder(creds.serial, "2030-01-01T00:00:00Z").encode())


def test_due_at_is_the_fraction_of_the_validity() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    cert = _self_signed(start, start + timedelta(days=100))
    assert due_at(cert, 0.0) is None  # only when ordered
    assert due_at(cert, 0.7) == (start + timedelta(days=70)).timestamp()


def test_only_a_revoked_alert_says_the_broker_refuses_the_certificate() -> None:
    revoked = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked")
    revoked.reason = "SSLV3_ALERT_CERTIFICATE_REVOKED"
    ours = ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    ours.reason = "CERTIFICATE_VERIFY_FAILED"
    assert refused_as_revoked(revoked)
    assert not refused_as_revoked(ours)  # our own check of the broker failed: nothing about our certificate


def _self_signed(not_before: datetime, not_after: datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))
