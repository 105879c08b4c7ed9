"""The demo's steps, each checking what it claims (see :mod:`iotauth.demo`)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotauth.authority import Authority, open_authority
from iotauth.bootstrap import initialise_home
from iotauth.broker.runtime import BrokerOptions
from iotauth.broker.server import Broker
from iotauth.config import Home
from iotauth.demo.home import issue_operator_identity, operator_folder, use_broker_port
from iotauth.errors import ConnectRefused, DemoFailed, IotAuthError
from iotauth.provisioning.line import LineRequest, run_line
from iotauth.provisioning.report import append_report
from iotauth.provisioning.results import Progress, ProvisionResult
from iotauth.provisioning.station import StationConfig
from iotauth.registry import EventKind, Registry, open_registry
from iotauth.testing import CredentialFiles, Emulator, MqttClient, free_port

if TYPE_CHECKING:
    from iotauth.rotation.service import RenewerService

TRUST_DOMAIN = "demo.iotauth.local"
WAIT = 15.0


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


# -- emulated devices and their MQTT clients (the test suite's own: iotauth.testing) ------------


@dataclass
class Board:
    """An emulated board, and how a device connects with what it stores after provisioning."""

    emulator: Emulator

    @classmethod
    def start(cls, state: Path, hardware_id: str) -> Board:
        args = ["--hardware-id", hardware_id, "--baud", "115200", "--keygen-ms", "100"]
        emulator = Emulator(state, args, quiet=True)
        emulator.start(timeout=WAIT)
        return cls(emulator)

    @property
    def port(self) -> str:
        return self.emulator.port

    def stop(self) -> None:
        self.emulator.stop(signal.SIGTERM, timeout=5)

    def client(self, device_id: str, broker_port: int) -> MqttClient:
        state = self.emulator.state
        files = CredentialFiles(device_id, state / "fullchain.pem", state / "key.pem", state / "ca.pem")
        return MqttClient(broker_port, files)


async def connect(client: MqttClient) -> bool:
    """True on CONNACK 0, False when the broker refuses; no answer at all fails the step."""
    try:
        await asyncio.to_thread(client.connect, WAIT)
    except ConnectRefused as exc:
        if exc.code is None:
            raise
        return False
    return True


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
        self.clients: list[MqttClient] = []
        self.registry: Registry | None = None
        self.authority: Authority | None = None
        self.broker: Broker | None = None
        self.renewer: RenewerService | None = None
        self.port = 0

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> Any:
        started = time.monotonic()
        holder: list[str] = []
        try:
            yield holder
        except (IotAuthError, OSError, AssertionError, queue.Empty) as exc:
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
            use_broker_port(self.home, self.port)
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

    def device_port(self, index: int) -> int:
        """Where device ``index`` connects (one broker here; a cluster spreads them over its nodes)."""
        return self.port

    def operator_port(self) -> int:
        return self.port

    async def operator_client(self) -> MqttClient:
        """An 'ingest' service identity for the operator side, issued like any device."""
        assert self.authority is not None
        assert self.registry is not None
        mark = await self.registry.last_event_id()
        client = MqttClient(self.operator_port(), await issue_operator_identity(self.authority, self.home))
        self.clients.append(client)
        await self.identity_ready(client.client_id, mark)
        return client

    async def identity_ready(self, device_id: str, after: int) -> None:
        """Wait until the broker knows an identity issued after event ``after`` (iotauth's broker asks the registry)."""

    async def telemetry(self) -> MqttClient:
        async with self.step("each device publishes telemetry with its own certificate") as note:
            watcher = await self.operator_client()
            if not await connect(watcher):
                raise DemoFailed(f"operator subscriber refused: {watcher.connack_reason}")
            await asyncio.to_thread(watcher.subscribe, "devices/+/telemetry/#", 1, WAIT)
            for index, (board, device_id) in enumerate(zip(self.boards, self.device_ids, strict=True)):
                client = board.client(device_id, self.device_port(index))
                self.clients.append(client)
                if not await connect(client):
                    raise DemoFailed(f"{device_id} refused: {client.connack_reason}")
                await asyncio.to_thread(client.publish, f"devices/{device_id}/telemetry/temperature", "21.5")
            expected = {f"devices/{d}/telemetry/temperature" for d in self.device_ids}
            if not await asyncio.to_thread(watcher.wait_for, lambda msgs: expected <= {m.topic for m in msgs}, WAIT):
                raise DemoFailed(f"operator saw only {sorted({m.topic for m in watcher.received})}")
            note.append(f"operator subscriber received {len(expected)} readings on devices/+/telemetry/#")
        return watcher

    async def refuse_foreign_topic(self, watcher: MqttClient) -> None:
        attacker, victim = self.device_ids[0], self.device_ids[1]
        async with self.step("a device publishing to another device's topic is refused") as note:
            client = self.clients[1]
            await asyncio.to_thread(client.publish, f"devices/{victim}/telemetry/temperature", "spoofed",
                                    self.foreign_publish_qos)
            sender = await self.sender_after_refusal(attacker, client)
            marker = f"devices/{attacker}/telemetry/marker"
            await asyncio.to_thread(sender.publish, marker, "after")
            if not await asyncio.to_thread(watcher.wait_for, lambda msgs: any(m.topic == marker for m in msgs), WAIT):
                raise DemoFailed("the marker message never arrived")
            if any(m.payload == b"spoofed" for m in watcher.received):
                raise DemoFailed(f"{attacker}'s message on {victim}'s topic was delivered")
            note.append(f"{attacker} -> devices/{victim}/...: not delivered; {await self.refusal_evidence(attacker)}")

    foreign_publish_qos = 1
    rotates = True
    """Whether the lifecycle includes the rotation step (renewal over MQTT through ``iotauth renewer``)."""

    async def sender_after_refusal(self, attacker: str, client: MqttClient) -> MqttClient:
        """Who sends the marker after the refused publish: iotauth's broker keeps the session open."""
        return client

    async def refusal_evidence(self, attacker: str) -> str:
        return f"audit event #{await self._wait_for_event(EventKind.BROKER_PUBLISH_DENIED, attacker)}"

    async def rotate(self) -> None:
        """An operator orders a renewal; the device's agent renews through the renewer; only the new one works."""
        from iotauth.demo import rotation

        assert self.authority is not None
        assert self.registry is not None
        target, board = self.device_ids[0], self.boards[0]
        async with self.step(f"the operator orders {target} to renew: it renews over MQTT, the old certificate is "
                             "refused") as note:
            _close(self.clients[1])  # its telemetry session: the agent connects with the same client id
            mark = await self.registry.last_event_id()
            await self.identity_ready(await rotation.renewer_identity(self.authority, self.home), mark)
            self.renewer = await rotation.start_renewer(self.authority, self.home, self.operator_port())
            state = board.emulator.state
            old = rotation.OldIdentity(target, state)
            try:
                mark = await self.registry.last_event_id()
                await rotation.order(self.home, target)
                serial = await rotation.run_agent(state)
                enforced = await self.supersession_enforced(target, mark)
                await self.reconnect(board, target)
                refusal = await self.refusal_of(old.files, self.device_port(0))
            finally:
                old.remove()
            trail = await rotation.trail(self.registry, target, mark, serial)
            note.append(f"'iotauth rotate', then 'python -m firmware_tools.agent renew' on its flash: new serial "
                        f"{serial[:12]}… connects; the old one: {refusal}{enforced}; {trail.describe()}")
            self.run.facts["rotation"] = {"device": target, "serial": serial, "old_certificate": refusal,
                                          "audit": [trail.issued, trail.activated, trail.superseded]}

    async def supersession_enforced(self, device_id: str, after: int) -> str:
        """Wait until the broker enforces a renewal's activation; what shows it (iotauth's broker: at once)."""
        return ""

    async def reconnect(self, board: Board, device_id: str) -> MqttClient:
        """Connect with what the board holds now, retrying for a while as a device would (a broker that reads a
        CRL may refuse a renewal for a moment after its activation, until its follower lets it in)."""
        deadline = time.monotonic() + WAIT
        while True:
            client = board.client(device_id, self.device_port(self.boards.index(board)))
            self.clients.append(client)
            try:
                if await connect(client):
                    return client
            except ConnectRefused:
                pass
            if time.monotonic() > deadline:
                raise DemoFailed(f"{device_id}'s new certificate was refused: {client.connack_reason}")
            await asyncio.sleep(0.2)

    async def refusal_of(self, files: CredentialFiles, port: int) -> str:
        """How the broker refuses these credentials; raise :class:`DemoFailed` if they get in."""
        client = MqttClient(port, files)
        self.clients.append(client)
        if await connect(client):
            raise DemoFailed(f"{files.device_id} connected with credentials that must be refused")
        return str(client.connack_reason)

    def revocation_step(self, target: str) -> str:
        return f"the operator revokes {target}: live session dropped, reconnect refused"

    async def revoke_live(self) -> None:
        target, client = self.device_ids[-1], self.clients[len(self.device_ids)]  # clients[0] is the operator
        async with self.step(self.revocation_step(target)) as note:
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
            try:
                await asyncio.to_thread(client.wait_disconnected, WAIT)
            except TimeoutError:
                raise DemoFailed(f"{target} is still connected {WAIT:.0f} s after revocation") from None
            committed = await self._event_time(EventKind.DEVICE_REVOKED, target)
            latency = (client.disconnected_wall or committed) - committed
            _close(client)
            evidence = await self.revocation_evidence(target)
            refusal = await self.reconnect_refusal(target)
            note.append(
                f"dropped {latency * 1000:.0f} ms after the revocation was committed{evidence}; reconnect: {refusal}"
            )
            self.run.facts["revocation_to_disconnect_ms"] = round(latency * 1000, 1)

    async def revocation_evidence(self, target: str) -> str:
        """What else shows the revocation took effect (the broker's own kick is in the audit log anyway)."""
        return ""

    async def reconnect_refusal(self, target: str) -> str:
        """How the revoked device's reconnect was refused; raise :class:`DemoFailed` if it got in."""
        state = self.boards[-1].emulator.state
        files = CredentialFiles(target, state / "fullchain.pem", state / "key.pem", state / "ca.pem")
        return await self.refusal_of(files, self.device_port(len(self.boards) - 1))

    async def verify_audit(self) -> None:
        assert self.registry is not None
        async with self.step("audit log verifies") as note:
            if self.broker is not None:
                await self.broker.guard.audit.flush()
            report = await self.registry.verify_audit()
            if not report.ok:
                raise DemoFailed(f"audit chain broken at event {report.first_bad_id}: {report.problem}")
            note.append(f"{report.events} hash-chained events, head {report.head_hash[:16]}…")

    async def _event_time(self, kind: EventKind, device_id: str) -> float:
        assert self.registry is not None
        for event in reversed(await self.registry.events(device_id=device_id)):
            if event.kind == kind:
                return datetime.fromisoformat(event.ts).timestamp()
        raise DemoFailed(f"no {kind} audit event for {device_id}")

    async def _wait_for_event(self, kind: EventKind, device_id: str) -> int:
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
            await asyncio.to_thread(_close, client)
        if self.renewer is not None:
            await self.renewer.close()
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
    return await run_steps(Demo(home, devices, on_step, on_progress), keep)


async def run_steps(demo: Demo, keep: asyncio.Event | None) -> DemoRun:
    """The lifecycle, in order, on whatever broker ``demo`` starts; closes everything it started."""
    try:
        await demo.initialise()
        await demo.start_devices()
        await demo.provision()
        for board in demo.boards:  # the boards keep their flash; the serial side is done
            board.stop()
        await demo.start_broker()
        watcher = await demo.telemetry()
        await demo.refuse_foreign_topic(watcher)
        if demo.rotates:
            await demo.rotate()
        await demo.revoke_live()
        await demo.verify_audit()
        if keep is not None:
            demo.run.facts["operator_credentials"] = str(operator_folder(demo.home))
            await keep.wait()
    except DemoFailed:
        pass
    finally:
        await demo.close()
    return demo.run


def _close(client: MqttClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
