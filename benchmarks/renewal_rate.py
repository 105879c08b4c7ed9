"""Certificate renewals over MQTT, end to end through ``iotauth broker`` with a running ``iotauth renewer``.

Prints one JSON document. Broker and renewer are subprocesses (their CPU is read from the kernel); the
devices are light TLS MQTT clients in this process (:class:`harness.LightDevice`), each with its own
certificate, speaking PROTOCOL.md part 2 with :mod:`iotauth.rotation.messages`.

* ``renewal_rate``: ``--devices`` devices connected and subscribed to their response topic; each renews once,
  all at the same moment: a request (a CSR for a new key, signed by the current key), ``issued``, a
  confirmation signed by the new key, ``activated``. Renewals/s = devices / (first request -> last
  ``activated``). New keys and CSRs are made before the clock starts (a device makes its key at its own
  pace); request and confirmation signatures are made inside it. Also: the CPU the broker and the renewer
  spent per renewal, latency percentiles, the old sessions the broker closed (every activation supersedes a
  certificate), and then the reconnect of every device with its new certificate, as connects/s.
* ``fleet_rotation``: ``--fleet`` devices connected with the window closed (``renew_after = 0.66``);
  ``iotauth rotate --profile fleet --wait --json`` is run as an operator would, and every device renews when
  its order arrives. Reported: the time from the command's start to its exit (every renewal activated), and
  when the orders reached the devices.

Usage: python benchmarks/renewal_rate.py [--devices 2000] [--fleet 10000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from harness import (
    BrokerUnderTest,
    Creds,
    LightDevice,
    connect_all,
    machine,
    make_home,
    percentile,
    raise_file_limit,
    settle,
    start_iotauth,
)

from iotauth.config import Home
from iotauth.pki.keys import generate_private_key, load_private_key, private_key_pem
from iotauth.rotation import messages

FLEET = """
[profiles.fleet]
validity_days = 365
renew_after = {renew_after}
publish = ["devices/{{device_id}}/rotation/request"]
subscribe = ["devices/{{device_id}}/rotation/response", "devices/{{device_id}}/commands/#"]
"""


@dataclass
class Renewing:
    """One device's side of a renewal over its light session."""

    creds: Creds
    device: LightDevice
    key: Any
    cert: x509.Certificate
    new_key: Any = None
    csr: bytes = b""
    request_id: str = ""
    confirm_id: str = ""
    serial: str = ""
    new_pem: bytes = b""
    started: float = 0.0
    issued_at: float = 0.0
    done: asyncio.Future[float] | None = None
    ordered: asyncio.Future[float] | None = None
    refusals: list[str] = field(default_factory=list)

    def prepare(self) -> None:
        self.new_key = generate_private_key("p256")
        self.csr = messages.make_csr(self.new_key, self.creds.device_id)

    def request(self) -> None:
        self.started = time.monotonic()
        renew = messages.make_renew(self.key, self.cert, self.csr, self.creds.device_id)
        self.request_id = messages.b64(renew.request_id)
        self.device.publish(messages.request_topic(self.creds.device_id), renew.encode(), qos=1, packet_id=1)

    def on_publish(self, body: bytes) -> None:
        size = int.from_bytes(body[:2], "big")
        topic, payload = body[2:2 + size].decode(), body[2 + size:]  # subscribed at QoS 0: no packet id
        if topic.endswith("/commands/rotate"):
            if payload and self.ordered is not None and not self.ordered.done():
                self.ordered.set_result(time.monotonic())
                self.request()
            return
        answer = messages.decode_response(payload)
        if answer.status is messages.Status.ISSUED and answer.request_id == self.request_id:
            self.issued_at = time.monotonic()
            self.serial = answer.serial or ""
            self.new_pem = (answer.chain or "").encode()
            confirm = messages.make_confirm(self.new_key, self.creds.device_id, self.serial)
            self.confirm_id = messages.b64(confirm.request_id)
            self.device.publish(messages.request_topic(self.creds.device_id), confirm.encode(), qos=1, packet_id=2)
        elif answer.status is messages.Status.ACTIVATED and answer.request_id == self.confirm_id:
            if self.done is not None and not self.done.done():
                self.done.set_result(time.monotonic())
        elif answer.status is messages.Status.REFUSED:
            self.refusals.append(str(answer.error))
            if self.done is not None and not self.done.done():
                self.done.set_exception(RuntimeError(f"{self.creds.device_id}: {answer.error}: {answer.reason}"))


