"""Attacks before authentication, from several source addresses (Linux routes all of 127.0.0.0/8 to lo).

An attacker holds idle TCP sockets and TLS sessions that never send CONNECT from 127.0.0.2 and 127.0.0.3
while devices connect from 127.0.0.1; revoked certificates hide inside floods; a leaf signed by the root
tries its luck. The goal is the issue's: a failed client changes nothing for anyone else, and every refusal
that presented a certificate is named in the audit log.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.broker import (
    BrokerProcess,
    ConnectRefused,
    DeviceCreds,
    Pki,
    audit_events,
    configured_home,
    connect,
    iotauth_cli,
    running_broker,
    wait_for,
)

LIMITS = """
[broker.limits]
max_pending = 256
max_pending_per_address = 16
max_pending_per_network = 64
max_waiting_per_address = 32
max_waiting = 128
failures_per_second = 5.0
failure_burst = 40
handshake_timeout = 10.0
connect_timeout = 3.0
min_timeout = 0.5
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki]]:
    with running_broker(configured_home(tmp_path_factory.mktemp("abuse"), limits=LIMITS)) as started:
        yield started


def idle_socket(port: int, source: str) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    except OSError:
        return None


def tls_session(port: int, creds: DeviceCreds, source: str) -> ssl.SSLSocket | None:
    """A completed TLS handshake that will never send CONNECT."""
    context = ssl.create_default_context(cafile=str(creds.ca))
    context.load_cert_chain(creds.cert, creds.key)
    raw = idle_socket(port, source)
    if raw is None:
        return None
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError):
        raw.close()
        return None


def closed_soon(sock: socket.socket, timeout: float = 10.0) -> bytes | None:
    """What the broker sent before closing, or ``None`` if it kept the connection open for ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except (ssl.SSLError, ConnectionError):
        pass
    return data


def test_idle_floods_from_two_addresses_do_not_lock_devices_out(guarded: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = guarded
    attacker = pki.issue("abuse-attacker")
    held: list[socket.socket] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            held += [s for s in (idle_socket(broker.port, source) for _ in range(300)) if s is not None]
            held += [s for s in (tls_session(broker.port, attacker, source) for _ in range(20)) if s is not None]
        devices = [pki.issue(f"abuse-device-{n}") for n in range(10)]
        for creds in devices:  # every legitimate device from another address gets in
            with connect(broker.port, creds) as device:
                device.publish(f"devices/{creds.device_id}/state", b"up")
    finally:
        for sock in held:
            sock.close()
    refusals = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                                 if e.data.get("reason") == "too-many-pending-address"], message="refusals")
    sources = {e.data["peer"].split(":")[0] for e in refusals}
    assert sources == {"127.0.0.2", "127.0.0.3"}
    assert sum(e.data["count"] for e in refusals) > 100  # aggregated per source: counted, not one event each


def test_tls_sessions_that_never_send_connect_are_closed_at_the_deadline(guarded: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = guarded
    creds = pki.issue("abuse-silent")
    sock = tls_session(broker.port, creds, "127.0.0.5")
    assert sock is not None
    assert closed_soon(sock) == b""  # closed (connect_timeout 3 s), with nothing said
    record = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                               if e.data.get("fingerprint") == creds.fingerprint], message="audit")[-1]
    assert record.data["reason"] == "connect-timeout" and record.device_id == "abuse-silent"


def test_a_revoked_certificate_is_refused_when_the_handshake_ends(guarded: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = guarded
    creds = pki.issue("abuse-revoked")
    assert iotauth_cli(broker.home, "revoke", "abuse-revoked").returncode == 0
    started = time.monotonic()
    sock = tls_session(broker.port, creds, "127.0.0.6")
    assert sock is not None
    assert closed_soon(sock) == b"\x20\x02\x00\x05"  # CONNACK 0x05 without waiting for a CONNECT, then closed
    assert time.monotonic() - started < 3.0  # not the 3-second CONNECT deadline
    record = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                               if e.data.get("fingerprint") == creds.fingerprint], message="audit")[-1]
    assert record.data["reason"] == "certificate-revoked" and record.device_id == "abuse-revoked"
    assert record.data["peer"].startswith("127.0.0.6:")


def test_a_stolen_certificate_hidden_in_a_flood_is_still_named(guarded: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = guarded
    stolen = pki.issue("abuse-stolen")
    assert iotauth_cli(broker.home, "revoke", "abuse-stolen", "--reason", "key-compromise").returncode == 0
    answered = None
    for n in range(150):
        sock = idle_socket(broker.port, "127.0.0.7")
        if sock is not None:
            sock.close()
        while n == 75 and answered is None:  # the same source: it may have to wait for a free slot, like anyone
            session = tls_session(broker.port, stolen, "127.0.0.7")
            answered = closed_soon(session) if session is not None else None
            if answered != b"\x20\x02\x00\x05":
                answered = None
                time.sleep(0.2)
    named = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                              if e.data.get("fingerprint") == stolen.fingerprint], message="named refusal")
    assert named[0].device_id == "abuse-stolen" and named[0].data["reason"] == "certificate-revoked"
    assert named[0].data["peer"].startswith("127.0.0.7:")

    def flood_counted() -> int:
        return sum(e.data["count"] for e in audit_events(broker.home, "broker.connect.denied")
                   if e.data["peer"].startswith("127.0.0.7") and e.data.get("fingerprint") is None)

    wait_for(lambda: flood_counted() >= 150, timeout=20, message="every flood connection counted")


def test_a_leaf_signed_directly_by_the_root_fails_the_handshake(guarded: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = guarded
    creds = pki.forge("abuse-rootleaf", signer="root", register=True)
    with pytest.raises(ConnectRefused) as caught:
        connect(broker.port, creds)
    assert caught.value.code is None  # no CONNACK: TLS itself refused it
    refusals = wait_for(lambda: [e for e in audit_events(broker.home, "broker.connect.denied")
                                 if e.data["reason"].startswith("tls-")], message="tls refusal")
    assert any("unable-to-get-local-issuer" in e.data["reason"] or "certificate" in e.data["reason"]
               for e in refusals)
