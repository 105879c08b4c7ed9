"""Certificate renewals over MQTT, end to end through ``iotauth broker`` with a running ``iotauth renewer``.

Prints one JSON document. Broker and renewer are subprocesses (their CPU is read from the kernel); the
devices are light TLS MQTT clients in this process (:class:`harness.LightDevice`), each with its own
certificate, speaking PROTOCOL.md part 2 with :mod:`iotauth.rotation.messages`.

* ``renewal_rate``: ``--devices`` devices connected and subscribed to their response topic; each renews once,
  all at the same moment: a request (a CSR for a new key, signed by the current key), ``issued``, a
  confirmation signed by the new key, then ``activated``. Renewals/s = devices / (first request -> last
  renewal finished). A renewal is finished at its ``activated`` answer or, as often, when the broker closes
  the device's old session first (the activation revoked that certificate: the reference agent then connects
  with the new one); after the run the registry must show every new certificate active and every old one
  revoked as superseded, and every device reconnects with its new certificate (connects/s). New keys and CSRs
  are made before the clock starts (a device makes its key at its own pace); request and confirmation
  signatures are made inside it. Also: CPU per renewal of the broker, the renewer and the simulated devices
  (this process), how busy the renewer was, latency percentiles.
* ``issuance_alone``: ``Authority.issue`` from CSRs (sign, then the durable group-committed record) in this
  process, same CA, profile and count, interleaved with the renewal rounds (``--rounds``, the median is
  reported) so that a neighbour's load falls on both alike: ``ratio_renewals_to_issuance``.
* ``fleet_rotation``: ``--fleet`` devices connected with the window closed (``renew_after = 0.66``);
  ``iotauth rotate --profile fleet --wait --json`` is run as an operator would, the renewer publishes each
  device's order on ``devices/<id>/commands/rotate``, and every device renews when its order arrives.
  Reported: the time from the command's start to its exit (every renewal activated, as the audit log says),
  when the orders reached the devices, CPU per renewal, and the registry check above.

The machine's load average is recorded at the start and the end: on a shared machine the figures move with it.

Usage: python benchmarks/renewal_rate.py [--devices 2000] [--fleet 10000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes
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

from iotauth.authority import open_authority
from iotauth.config import Home
from iotauth.pki.keys import generate_private_key, load_private_key, private_key_pem
from iotauth.registry import CertificateStatus, RevocationReason, open_registry
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
    confirmed_at: float = 0.0
    finished_by: str = ""
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
            self.confirmed_at = time.monotonic()
            self.device.publish(messages.request_topic(self.creds.device_id), confirm.encode(), qos=1, packet_id=2)
        elif answer.status is messages.Status.ACTIVATED and answer.request_id == self.confirm_id:
            self.finish("answer")
        elif answer.status is messages.Status.REFUSED:
            self.refusals.append(str(answer.error))
            if self.done is not None and not self.done.done():
                self.done.set_exception(RuntimeError(f"{self.creds.device_id}: {answer.error}: {answer.reason}"))

    def finish(self, how: str) -> None:
        if self.done is not None and not self.done.done():
            self.finished_by = how
            self.done.set_result(time.monotonic())

    def on_lost(self, _lost: asyncio.Future[float]) -> None:
        """The broker closed the old session after the confirmation: what it does when the activation revoked the
        old certificate (superseded), often before the ``activated`` answer is delivered. The agent then connects
        with the new certificate; here the registry is checked after the run (:func:`check_registry`)."""
        if self.confirmed_at:
            self.finish("old-session-closed")


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
        session.device.lost.add_done_callback(session.on_lost)
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
        broker_cpu, renewer_cpu, own_cpu = broker.cpu(), renewer.cpu(), own()
        started = time.monotonic()
        for session in sessions:
            session.request()
        finished = await all_done(sessions, 600)
        elapsed = max(finished) - started
        broker_used, renewer_used, own_used = broker.cpu() - broker_cpu, renewer.cpu() - renewer_cpu, own() - own_cpu
        await asyncio.wait([s.device.lost for s in sessions], timeout=10)
        kicked = sum(1 for s in sessions if s.device.lost.done())
        registry_check = await check_registry(home, sessions)
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
                                   "renewer": round(renewer_used / count * 1000, 2),
                                   "simulated_devices": round(own_used / count * 1000, 2)},
            "renewer_cpu_busy": round(renewer_used / elapsed, 2),
            "finished_by": dict(Counter(s.finished_by for s in sessions)),
            "old_sessions_closed_by_the_broker": kicked,
            "registry": registry_check,
            "reconnect_with_new_certificate": reconnect,
        }
    finally:
        renewer.stop()
        broker.stop()


def own() -> float:
    """This process's CPU seconds (the simulated devices' side)."""
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


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


async def check_registry(home: Home, sessions: list[Renewing]) -> dict[str, int]:
    """Read the registry after the run: each device's new certificate active (a renewal of the old one), the old
    one revoked as superseded. Raises if any device is otherwise: a benchmark of renewals that did not happen
    would measure nothing."""
    async with await open_registry(home.registry_db) as registry:
        wrong = []
        for s in sessions:
            certificates = {c.serial: c for c in await registry.certificates_of(s.creds.device_id)}
            new, old = certificates.get(s.serial), certificates.get(format(s.cert.serial_number, "x"))
            renewed = (new is not None and old is not None and new.status is CertificateStatus.ACTIVE
                       and new.renewal_of == old.serial and old.status is CertificateStatus.REVOKED
                       and old.revocation_reason is RevocationReason.SUPERSEDED)
            if not renewed:
                wrong.append(s.creds.device_id)
    if wrong:
        raise RuntimeError(f"{len(wrong)} devices are not renewed in the registry: {wrong[:5]}")
    return {"new_certificate_active": len(sessions), "old_certificate_superseded": len(sessions)}


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
        broker_cpu, renewer_cpu = broker.cpu(), renewer.cpu()
        started = time.monotonic()
        command = await asyncio.create_subprocess_exec(
            str(executable), "rotate", "--profile", "fleet", "--wait", "--timeout", "1800", "--json", env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out, _ = await command.communicate()
        elapsed = time.monotonic() - started
        broker_used, renewer_used = broker.cpu() - broker_cpu, renewer.cpu() - renewer_cpu
        report = json.loads(out)
        if command.returncode != 0:
            raise RuntimeError(f"iotauth rotate --wait exited {command.returncode}: {report}")
        await all_done(sessions, 60)  # the devices' side of what the registry already says
        ordered = [s.ordered.result() - started for s in sessions if s.ordered and s.ordered.done()]
        return {
            "devices": count,
            "rotate_exit_code": command.returncode,
            "renewed": report.get("renewed"),
            "seconds_to_rotate_all": round(elapsed, 1),
            "renewals_per_second": round(count / elapsed, 1),
            "orders_received_s": {"first": round(min(ordered), 2) if ordered else None,
                                  "last": round(max(ordered), 2) if ordered else None},
            "cpu_ms_per_renewal": {"broker": round(broker_used / count * 1000, 2),
                                   "renewer": round(renewer_used / count * 1000, 2)},
            "registry": await check_registry(home, sessions),
        }
    finally:
        renewer.stop()
        broker.stop()


async def issuance_alone(root: Path, count: int, concurrency: int) -> dict[str, Any]:
    """``Authority.issue`` alone (sign, then a durable group-committed record), in this process, for the ratio:
    the same CA key type, profile and registry as the renewals, without MQTT, checks or the device's part."""
    home, _ = await make_home(root, [], FLEET.format(renew_after=0))
    csrs = [x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(generate_private_key("p256"),
                                                                                   hashes.SHA256())
            for _ in range(count)]
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        started = time.monotonic()
        for start in range(0, count, concurrency):
            await asyncio.gather(*(authority.issue(csr, f"alone-{start + n:05d}", "fleet", actor="bench")
                                   for n, csr in enumerate(csrs[start:start + concurrency])))
        elapsed = time.monotonic() - started
    return {"certificates": count, "seconds": round(elapsed, 2), "issued_per_second": round(count / elapsed, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--fleet", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="renewal and issuance-alone rounds, interleaved")
    parser.add_argument("--concurrency", type=int, default=200, help="devices connecting at a time")
    parser.add_argument("--quick", action="store_true", help="200 devices, one round and a fleet of 500")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.fleet, args.rounds = 200, 500, 1
    raise_file_limit()
    root = Path(tempfile.mkdtemp(prefix="iotauth-renewal-"))
    try:
        result: dict[str, Any] = {"benchmark": "renewal_rate", "date": time.strftime("%Y-%m-%d"),
                                  "machine": machine(), "cpus": psutil.cpu_count(),
                                  "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
        rates, alone = [], []
        for n in range(args.rounds):  # interleaved, so a neighbour's load falls on both alike
            rates.append(await renewal_rate(root / f"rate-{n}", args.devices, args.concurrency))
            alone.append(await issuance_alone(root / f"alone-{n}", args.devices, 256))
        ratios = [r["renewals_per_second"] / a["issued_per_second"] for r, a in zip(rates, alone, strict=True)]
        median = sorted(range(len(rates)), key=lambda i: rates[i]["renewals_per_second"])[len(rates) // 2]
        result["renewal_rate"] = {**rates[median], "rounds_renewals_per_second": [r["renewals_per_second"]
                                                                                 for r in rates]}
        result["issuance_alone"] = {"certificates": args.devices, "issued_per_second": statistics.median(
            a["issued_per_second"] for a in alone), "rounds_issued_per_second": [a["issued_per_second"] for a in alone]}
        result["ratio_renewals_to_issuance"] = round(statistics.median(ratios), 3)
        result["goal_renewals_per_second"] = 500
        if args.fleet:
            result["fleet_rotation"] = await fleet_rotation(root / "fleet", args.fleet, args.concurrency)
        result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
