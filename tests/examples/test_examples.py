"""examples/: each script runs as a user would run it, against real parts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.provisioning.report import append_report
from iotauth.provisioning.station import Station
from iotauth.registry import DeviceStatus, Registry, RevocationReason
from iotauth.testing import free_port
from tests.fixtures.broker import BrokerProcess, ConnectRefused, Pki, connect, iotauth_cli
from tests.fixtures.devices import EmulatorFactory
from tests.fixtures.rotation import RenewerProcess, holds_its_active_key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
StationFactory = Callable[..., Station]


def run_example(name: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


async def test_sensor_uses_the_credentials_the_station_wrote(
    emulator: EmulatorFactory, station_factory: StationFactory, home: Home, registry: Registry, tmp_path: Path
) -> None:
    board = emulator()
    provisioned = await station_factory().provision(board.port)
    assert provisioned.ok, provisioned.error
    device_id = str(provisioned.device_id)
    broker = BrokerProcess(home).start()
    try:
        ops = await asyncio.to_thread(Pki(home, tmp_path / "ops").issue, "ops-1", "ingest")  # it runs its own loop
        operator = connect(broker.port, ops)
        operator.subscribe("devices/+/telemetry/#")
        operator.subscribe("devices/+/state")
        sensor = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "sensor.py"),
                "--state",
                str(board.state),
                "--port",
                str(broker.port),
                "--count",
                "3",
                "--interval",
                "0.3",
                "--linger",
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = operator.receive()
        assert first.topic == f"devices/{device_id}/telemetry/temperature"
        assert json.loads(first.payload)["seq"] == 0
        operator.publish(f"devices/{device_id}/commands/ping", "are you there?")
        out, errors = sensor.communicate(timeout=60)
        assert sensor.returncode == 0, errors
        assert f"connected to localhost:{broker.port} as {device_id}" in out
        assert "command ping: are you there?" in out
        received = [first, *operator.receive_all()]
        topics = [m.topic for m in received]
        assert topics.count(f"devices/{device_id}/telemetry/temperature") == 3
        assert (f"devices/{device_id}/state", b"pong") in [(m.topic, m.payload) for m in received]
        operator.close()

        await registry.revoke(device_id, RevocationReason.KEY_COMPROMISE, actor="test")
        refused = run_example("sensor.py", "--state", str(board.state), "--port", str(broker.port), "--count", "1")
        assert refused.returncode == 1
        assert refused.stderr.strip() == "error: the broker refused the connection: not authorised (CONNACK 5)"
    finally:
        broker.stop()


async def test_sensor_backs_off_until_the_broker_is_up(
    emulator: EmulatorFactory, station_factory: StationFactory, home: Home, tmp_path: Path
) -> None:
    """The reference client retries with jittered backoff (a test-sized base) and connects once a broker listens."""
    board = emulator()
    provisioned = await station_factory().provision(board.port)
    assert provisioned.ok, provisioned.error
    port = free_port()
    sensor = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "sensor.py"), "--state", str(board.state), "--port", str(port),
         "--count", "1", "--interval", "0", "--linger", "0", "--attempts", "40", "--backoff-base", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    await asyncio.sleep(1.5)  # nothing listens yet: the sensor is backing off
    broker = BrokerProcess(home, port=port).start()
    try:
        out, errors = await asyncio.to_thread(sensor.communicate, timeout=60)
    finally:
        broker.stop()
    assert sensor.returncode == 0, errors
    retries = [line for line in out.splitlines() if "retrying in" in line]
    assert retries and all(line.startswith("cannot connect to") for line in retries)
    assert f"connected to localhost:{port} as {provisioned.device_id}" in out


async def test_sensor_renews_through_the_agent_when_the_operator_orders_it(
    emulator: EmulatorFactory, station_factory: StationFactory, home: Home, authority: Authority, tmp_path: Path
) -> None:
    """``iotauth rotate`` reaches a running sensor; it renews with the agent on its flash and carries on."""
    port = free_port()
    authority.settings = replace(authority.settings, broker_port=port)
    board = emulator()
    provisioned = await station_factory().provision(board.port)
    assert provisioned.ok, provisioned.error
    device_id = str(provisioned.device_id)
    broker = await asyncio.to_thread(BrokerProcess(home, port=port).start)
    renewer = RenewerProcess(home, port)
    sensor = None
    try:
        await asyncio.to_thread(renewer.start)
        sensor = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "sensor.py"), "--state", str(board.state), "--count", "40",
             "--interval", "0.25", "--linger", "0", "--renew-at", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines = LineReader(sensor)
        assert await asyncio.to_thread(lines.wait_for, f"connected to localhost:{port} as {device_id}")
        ordered = await asyncio.to_thread(iotauth_cli, home, "rotate", device_id, "--wait", "--timeout", "60",
                                          "--json")
        assert ordered.returncode == 0, ordered.stdout + ordered.stderr
        assert json.loads(ordered.stdout)["renewed"] == 1
        renewed = await asyncio.to_thread(lines.wait_for, "renewed: now ")
        _, errors = await asyncio.to_thread(sensor.communicate, timeout=90)
        assert sensor.returncode == 0, errors
    finally:
        if sensor is not None and sensor.poll() is None:
            sensor.kill()
        await asyncio.to_thread(renewer.stop)
        await asyncio.to_thread(broker.stop)
    serial = renewed.split("renewed: now ", 1)[1].strip()
    active = await asyncio.to_thread(holds_its_active_key, home, device_id, board.state)
    assert active.serial == serial != provisioned.serial
    assert "command rotate: the operator orders a renewal" in lines.text()
    assert lines.text().count(f"connected to localhost:{port} as {device_id}") == 2  # again, with the new identity


class LineReader:
    """A subprocess's stdout, read line by line in a thread, with a bounded wait for a line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._arrived = threading.Condition()
        assert process.stdout is not None
        self._stdout = process.stdout
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stdout:
            with self._arrived:
                self.lines.append(line.rstrip("\n"))
                self._arrived.notify_all()

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        with self._arrived:
            found = self._arrived.wait_for(lambda: [line for line in self.lines if needle in line], timeout)
        assert found, f"{needle!r} not printed within {timeout} s:\n{self.text()}"
        return found[0]

    def text(self) -> str:
        return "\n".join(self.lines)


