"""``iotauth demo``: the whole lifecycle on emulated devices, checked step by step.

Real parts only: a fresh CA and SQLite registry, device emulators on
pseudo-terminals driven by the provisioning station over serial, the iotauth
broker on loopback with mTLS, paho-mqtt clients using the credentials each
device received, and an operator revoking a device from a separate process.
Every step checks what it claims, so a run that exits 0 is also a smoke test.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iotauth.authority import Authority, open_authority
from iotauth.bootstrap import initialise_home
from iotauth.broker.runtime import BrokerOptions
from iotauth.broker.server import Broker
from iotauth.config import Home
from iotauth.errors import IotAuthError
from iotauth.pki.ca import pem
from iotauth.pki.files import write_public, write_secret
from iotauth.pki.keys import generate_private_key, private_key_pem
from iotauth.provisioning.line import LineRequest, run_line
from iotauth.provisioning.report import append_report
from iotauth.provisioning.station import Progress, ProvisionResult, StationConfig
from iotauth.registry import Registry, open_registry

TRUST_DOMAIN = "demo.iotauth.local"
OPERATOR_ID = "ops-ingest"
WAIT = 15.0


class DemoFailed(IotAuthError):
    """A demo step did not behave as described."""


@dataclass(frozen=True)
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class DemoRun:
    home: Path
    steps: list[StepResult] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


# -- MQTT clients (paho runs its network loop in a thread) ------------------------------------


class Client:
    """A paho-mqtt client with the few waits the demo needs."""

    def __init__(self, client_id: str, cafile: Path, certfile: Path, keyfile: Path) -> None:
        self.client_id = client_id
        self.messages: list[tuple[str, bytes]] = []
        self.connack: Any = None
        self.disconnected_at: float | None = None  # wall clock, comparable with registry timestamps
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._arrived = threading.Condition()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.paho.tls_set(ca_certs=str(cafile), certfile=str(certfile), keyfile=str(keyfile))
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.disconnected_at = time.time()
        self._disconnected.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._arrived:
            self.messages.append((message.topic, bytes(message.payload)))
            self._arrived.notify_all()

    def connect(self, port: int) -> bool:
        """Connect; True on CONNACK 0."""
        self.paho.connect("localhost", port, keepalive=30)
        self.paho.loop_start()
        if not self._connected.wait(WAIT):
            raise DemoFailed(f"{self.client_id}: no CONNACK within {WAIT:.0f} s")
        return not self.connack.is_failure

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.paho.on_subscribe = lambda *_args: done.set()
        self.paho.subscribe(topic_filter, qos=1)
        if not done.wait(WAIT):
            raise DemoFailed(f"{self.client_id}: no SUBACK for {topic_filter}")

    def publish(self, topic: str, payload: str) -> None:
        self.paho.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool]) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: predicate(self.messages), WAIT)

    def wait_disconnected(self) -> bool:
        return self._disconnected.wait(WAIT)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


# -- emulated devices ---------------------------------------------------------------------------


@dataclass
class Board:
    state: Path
    process: subprocess.Popen[bytes]
    port: str

    @classmethod
    def start(cls, state: Path, hardware_id: str) -> Board:
        command = [
            sys.executable,
            "-m",
            "firmware_tools.emulator",
            "--pty",
            "--state",
            str(state),
            "--hardware-id",
            hardware_id,
            "--baud",
            "115200",
            "--keygen-ms",
            "100",
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # noqa: S603
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        line = process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("/dev/"):
            process.kill()
            raise DemoFailed(f"device emulator for {hardware_id} did not start")
        return cls(state, process, line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()

    def client(self, device_id: str) -> Client:
        return Client(device_id, self.state / "ca.pem", self.state / "fullchain.pem", self.state / "key.pem")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the run ------------------------------------------------------------------------------------


class Demo:
    """One demo run; each ``step_*`` method checks what it claims and returns a detail line."""

    def __init__(
        self, home: Home, devices: int, on_step: Callable[[StepResult], None], on_progress: Callable[[Progress], None]
    ) -> None:
        self.home = home
        self.count = devices
        self.on_step = on_step
        self.on_progress = on_progress
        self.run = DemoRun(home.root)
        self.boards: list[Board] = []
        self.device_ids: list[str] = []
        self.clients: list[Client] = []
        self.registry: Registry | None = None
        self.authority: Authority | None = None
        self.broker: Broker | None = None
        self.port = 0

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> Any:
        started = time.monotonic()
        holder: list[str] = []
        try:
            yield holder
        except (IotAuthError, OSError, AssertionError) as exc:
            result = StepResult(name, False, str(exc) or type(exc).__name__, time.monotonic() - started)
            self.run.steps.append(result)
            self.on_step(result)
            raise DemoFailed(f"{name}: {result.detail}") from exc
        result = StepResult(name, True, holder[0] if holder else "", time.monotonic() - started)
        self.run.steps.append(result)
        self.on_step(result)

    async def initialise(self) -> None:
        async with self.step("initialise the CA and registry") as note:
            await initialise_home(self.home, TRUST_DOMAIN, ["localhost", "127.0.0.1"], passphrase=None, actor="demo")
            self.port = free_port()
            config = self.home.config_file.read_text()
            self.home.config_file.write_text(config.replace("port = 8883", f"port = {self.port}", 1))
            self.registry = await open_registry(self.home.registry_db)
            self.authority = await open_authority(self.home, self.registry)
            note.append(f"two-level ECDSA P-256 CA for {TRUST_DOMAIN}; SQLite registry in {self.home.root}")

    async def start_devices(self) -> None:
        async with self.step(f"start {self.count} emulated devices on pseudo-terminals") as note:
            for n in range(self.count):
                self.boards.append(Board.start(self.home.root / "devices" / f"board-{n + 1}", f"DEMO-{n + 1:04d}"))
            note.append(", ".join(board.port for board in self.boards))

    async def provision(self) -> None:
        assert self.authority is not None
        report = self.home.root / "line-report.csv"
        async with self.step("provision them in parallel over serial") as note:
            request = LineRequest(
                ports=tuple(board.port for board in self.boards),
                config=StationConfig(station="demo-station", operator="demo"),
                id_template="sensor-{hardware_id}",
            )

            def record(result: ProvisionResult) -> None:
                append_report(report, [result.as_row()])

            outcome = await run_line(self.authority, request, on_progress=self.on_progress, on_result=record)
            failed = [r for r in outcome.results if not r.ok]
            if failed:
                raise DemoFailed("; ".join(f"{r.port}: {r.error}" for r in failed))
            self.device_ids = [str(r.device_id) for r in outcome.results]
            note.append(f"{', '.join(self.device_ids)} active; report {report.name}")
            self.run.facts["devices"] = self.device_ids
            self.run.facts["report"] = str(report)

    async def start_broker(self) -> None:
        async with self.step("start the mTLS broker") as note:
            self.broker = Broker(BrokerOptions(home=str(self.home.root), bind=f"127.0.0.1:{self.port}"))
            await self.broker.start()
            note.append(f"127.0.0.1:{self.port}, client certificates required")
            self.run.facts["broker"] = f"127.0.0.1:{self.port}"

    async def operator_client(self) -> Client:
        """An 'ingest' service identity for the operator side, issued like any device."""
        assert self.authority is not None
        key = generate_private_key("p256")
        issued = await self.authority.issue_for_key(
            key.public_key(), OPERATOR_ID, "ingest", activate=True, actor="demo"
        )
        folder = self.home.root / "operator"
        write_secret(folder / "ingest.key", private_key_pem(key, None))
        write_public(folder / "ingest.crt", pem(issued.certificate) + pem(issued.chain[0]))
        client = Client(OPERATOR_ID, self.home.root_cert, folder / "ingest.crt", folder / "ingest.key")
        self.clients.append(client)
        return client

    async def telemetry(self) -> Client:
        async with self.step("each device publishes telemetry with its own certificate") as note:
            watcher = await self.operator_client()
            if not await asyncio.to_thread(watcher.connect, self.port):
                raise DemoFailed(f"operator subscriber refused: {watcher.connack}")
            await asyncio.to_thread(watcher.subscribe, "devices/+/telemetry/#")
            for board, device_id in zip(self.boards, self.device_ids, strict=True):
                client = board.client(device_id)
                self.clients.append(client)
                if not await asyncio.to_thread(client.connect, self.port):
                    raise DemoFailed(f"{device_id} refused: {client.connack}")
                await asyncio.to_thread(client.publish, f"devices/{device_id}/telemetry/temperature", "21.5")
            expected = {f"devices/{d}/telemetry/temperature" for d in self.device_ids}
            if not await asyncio.to_thread(watcher.wait_for, lambda msgs: expected <= {t for t, _ in msgs}):
                raise DemoFailed(f"operator saw only {sorted({t for t, _ in watcher.messages})}")
            note.append(f"operator subscriber received {len(expected)} readings on devices/+/telemetry/#")
        return watcher

    async def refuse_foreign_topic(self, watcher: Client) -> None:
        assert self.registry is not None
        attacker, victim = self.device_ids[0], self.device_ids[1]
        async with self.step("a device publishing to another device's topic is refused") as note:
            client = self.clients[1]
            await asyncio.to_thread(client.publish, f"devices/{victim}/telemetry/temperature", "spoofed")
            marker = f"devices/{attacker}/telemetry/marker"
            await asyncio.to_thread(client.publish, marker, "after")
            if not await asyncio.to_thread(watcher.wait_for, lambda msgs: any(t == marker for t, _ in msgs)):
                raise DemoFailed("the marker message never arrived")
            if any(payload == b"spoofed" for _, payload in watcher.messages):
                raise DemoFailed(f"{attacker}'s message on {victim}'s topic was delivered")
            denied = await self._wait_for_event("broker.publish.denied", attacker)
            note.append(f"{attacker} -> devices/{victim}/...: not delivered; audit event #{denied}")

    async def revoke_live(self) -> None:
        target, client = self.device_ids[-1], self.clients[-1]
        async with self.step(f"the operator revokes {target}: live session dropped, reconnect refused") as note:
            command = [
                sys.executable,
                "-m",
                "iotauth.cli.main",
                "--home",
                str(self.home.root),
                "revoke",
                target,
                "--reason",
                "key-compromise",
            ]
            revoke = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, errors = await revoke.communicate()
            if revoke.returncode != 0:
                raise DemoFailed(f"'iotauth revoke' failed: {errors.decode().strip()}")
            if not await asyncio.to_thread(client.wait_disconnected):
                raise DemoFailed(f"{target} is still connected {WAIT:.0f} s after revocation")
            committed = await self._event_time("device.revoked", target)
            latency = (client.disconnected_at or committed) - committed
            client.close()
            retry = self.boards[-1].client(target)
            self.clients.append(retry)
            if await asyncio.to_thread(retry.connect, self.port):
                raise DemoFailed(f"{target} reconnected after revocation")
            note.append(
                f"dropped {latency * 1000:.0f} ms after the revocation was committed; reconnect: {retry.connack}"
            )
            self.run.facts["revocation_to_disconnect_ms"] = round(latency * 1000, 1)

    async def verify_audit(self) -> None:
        assert self.registry is not None
        async with self.step("audit log verifies") as note:
            if self.broker is not None:
                await self.broker.guard.audit.flush()
            report = await self.registry.verify_audit()
            if not report.ok:
                raise DemoFailed(f"audit chain broken at event {report.first_bad_id}: {report.problem}")
            note.append(f"{report.events} hash-chained events, head {report.head_hash[:16]}…")

    async def _event_time(self, kind: str, device_id: str) -> float:
        assert self.registry is not None
        for event in reversed(await self.registry.events(device_id=device_id)):
            if event.kind == kind:
                return datetime.fromisoformat(event.ts).timestamp()
        raise DemoFailed(f"no {kind} audit event for {device_id}")

    async def _wait_for_event(self, kind: str, device_id: str) -> int:
        assert self.registry is not None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for event in reversed(await self.registry.events(device_id=device_id)):
                if event.kind == kind:
                    return event.id
            await asyncio.sleep(0.05)
        raise DemoFailed(f"no {kind} audit event for {device_id}")

    async def close(self) -> None:
        for client in self.clients:
            await asyncio.to_thread(client.close)
        if self.broker is not None:
            await self.broker.shutdown()
        for board in self.boards:
            board.stop()
        if self.registry is not None:
            await self.registry.close()


async def run_demo(
    home: Home,
    *,
    devices: int = 3,
    on_step: Callable[[StepResult], None] = lambda _step: None,
    on_progress: Callable[[Progress], None] = lambda _progress: None,
    keep: asyncio.Event | None = None,
) -> DemoRun:
    """Run every step; stop at the first failure. With ``keep``, leave the broker up until it is set."""
    demo = Demo(home, devices, on_step, on_progress)
    try:
        await demo.initialise()
        await demo.start_devices()
        await demo.provision()
        for board in demo.boards:  # the boards keep their flash; the serial side is done
            board.stop()
        await demo.start_broker()
        watcher = await demo.telemetry()
        await demo.refuse_foreign_topic(watcher)
        await demo.revoke_live()
        await demo.verify_audit()
        if keep is not None:
            demo.run.facts["operator_credentials"] = str(home.root / "operator")
            await keep.wait()
    except DemoFailed:
        pass
    finally:
        await demo.close()
    return demo.run
