"""Live revocation, suspension and expiry: enforced on sessions that are already connected.

The operator commands run as separate processes (``iotauth revoke`` /
``iotauth suspend``), exactly as in production; the broker learns about them
only through the registry's change feed. Latency is measured from the
registry's event timestamp to the moment the client sees its connection drop,
and printed; the assertion is only a generous bound.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from iotauth.registry import RevocationReason, open_registry
from tests.fixtures.broker import (
    ENGINES,
    BrokerProcess,
    ConnectRefused,
    Device,
    Pki,
    audit_events,
    connect,
    event_time,
    iotauth_cli,
    on_engines,
    wait_for,
)

# Revocation, suspension and expiry reach the sessions of either engine through the same guard.
engine = on_engines(*ENGINES)


def registry_event(broker: BrokerProcess, kind: str, device_id: str) -> object:
    return wait_for(lambda: [e for e in audit_events(broker.home, kind) if e.device_id == device_id],
                    message=f"{kind} for {device_id}")[-1]


def kick_record(broker: BrokerProcess, device_id: str) -> dict:
    kicks = wait_for(lambda: [e for e in audit_events(broker.home, "broker.session.kicked")
                              if e.device_id == device_id],
                     message=f"kick record for {device_id}")
    return kicks[-1].data


def test_revoke_from_another_process_drops_the_live_session(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("live-revoked")
    device = Device(broker.port, creds, clean_session=False).connect()
    device.subscribe("devices/live-revoked/commands/#")
    result = iotauth_cli(broker.home, "revoke", "live-revoked", "--reason", "key-compromise")
    assert result.returncode == 0, result.stderr
    device.wait_disconnected(timeout=5.0)
    revoked = registry_event(broker, "device.revoked", "live-revoked")
    latency = device.disconnected_wall - event_time(revoked)  # type: ignore[operator,arg-type]
    print(f"revocation-to-disconnect latency: {latency * 1000:.0f} ms")
    assert latency < 5.0

    kick = kick_record(broker, "live-revoked")
    assert kick["reason"] in ("device-revoked", "certificate-revoked") and kick["fingerprint"] == creds.fingerprint
    broker.wait_log("forgot the session of live-revoked")
    with pytest.raises(ConnectRefused) as refused:
        Device(broker.port, creds, clean_session=False).connect()
    assert refused.value.code == 5
    device.close()


def test_suspend_drops_the_session_and_resume_lets_it_back(broker: BrokerProcess, pki: Pki) -> None:
    creds = pki.issue("live-suspended")
    device = connect(broker.port, creds)
    assert iotauth_cli(broker.home, "suspend", "live-suspended").returncode == 0
    device.wait_disconnected(timeout=5.0)
    assert kick_record(broker, "live-suspended")["reason"] == "device-suspended"
    with pytest.raises(ConnectRefused):
        connect(broker.port, creds)
    device.close()
    assert iotauth_cli(broker.home, "resume", "live-suspended").returncode == 0
    with connect(broker.port, creds) as back:
        assert back.subscribe("devices/live-suspended/commands/#") == [1]


def test_revoking_one_certificate_drops_only_sessions_on_it(broker: BrokerProcess, pki: Pki) -> None:
    old, new = pki.issue("rotating"), pki.issue("rotating")
    device = connect(broker.port, old)

    async def revoke_old() -> None:
        async with await open_registry(broker.home.registry_db) as registry:
            await registry.revoke_certificate(old.serial, RevocationReason.SUPERSEDED, actor="test")

    asyncio.run(revoke_old())
    device.wait_disconnected(timeout=5.0)
    assert kick_record(broker, "rotating")["reason"] == "certificate-revoked"
    with pytest.raises(ConnectRefused):
        connect(broker.port, old)
    with connect(broker.port, new) as renewed:  # the device itself is still active
        assert renewed.subscribe("devices/rotating/commands/#") == [1]
    device.close()


def test_revoked_device_stops_receiving_even_with_a_queued_session(broker: BrokerProcess, pki: Pki) -> None:
    creds, ingest = pki.issue("offline-revoked"), pki.issue("offline-revoked-ingest", "ingest")
    with Device(broker.port, creds, clean_session=False).connect() as device:
        device.subscribe("devices/offline-revoked/commands/#")
    assert iotauth_cli(broker.home, "revoke", "offline-revoked").returncode == 0
    broker.wait_log("forgot the session of offline-revoked")
    with connect(broker.port, ingest) as service:
        service.publish("devices/offline-revoked/commands/secret", b"for nobody")


def test_repeated_revocations_are_all_fast(broker: BrokerProcess, pki: Pki) -> None:
    latencies = []
    for n in range(5):
        creds = pki.issue(f"burst-{n}")
        device = connect(broker.port, creds)
        assert iotauth_cli(broker.home, "revoke", creds.device_id).returncode == 0
        device.wait_disconnected(timeout=5.0)
        latencies.append(device.disconnected_wall - event_time(registry_event(broker, "device.revoked",  # type: ignore
                                                                              creds.device_id)))
        device.close()
    print("revocation latencies (ms):", [round(x * 1000) for x in latencies])
    assert max(latencies) < 5.0


def test_session_is_disconnected_when_the_certificate_expires(broker: BrokerProcess, pki: Pki) -> None:
    from cryptography import x509

    creds = pki.forge("short-lived", lifetime=timedelta(minutes=5, seconds=4), register=True)
    not_after = x509.load_pem_x509_certificate(creds.cert.read_bytes()).not_valid_after_utc.timestamp()
    assert not_after - time.time() > 1.0, "the machine is too slow for this test's certificate"
    device = connect(broker.port, creds)
    device.wait_disconnected(timeout=not_after - time.time() + 10.0)
    assert device.disconnected_wall is not None
    print(f"disconnected {device.disconnected_wall - not_after:+.3f} s after notAfter")
    assert device.disconnected_wall >= not_after - 0.05, "disconnected before the certificate expired"
    assert kick_record(broker, "short-lived")["reason"] == "certificate-expired"
    with pytest.raises(ConnectRefused):
        connect(broker.port, creds)
    device.close()