def start_renewer(home: Home, port: int) -> BrokerUnderTest:
    executable = Path(sys.executable).parent / "iotauth"
    env = {**os.environ, "IOTAUTH_HOME": str(home.root)}
    env.pop("IOTAUTH_REGISTRY", None)
    command = [str(executable if executable.exists() else "iotauth"), "renewer", "--broker", f"127.0.0.1:{port}",
               "--json"]
    return BrokerUnderTest("renewer", command, "line", env=env)


async def fleet_sessions(home: Home, creds: dict[str, Creds], port: int, concurrency: int,
                         extra_filter: str | None = None) -> list[Renewing]:
    ordered = list(creds.values())
    devices = await connect_all(port, home, ordered, concurrency)
    by_id = {d.client_id: d for d in devices}
    sessions = []
    for c in ordered:
        key = load_private_key(c.key.read_bytes(), None, "device key")
        session = Renewing(c, by_id[c.device_id], key, x509.load_pem_x509_certificate(c.cert.read_bytes()))
        session.device.on_publish = session.on_publish
        session.device.subscribe(messages.response_topic(c.device_id), 0)
        if extra_filter is not None:
            session.device.subscribe(extra_filter.format(device_id=c.device_id), 0, packet_id=2)
        sessions.append(session)
    return sessions


async def renewal_rate(root: Path, count: int, concurrency: int) -> dict[str, Any]:
    home, creds = await make_home(root, [(f"dev-{n:05d}", "fleet") for n in range(count)],
                                  FLEET.format(renew_after=0))
    broker = start_iotauth(home)
    renewer = start_renewer(home, broker.port)
    try:
        sessions = await fleet_sessions(home, creds, broker.port, concurrency)
        await settle(1.0)
        for session in sessions:
            session.prepare()
        loop = asyncio.get_running_loop()
        for session in sessions:
            session.done = loop.create_future()
        broker_cpu, renewer_cpu = broker.cpu(), renewer.cpu()
        started = time.monotonic()
        for session in sessions:
            session.request()
        finished = await all_done(sessions, 600)
        elapsed = max(finished) - started
        broker_used, renewer_used = broker.cpu() - broker_cpu, renewer.cpu() - renewer_cpu
        kicked = 0
        for session in sessions:
            try:
                await asyncio.wait_for(asyncio.shield(session.device.lost), 10)
                kicked += 1
            except TimeoutError:
                pass
        reconnect = await reconnect_all(home, sessions, broker.port, concurrency)
        latencies = [(s.done.result() if s.done else 0) - s.started for s in sessions]
        return {
            "devices": count,
            "seconds": round(elapsed, 2),
            "renewals_per_second": round(count / elapsed, 1),
            "latency_ms": {"p50": round(percentile(latencies, 0.5) * 1000, 1),
                           "p99": round(percentile(latencies, 0.99) * 1000, 1)},
            "issued_after_ms_p50": round(percentile([s.issued_at - s.started for s in sessions], 0.5) * 1000, 1),
            "cpu_ms_per_renewal": {"broker": round(broker_used / count * 1000, 2),
                                   "renewer": round(renewer_used / count * 1000, 2)},
            "old_sessions_closed_by_the_broker": kicked,
            "reconnect_with_new_certificate": reconnect,
        }
    finally:
        renewer.stop()
        broker.stop()


