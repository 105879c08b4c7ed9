"""Running the broker: fail closed when the registry is unreadable, signals, listeners, bad setups."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.broker import (
    BrokerProcess,
    ConnectRefused,
    Device,
    audit_events,
    connect,
    iotauth_cli,
    new_home,
    wait_for,
)

LOCKER = """
import asyncio, sys
import asyncpg

async def main(url):
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE devices, certificates, events IN ACCESS EXCLUSIVE MODE")
    print("locked", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await tx.rollback()
    await conn.close()

asyncio.run(main(sys.argv[1]))
"""


class RegistryLock:
    """Another client holding an exclusive lock: every registry read blocks (the registry 'cannot be read')."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LOCKER, url], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        self.process.wait(timeout=30)


def test_unreadable_registry_fails_closed(broker_factory, pg_registry: str) -> None:  # type: ignore[no-untyped-def]
    broker, pki = broker_factory("--registry-grace", "1", registry_url=pg_registry)
    live, late = pki.issue("fc-live"), pki.issue("fc-late")
    device = connect(broker.port, live)
    lock = RegistryLock(pg_registry)
    try:
        with pytest.raises(ConnectRefused) as refused:
            connect(broker.port, late)
        assert refused.value.code == 3  # server unavailable: never admitted without the registry
        device.wait_disconnected(timeout=30)  # live sessions are dropped after the grace period
        broker.wait_log("failing closed")
    finally:
        lock.release()
    broker.wait_log("registry readable again")
    with connect(broker.port, late) as back:
        assert back.subscribe("devices/fc-late/commands/#") == [1]

    def recorded(reason: str) -> bool:
        return any(e.data.get("reason") == reason for e in audit_events(broker.home, registry_url=pg_registry))

    wait_for(lambda: recorded("registry-unavailable"), timeout=40, message="denial and kick records")
    assert wait_for(lambda: audit_events(broker.home, "broker.registry.recovered", registry_url=pg_registry))
    kicks = audit_events(broker.home, "broker.session.kicked", registry_url=pg_registry)
    assert [k.device_id for k in kicks if k.data["reason"] == "registry-unavailable"] == ["fc-live"]
    device.close()


def test_fail_open_keeps_serving_certificate_holders(broker_factory, pg_registry: str) -> None:  # type: ignore
    broker, pki = broker_factory("--registry-grace", "1", "--fail-open", registry_url=pg_registry)
    live, late = pki.issue("fo-live"), pki.issue("fo-late")
    device = connect(broker.port, live)
    lock = RegistryLock(pg_registry)
    try:
        with connect(broker.port, late) as admitted:  # DANGEROUS by design: admitted on the certificate alone
            assert admitted.subscribe("devices/fo-late/commands/#") == [1]
        time.sleep(3.5)
        assert device.is_connected()
    finally:
        lock.release()
    device.close()


def test_unreadable_registry_at_start_is_an_error(tmp_path: Path) -> None:
    home = new_home(tmp_path)
    home.registry_db.unlink()
    result = iotauth_cli(home, "broker", "--bind", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "does not exist" in result.stderr


def test_port_in_use_is_one_clear_error(broker: BrokerProcess) -> None:
    result = iotauth_cli(broker.home, "broker", "--bind", f"127.0.0.1:{broker.port}")
    assert result.returncode == 1 and "cannot listen on" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_clean_shutdown_on_signals(broker_factory, signum: int) -> None:  # type: ignore[no-untyped-def]
    broker, pki = broker_factory()
    device = connect(broker.port, pki.issue("shutdown-dev"))
    assert broker.stop(signum) == 0
    device.wait_disconnected()
    assert any("stopped" in line for line in broker.log)
    assert not any("Traceback" in line for line in broker.log), broker.output()
    assert audit_events(broker.home, "broker.stopped")
    device.close()


def test_secure_websocket_listener(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker, pki = broker_factory("--ws-bind", "127.0.0.1:0")
    assert broker.ws_port is not None
    sensor, ingest = pki.issue("ws-sensor"), pki.issue("ws-ingest", "ingest")
    with Device(broker.ws_port, sensor, transport="websockets").connect() as device, \
            Device(broker.ws_port, ingest, transport="websockets").connect() as service:
        assert device.subscribe("devices/ws-sensor/commands/#") == [1]
        assert device.subscribe("devices/+/commands/#") == [0x80]
        service.publish("devices/ws-sensor/commands/go", b"ws")
        assert device.receive().payload == b"ws"
    with pytest.raises(ConnectRefused) as refused:
        Device(broker.ws_port, sensor, client_id="ws-ingest", transport="websockets").connect()
    assert refused.value.code == 5
    with pytest.raises(ConnectRefused):
        Device(broker.ws_port, None, client_id="ws-sensor", ca=sensor.ca, transport="websockets").connect()


def test_postgresql_notify_wakes_the_broker_at_once(broker_factory, pg_registry: str) -> None:  # type: ignore
    """With a 60 s poll interval, only PostgreSQL's NOTIFY can explain a disconnect within seconds."""
    from iotauth.registry import RevocationReason, open_registry

    broker, pki = broker_factory("--poll-interval", "60", registry_url=pg_registry)
    creds = pki.issue("notify-dev")
    device = connect(broker.port, creds)
    time.sleep(0.5)

    async def revoke() -> float:
        async with await open_registry(pg_registry) as registry:
            started = time.time()  # an upper bound: the commit happens after this
            await registry.revoke("notify-dev", RevocationReason.KEY_COMPROMISE, actor="test")
        return started

    started = asyncio.run(revoke())
    device.wait_disconnected(timeout=15)
    assert device.disconnected_wall is not None
    print(f"PostgreSQL revocation-to-disconnect: <= {(device.disconnected_wall - started) * 1000:.0f} ms")
    assert device.disconnected_wall - started < 5.0
    device.close()
