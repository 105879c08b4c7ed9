"""Shared pieces of the broker benchmarks: homes and credentials, brokers as subprocesses, light TLS clients.

Every broker runs as a subprocess of the benchmark on loopback, and its CPU time and memory are read from
the kernel (psutil on its pid), so client-side work never counts.

:class:`LightDevice` is an MQTT 3.1.1 client over TLS done in memory BIOs. It costs a few KiB per connection,
so one benchmark process can hold 20,000 device sessions (asyncio's own TLS would allocate a 256 KiB read
buffer for each, as the broker used to).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from iotauth.authority import open_authority
from iotauth.bootstrap import initialise_home
from iotauth.broker.mqtt import Connect, encode_connect
from iotauth.config import Home
from iotauth.pki.keys import generate_private_key, private_key_pem
from iotauth.registry import Registry, open_registry

HOST = "127.0.0.1"
DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"
AMQTT_SERVER = """
import asyncio, sys, logging
logging.basicConfig(level=logging.ERROR)
from amqtt.broker import Broker
port, cert, key, ca = sys.argv[1:5]
async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True,
                                  "certfile": cert, "keyfile": key, "cafile": ca}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await broker.shutdown()
asyncio.run(main())
"""


# -- homes and credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class Creds:
    device_id: str
    cert: Path
    key: Path


async def make_home(root: Path, devices: list[tuple[str, str]],
                    extra_config: str = "") -> tuple[Home, dict[str, Creds]]:
    home = Home(root / "home")
    await initialise_home(home, "bench.test", ["localhost", HOST], passphrase=None, actor="bench")
    if extra_config:
        home.config_file.write_text(home.config_file.read_text() + extra_config)
    async with await open_registry(home.registry_db) as registry:
        creds = await issue_creds(home, registry, devices, root)
    return home, creds


async def issue_creds(home: Home, registry: Registry, devices: list[tuple[str, str]],
                      directory: Path) -> dict[str, Creds]:
    """Issue each (device id, profile) from a fresh key and write its PEM certificate and key into ``directory``.

    Issued concurrently in chunks, so the registry group-commits them (20,000 devices take seconds, not minutes).
    """
    authority = await open_authority(home, registry)
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - set-up, not measured

    async def one(device_id: str, profile: str) -> tuple[str, Creds]:
        key = generate_private_key("p256")
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        issued = await authority.issue(csr, device_id, profile, actor="bench")
        cert_path, key_path = directory / f"{device_id}.crt", directory / f"{device_id}.key"
        cert_path.write_bytes(issued.pem)
        key_path.write_bytes(private_key_pem(key, None))
        return device_id, Creds(device_id, cert_path, key_path)

    creds: dict[str, Creds] = {}
    for start in range(0, len(devices), 500):
        creds.update(await asyncio.gather(*(one(d, p) for d, p in devices[start:start + 500])))
    return creds


def client_context(home: Home, creds: Creds | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(home.chain_file))
    if creds is not None:
        context.load_cert_chain(creds.cert, creds.key)
    return context


# -- brokers -------------------------------------------------------------------------------


class BrokerUnderTest:
    def __init__(self, name: str, command: list[str], ready: str, env: dict[str, str] | None = None,
                 port: int = 0) -> None:
        self.name = name
        self.port = port
        self.metrics_port: int | None = None
        self.command, self.ready, self.env = command, ready, env
        self.process = self._spawn()
        self.ps = psutil.Process(self.process.pid)

    def _spawn(self) -> subprocess.Popen[str]:
        process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=self.env)
        if self.ready:
            line = process.stdout.readline() if process.stdout else ""
            if not line:
                raise RuntimeError(f"{self.name} did not start")
            if self.ready == "json":
                listening = json.loads(line)["listening"]
                self.port = int(listening["mqtts"].rsplit(":", 1)[1])
                if "metrics" in listening:
                    self.metrics_port = int(listening["metrics"].rsplit(":", 1)[1])
        else:
            wait_listening(self.port)
        return process

    def restart(self) -> None:
        """Start the same command again (after a kill); keeps the port when it was given."""
        self.process = self._spawn()
        self.ps = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.name == "amqtt" and self.process.stdin:
                self.process.stdin.write("\n")
                self.process.stdin.flush()
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_amqtt(home: Home) -> BrokerUnderTest:
    port = free_port()
    return BrokerUnderTest("amqtt", [sys.executable, "-c", AMQTT_SERVER, str(port), str(home.server_cert),
                                     str(home.server_key), str(home.chain_file)], "ready", port=port)


def start_iotauth(home: Home, *extra: str, name: str = "iotauth", port: int = 0) -> BrokerUnderTest:
    executable = Path(sys.executable).parent / "iotauth"
    env = {**os.environ, "IOTAUTH_HOME": str(home.root)}
    env.pop("IOTAUTH_REGISTRY", None)
    command = [str(executable if executable.exists() else "iotauth"), "broker", "--bind", f"{HOST}:{port}", "--json",
               *extra]
    return BrokerUnderTest(name, command, "json", env=env)


def start_mosquitto(home: Home, directory: Path) -> BrokerUnderTest | None:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        return None
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} {HOST}\n"
        f"cafile {home.chain_file}\ncertfile {home.server_cert}\nkeyfile {home.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        "allow_anonymous false\npersistence false\nlog_type error\nlog_dest stderr\nmax_connections -1\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    return BrokerUnderTest("mosquitto", [binary, "-c", str(config)], "", port=port)


def raise_file_limit(wanted: int = 65_536) -> None:
    """Open-files limit for thousands of sessions (inherited by the brokers this process starts).

    Root may raise the hard limit too; anyone else gets the hard limit as it is.
    """
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    target = max(hard, wanted) if os.geteuid() == 0 else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- a light TLS device ----------------------------------------------------------------------


class LightDevice(asyncio.Protocol):
    """One device session: TLS in memory BIOs, CONNECT after the handshake, then whatever the benchmark does.

    ``connack`` resolves to the CONNACK return code (-1 if the connection ended first); ``lost`` resolves
    when the connection is gone. Incoming PUBLISHes are counted and answered at QoS 1 (PUBACK).
    """

    def __init__(self, context: ssl.SSLContext, client_id: str, keep_alive: int = 60, clean: bool = True) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")
        self.client_id = client_id
        self._connect = encode_connect(Connect(client_id, clean, keep_alive))
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[float] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.received = 0
        self.pinged_at = time.monotonic()  # (the benchmarks' keep-alive pings)
        self.on_publish: Callable[[bytes], None] | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self.handshaken:
            self._step()
            if not self.handshaken:
                return
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            except ssl.SSLError:
                self.close()
                return
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()
        if chunks:
            self._packets(b"".join(chunks))

    def _step(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError):
            self._flush()
            self.close()
            return
        self.handshaken = True
        self.write(self._connect)

    def _packets(self, data: bytes) -> None:
        buffer = self._buffer + data
        at = 0
        while len(buffer) - at >= 2:
            length, multiplier, index = 0, 1, at + 1
            while True:
                if index >= len(buffer):
                    self._buffer = buffer[at:]
                    return
                byte = buffer[index]
                length += (byte & 0x7F) * multiplier
                index += 1
                if not byte & 0x80:
                    break
                multiplier *= 128
            if index + length > len(buffer):
                break
            kind, flags, body = buffer[at] >> 4, buffer[at] & 0x0F, buffer[index:index + length]
            at = index + length
            if kind == 2 and not self.connack.done():
                self.connack.set_result(body[1])
            elif kind == 3:
                self.received += 1
                if (flags >> 1) & 3:
                    size = struct.unpack("!H", body[:2])[0]
                    self.write(b"\x40\x02" + body[2 + size:4 + size])
                if self.on_publish is not None:
                    self.on_publish(body)
        self._buffer = buffer[at:]

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError:
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._outgoing.read())

    def publish(self, topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> None:
        encoded = topic.encode()
        body = struct.pack("!H", len(encoded)) + encoded + (struct.pack("!H", packet_id) if qos else b"") + payload
        length = len(body)
        header = bytearray([0x30 | (qos << 1)])
        while True:
            byte, length = length % 128, length // 128
            header.append(byte | (0x80 if length else 0))
            if not length:
                break
        self.write(bytes(header) + body)

    def subscribe(self, topic_filter: str, qos: int, packet_id: int = 1) -> None:
        encoded = topic_filter.encode()
        body = struct.pack("!HH", packet_id, len(encoded)) + encoded + bytes([qos])
        self.write(bytes([0x82, len(body)]) + body)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_result(-1)
        if not self.lost.done():
            self.lost.set_result(time.monotonic())


async def open_device(port: int, context: ssl.SSLContext, client_id: str, *, source: str | None = None,
                      keep_alive: int = 60, timeout: float = 30.0) -> tuple[LightDevice, int]:  # noqa: ASYNC109
    """Connect one device; returns it with its CONNACK code (-1: closed before CONNACK or refused at TCP)."""
    loop = asyncio.get_running_loop()
    try:
        _, device = await asyncio.wait_for(loop.create_connection(
            lambda: LightDevice(context, client_id, keep_alive), HOST, port,
            local_addr=(source, 0) if source else None), timeout)
    except (OSError, TimeoutError):
        return LightDevice(context, client_id), -1
    try:
        code = await asyncio.wait_for(device.connack, timeout)
    except TimeoutError:
        device.close()
        code = -1
    return device, code


async def connect_all(port: int, home: Home, creds: list[Creds], concurrency: int,
                      source: Any = None, devices: list[LightDevice] | None = None) -> list[LightDevice]:
    """Connect every device (``concurrency`` at a time) into ``devices``; raise if any is refused."""
    semaphore = asyncio.Semaphore(concurrency)
    devices = [] if devices is None else devices

    async def one(index: int, c: Creds) -> None:
        async with semaphore:
            address = source(index) if callable(source) else source
            device, code = await open_device(port, client_context(home, c), c.device_id, source=address)
            if code != 0:
                raise RuntimeError(f"{c.device_id} refused ({code})")
            devices.append(device)

    await asyncio.gather(*(one(i, c) for i, c in enumerate(creds)))
    return devices


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


def machine() -> str:
    import platform

    return (f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
            f"{ssl.OPENSSL_VERSION}")


async def settle(seconds: float = 0.5) -> None:
    await asyncio.sleep(seconds)