def test_sensor_without_credentials_is_a_clear_error(tmp_path: Path) -> None:
    result = run_example("sensor.py", "--state", str(tmp_path))
    assert result.returncode != 0 and "provision the device first" in result.stderr


async def test_operator_revoke(home: Home, registry: Registry, tmp_path: Path) -> None:
    creds = await asyncio.to_thread(Pki(home, tmp_path / "creds").issue, "sensor-7")
    result = run_example("operator_revoke.py", "sensor-7", "--reason", "key-compromise", "--home", str(home.root))
    assert result.returncode == 0, result.stderr
    assert "revoked sensor-7: 1 certificate(s)" in result.stdout
    assert (await registry.get_device("sensor-7")).status is DeviceStatus.REVOKED
    crl = x509.load_pem_x509_crl(home.crl_pem.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(creds.serial, 16)) is not None
    unknown = run_example("operator_revoke.py", "ghost", "--home", str(home.root))
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: unknown device 'ghost'"


async def test_line_report_summarises_a_real_station_report(
    emulator: EmulatorFactory, station_factory: StationFactory, tmp_path: Path
) -> None:
    station = station_factory()
    good = await station.provision(emulator().port)
    bad = await station.provision(emulator(faults=["stall:hello"], args=["--stall-ms", "0"]).port)
    assert good.ok and not bad.ok
    report = tmp_path / "line.csv"
    append_report(report, [good.as_row(), bad.as_row()])

    summary = json.loads(run_example("line_report.py", str(report), "--json").stdout)
    assert summary["rows"] == 2 and summary["boards"] == 2
    assert summary["devices_provisioned"] == 1 and summary["failed_attempts"] == 1
    assert summary["first_pass_yield"] == 0.5
    assert list(summary["failure_reasons"]) == [bad.error]
    assert summary["by_station"] == {"test-station": {"passed": 1, "failed": 1}}
    assert summary["seconds_per_board"]["median"] > 0
    text = run_example("line_report.py", str(report)).stdout
    assert "1 device(s) provisioned from 2 board(s)" in text and "failure reasons:" in text
    assert run_example("line_report.py", str(tmp_path / "missing.csv")).returncode == 1


@contextlib.contextmanager
def amqtt_example_broker(home: Home, config: Path) -> Iterator[int]:
    """examples/amqtt_broker.py on ``config``, bound to a free loopback port; yields the port."""
    env = {**os.environ, "IOTAUTH_HOME": str(home.root), "PYTHONPATH": str(EXAMPLES.parent)}
    env.pop("IOTAUTH_REGISTRY", None)
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "amqtt_broker.py"), str(config), "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        addresses = json.loads(process.stdout.readline())
        yield int(next(iter(addresses.values())).rsplit(":", 1)[1])
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert process.returncode == 0


def test_amqtt_configuration_example_runs_the_hardened_broker(home: Home, tmp_path: Path) -> None:
    creds = Pki(home, tmp_path / "creds").issue("sensor-8")
    stranger = Pki(home, tmp_path / "creds").forge("stranger", signer="stranger")
    with amqtt_example_broker(home, EXAMPLES / "amqtt_config.yaml") as port:
        with connect(port, creds) as device:
            device.subscribe("devices/sensor-8/commands/#")
            assert device.is_connected()
        with pytest.raises(ConnectRefused) as refused:  # at the TLS handshake: never reaches CONNACK
            connect(port, stranger)
        assert refused.value.code is None


def test_an_operators_own_topic_plugin_narrows_iotauths_verdicts(home: Home, tmp_path: Path) -> None:
    config = yaml.safe_load((EXAMPLES / "amqtt_config.yaml").read_text())
    config["plugins"]["tests.examples.narrowing_plugin.DenyBlockedTopics"] = {}
    path = tmp_path / "amqtt_config.yaml"
    path.write_text(yaml.safe_dump(config))
    creds = Pki(home, tmp_path / "creds").issue("sensor-9")
    with amqtt_example_broker(home, path) as port, connect(port, creds) as device:
        assert device.subscribe("devices/sensor-9/commands/blocked") == [0x80]  # iotauth allows, the plugin denies
        assert device.subscribe("devices/sensor-9/commands/open") == [1]
        assert device.subscribe("devices/sensor-1/commands/open") == [0x80]  # the plugin allows, iotauth denies
