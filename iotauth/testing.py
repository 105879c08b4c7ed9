"""Real parts for exercising iotauth end to end: emulated boards on pseudo-terminals and MQTT clients.

``iotauth demo`` and the test suite's fixtures both drive iotauth the way a
factory and a fleet would -- boards on serial ports, devices connecting with
their certificates -- so the pieces they share live here, once:

* :class:`Emulator` -- ``python -m firmware_tools.emulator --pty`` as a real
  process, restartable on the same flash (a power cycle);
* :class:`MqttClient` -- a paho-mqtt 3.1.1 client over TLS with blocking
  helpers (paho runs its network loop in a thread);
* :func:`free_port` -- an ephemeral TCP port on loopback;
* :class:`MosquittoRunner` -- a real ``mosquitto`` on a configuration, optionally
  restarted whenever it exits (as systemd's ``Restart=always`` would);
* :class:`FollowerRunner` -- ``iotauth mosquitto follow DIR --json`` as a process.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotauth.errors import ConnectRefused, ProvisioningError

TIMEOUT = 15.0
# paho reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; these clients speak 3.1.1.
V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


def end_process(process: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, up to ``grace`` seconds for a clean exit, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- emulated boards ---------------------------------------------------------------------------


@dataclass
class Emulator:
    """One device emulator process and its flash directory.

    Attributes:
        state: the flash directory (it survives restarts, like a board's flash).
        args: emulator options for every start (``--hardware-id``, ``--no-keygen``...).
        quiet: discard the emulator's log instead of keeping it in a pipe.
        cwd: where to start it (a checkout that is not installed).
    """

    state: Path
    args: list[str]
    quiet: bool = False
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    port: str = ""
    history: list[int] = field(default_factory=list)

    def start(self, *extra: str, timeout: float = 30.0) -> str:
        """(Re)start the emulator on the same flash; returns the new pty path (its first line on stdout)."""
        self.stop()
        command = [sys.executable, "-m", "firmware_tools.emulator", "--pty", "--state", str(self.state),
                   *self.args, *extra]
        self.process = subprocess.Popen(  # noqa: S603 - this interpreter, fixed module, our own arguments
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if self.quiet else subprocess.PIPE,
            cwd=self.cwd,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("/dev/"):
            self.stop()
            raise ProvisioningError(f"emulator did not report a pty (got {line!r})")
        self.port = line
        return line

    def stop(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Stop the process (SIGKILL by default: a power cut); its flash stays."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.history.append(self.process.returncode)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


# -- MQTT clients ------------------------------------------------------------------------------


class Credentials(Protocol):
    """A device's TLS material as files (and the device id it connects as)."""

    @property
    def device_id(self) -> str: ...

    @property
    def cert(self) -> Path: ...

    @property
    def key(self) -> Path: ...

    @property
    def ca(self) -> Path: ...


@dataclass(frozen=True)
class CredentialFiles:
    device_id: str
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttClient:
    """A paho-mqtt 3.1.1 client over TLS with blocking helpers (paho's network loop runs in a thread)."""

    def __init__(self, port: int, creds: Credentials | None, *, client_id: str | None = None,
                 clean_session: bool = True, ca: Path | None = None, host: str = "127.0.0.1",
                 will: tuple[str, bytes] | None = None,
                 transport: Literal["tcp", "websockets", "unix"] = "tcp") -> None:
        self.client_id = client_id if client_id is not None else (creds.device_id if creds else "anonymous")
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=paho.MQTTv311, clean_session=clean_session, transport=transport)
        ca_file = ca or (creds.ca if creds else None)
        self.client.tls_set(ca_certs=str(ca_file) if ca_file else None,
                            certfile=str(creds.cert) if creds else None, keyfile=str(creds.key) if creds else None)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.host, self.port = host, port
        self.messages: queue.Queue[Message] = queue.Queue()
        self.received: list[Message] = []
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.connack_reason: Any = None
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.acks: queue.Queue[int] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.disconnected_wall: float | None = None
        self.session_present = False
        self._arrived = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        code = reason.value if hasattr(reason, "value") else int(reason)
        self.connack_reason = reason
        self.connack.put((V5_TO_V311.get(code, code), bool(flags.session_present)))

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        received = Message(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        self.messages.put(received)
        with self._arrived:
            self.received.append(received)
            self._arrived.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
        self.subacks.put([r.value for r in reasons])

    def _on_publish(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self.acks.put(mid)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        if self.disconnected_at is None:
            self.disconnected_at, self.disconnected_wall = time.monotonic(), time.time()
        self.disconnected.set()

    def connect(self, timeout: float = TIMEOUT) -> MqttClient:
        """Connect and wait for CONNACK 0; raise :class:`~iotauth.errors.ConnectRefused` otherwise."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ConnectRefused(None, f"{type(exc).__name__}: {exc}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                code, self.session_present = self.connack.get(timeout=0.05)
            except queue.Empty:
                if self.disconnected.is_set():
                    self.close()
                    raise ConnectRefused(None, "connection closed before CONNACK") from None
                continue
            if code != 0:
                self.close()
                raise ConnectRefused(code, "CONNACK refused")
            return self
        self.close()
        raise ConnectRefused(None, "no CONNACK in time")

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = TIMEOUT) -> list[int]:
        self.client.subscribe(topic_filter, qos)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes | str = b"x", qos: int = 1, retain: bool = False,
                timeout: float = TIMEOUT) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout)

    def receive(self, timeout: float = TIMEOUT) -> Message:
        return self.messages.get(timeout=timeout)

    def receive_all(self, quiet: float = 0.5) -> list[Message]:
        """Everything that arrives until nothing has come for ``quiet`` seconds."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def wait_for(self, predicate: Callable[[Sequence[Message]], bool], timeout: float = TIMEOUT) -> bool:
        """Wait until ``predicate`` holds for everything received so far."""
        with self._arrived:
            return self._arrived.wait_for(lambda: predicate(self.received), timeout)

    def is_connected(self) -> bool:
        return bool(self.client.is_connected()) and not self.disconnected.is_set()

    def wait_disconnected(self, timeout: float = TIMEOUT) -> float:
        """Wait until the broker drops the connection; return when (monotonic)."""
        if not self.disconnected.wait(timeout):
            raise TimeoutError(f"{self.client_id} was not disconnected within {timeout:g} s")
        assert self.disconnected_at is not None
        return self.disconnected_at

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- Mosquitto and its follower ------------------------------------------------------------


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    return found or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def wait_listening(port: int, timeout: float = TIMEOUT, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class MosquittoRunner:
    """``mosquitto -c CONFIG`` as a subprocess; ``supervise`` restarts it whenever it exits."""

    def __init__(self, config: Path, ports: Sequence[int], log: Path, *, supervise: bool = False) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.command = [binary, "-c", str(config)]
        self.ports = list(ports)
        self.log = log
        self.supervise = supervise
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lock = threading.Lock()
        self._closing = False
        self._watcher: threading.Thread | None = None

    def start(self, timeout: float = TIMEOUT) -> MosquittoRunner:
        with self._lock:
            self._spawn()
        if self.supervise and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        self.wait_up(timeout)
        return self

    def _spawn(self) -> None:
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)  # noqa: S603
        self.starts += 1

    def _watch(self) -> None:
        while not self._closing:
            process = self.process
            if process is not None and process.poll() is not None and self.supervise:
                time.sleep(0.1)
                with self._lock:
                    if not self._closing and self.process is process:
                        self._spawn()
            time.sleep(0.05)

    def wait_up(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            if not wait_listening(port, max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"mosquitto is not listening on {port}:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL (no clean shutdown); a supervised Mosquitto comes back."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self._closing = True
        with self._lock:
            process = self.process
        if process is not None:
            end_process(process)
        if self._watcher is not None:
            self._watcher.join(5)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class FollowerRunner:
    """``iotauth mosquitto follow DIR --json`` as a process; ``status`` is its one line once in step."""

    def __init__(self, home: Path, directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home, self.directory, self.args = home, directory, args
        self.command = [sys.executable, "-m", "iotauth.cli.main", "--home", str(home), "mosquitto", "follow",
                        str(directory), "--json", "-v", *args]
        self.env = {k: v for k, v in os.environ.items() if k != "IOTAUTH_REGISTRY"}
        self.env.update(env or {})
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self.status: dict[str, Any] = {}

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        import json

        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                                        text=True, env=self.env)
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("the follower did not get in step:\n" + self.output())
        self.status = json.loads(line)
        return self.status

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.log[-60:])

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def again(self) -> FollowerRunner:
        """A new runner with the same arguments (after :meth:`kill` or :meth:`stop`)."""
        return FollowerRunner(self.home, self.directory, *self.args, env=self.env)

    def stop(self) -> int:
        if self.process is None:
            return 0
        return end_process(self.process, 20)