async def all_done(sessions: list[Renewing], timeout: float) -> list[float]:  # noqa: ASYNC109
    """When each device's renewal was activated; a clear error naming what is missing otherwise."""
    futures = [s.done for s in sessions if s.done is not None]
    await asyncio.wait(futures, timeout=timeout)
    missing = [s for s in sessions if s.done is None or not s.done.done()]
    failed = [s for s in sessions if s.done is not None and s.done.done() and s.done.exception() is not None]
    if missing or failed:
        issued = sum(1 for s in missing if s.serial)
        raise RuntimeError(f"{len(missing)} renewals unfinished ({issued} of them issued), {len(failed)} refused: "
                           f"{sorted({r for s in sessions for r in s.refusals})}")
    return [f.result() for f in futures]


async def reconnect_all(home: Home, sessions: list[Renewing], port: int, concurrency: int) -> dict[str, Any]:
    """Every device connects again with its new key and certificate (what the agent's switch does)."""
    directory = home.root.parent / "renewed"
    directory.mkdir(exist_ok=True)
    renewed = []
    for s in sessions:
        cert_path, key_path = directory / f"{s.creds.device_id}.crt", directory / f"{s.creds.device_id}.key"
        cert_path.write_bytes(s.new_pem)
        key_path.write_bytes(private_key_pem(s.new_key, None))
        renewed.append(Creds(s.creds.device_id, cert_path, key_path))
    started = time.monotonic()
    devices = await connect_all(port, home, renewed, concurrency)
    elapsed = time.monotonic() - started
    for device in devices:
        device.close()
    return {"connected": len(devices), "seconds": round(elapsed, 2), "connects_per_second": round(len(devices) /
                                                                                                   elapsed, 1)}


async def fleet_rotation(root: Path, count: int, concurrency: int) -> dict[str, Any]:
    home, creds = await make_home(root, [(f"fleet-{n:05d}", "fleet") for n in range(count)],
                                  FLEET.format(renew_after=0.66))
    broker = start_iotauth(home)
    renewer = start_renewer(home, broker.port)
    try:
        sessions = await fleet_sessions(home, creds, broker.port, concurrency, "devices/{device_id}/commands/rotate")
        await settle(2.0)
        loop = asyncio.get_running_loop()
        for session in sessions:
            session.prepare()
            session.done = loop.create_future()
            session.ordered = loop.create_future()
        env = {**os.environ, "IOTAUTH_HOME": str(home.root)}
        env.pop("IOTAUTH_REGISTRY", None)
        executable = Path(sys.executable).parent / "iotauth"
        started = time.monotonic()
        command = await asyncio.create_subprocess_exec(
            str(executable), "rotate", "--profile", "fleet", "--wait", "--timeout", "1800", "--json", env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = await command.communicate()
        elapsed = time.monotonic() - started
        report = json.loads(out)
        ordered = [s.ordered.result() - started for s in sessions if s.ordered and s.ordered.done()]
        refusals = sorted({r for s in sessions for r in s.refusals})
        return {
            "devices": count,
            "rotate_exit_code": command.returncode,
            "renewed": report.get("renewed"),
            "seconds_to_rotate_all": round(elapsed, 1),
            "renewals_per_second": round(count / elapsed, 1),
            "orders_received_s": {"first": round(min(ordered), 2) if ordered else None,
                                  "last": round(max(ordered), 2) if ordered else None},
            "refusals": refusals,
        }
    finally:
        renewer.stop()
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--fleet", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=200, help="devices connecting at a time")
    parser.add_argument("--quick", action="store_true", help="200 devices and a fleet of 500")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.fleet = 200, 500
    raise_file_limit()
    root = Path(tempfile.mkdtemp(prefix="iotauth-renewal-"))
    try:
        result: dict[str, Any] = {"machine": machine(), "cpus": psutil.cpu_count()}
        result["renewal_rate"] = await renewal_rate(root / "rate", args.devices, args.concurrency)
        if args.fleet:
            result["fleet_rotation"] = await fleet_rotation(root / "fleet", args.fleet, args.concurrency)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
