"""Managed Mosquitto (issue 11): live revocation, reconcile at 10,000 devices, and what the plugin costs the broker.

Prints one JSON document. Mosquitto (Debian's 2.0.11 and its dynamic-security plugin) and
``iotauth mosquitto follow`` run as subprocesses exactly as operators run them; Mosquitto's CPU and memory
are read from the kernel for its pid.

* ``revocation``: a live session per device; each device revoked through the registry from *this* process
  (another process than the follower); latency = the client sees its connection closed - the registry's event
  timestamp. The follower first publishes a CRL and proves it loaded (canary), then kicks. Run with a small
  state and with ``--fleet`` (10,000) devices loaded, where each of Mosquitto's state saves costs tens of ms.
* ``reconcile``: ``--fleet`` active devices appear in the registry while Mosquitto holds none of them; the
  follower starts with a restart command and must bring Mosquitto in step (it rebuilds the state file and
  restarts Mosquitto rather than sending 30,000 control commands). Reported: time from the follower's start
  to "in step", Mosquitto's RSS before and after, the state file's size, the time of the follower's full
  verification pass at that size (listing every client and role), and the control-API path for a smaller
  change (``--api-devices`` new devices issued while it runs: time until all are synced).
* ``broker_cpu``: the managed Mosquitto (``--fleet`` devices in its plugin) against a plain Mosquitto (the
  static ``iotauth export mosquitto`` configuration: same TLS listener, ACL file), both running at once and
  measured in interleaved rounds: broker CPU per 64-byte QoS 0 message (one publisher, one wildcard
  subscriber, flow-controlled) and per full mTLS connect.

Usage: python benchmarks/mosquitto_control.py [--quick] [--fleet N] [--revocations N] [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from broker_auth import connect_batch, fill_registry, open_mqtt, publish_run
from harness import BrokerUnderTest, Creds, client_context, free_port, issue_creds, machine, make_home, percentile

from iotauth.config import Home
from iotauth.registry import TIMESTAMP_FORMAT, Registry, RevocationReason, open_registry
from iotauth.testing import FollowerRunner, MosquittoRunner

IOTAUTH = str(Path(sys.executable).parent / "iotauth")


class Managed:
    """One managed export with its (supervised) Mosquitto and, while it runs, its follower."""

    def __init__(self, home: Home, root: Path, name: str) -> None:
        self.home, self.directory = home, root / name
        self.port, self.admin_port = free_port(), free_port()
        self.log = root / f"{name}.log"
        self.mosquitto: MosquittoRunner | None = None
        self.follower: FollowerRunner | None = None

    def export(self) -> None:
        subprocess.run([IOTAUTH, "--home", str(self.home.root), "export", "mosquitto", "--managed", "--out",
                        str(self.directory), "--bind", f"127.0.0.1:{self.port}", "--admin-bind",
                        f"127.0.0.1:{self.admin_port}", "--json"], check=True, capture_output=True, timeout=300)

    def start_mosquitto(self) -> None:
        self.mosquitto = MosquittoRunner(self.directory / "mosquitto.conf", [self.port, self.admin_port], self.log,
                                         supervise=True).start()

    def start_follower(self, *args: str) -> dict[str, Any]:
        pid_file = self.directory / "state" / "mosquitto.pid"
        restart = f"sh -c 'kill -TERM \"$(cat {pid_file})\"'"
        self.follower = FollowerRunner(self.home.root, self.directory, "--restart-command", restart, *args)
        return self.follower.start(timeout=900)

    def rss(self) -> int:
        assert self.mosquitto is not None
        return int(psutil.Process(self.mosquitto.pid).memory_info().rss)

    def as_broker(self) -> BrokerUnderTest:
        """The running Mosquitto, for the CPU helpers of broker_auth (they only read its pid and port)."""
        assert self.mosquitto is not None
        broker = BrokerUnderTest.__new__(BrokerUnderTest)
        broker.name, broker.port = "mosquitto-managed", self.port
        broker.ps = psutil.Process(self.mosquitto.pid)
        return broker

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.mosquitto is not None:
            self.mosquitto.stop()


def event_seconds(ts: str) -> float:
    return datetime.strptime(ts, TIMESTAMP_FORMAT).replace(tzinfo=UTC).timestamp()


async def revoke_and_wait(registry: Registry, device_id: str, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> float:
    """Revoke a connected device; milliseconds from the committed revocation to its connection closing."""
    await registry.revoke(device_id, RevocationReason.KEY_COMPROMISE, actor="bench")
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await asyncio.wait_for(reader.read(), 30)
    dropped = time.time()
    event = [e for e in await registry.events(device_id=device_id) if e.kind == "device.revoked"][-1]
    writer.close()
    return (dropped - event_seconds(event.ts)) * 1000


async def measure_revocation(home: Home, managed: Managed, victims: dict[str, Creds]) -> dict[str, Any]:
    latencies: list[float] = []
    async with await open_registry(home.registry_db) as registry:
        for device_id, creds in victims.items():
            reader, writer, code = await open_mqtt(managed.port, client_context(home, creds), device_id)
            assert code == 0, f"{device_id}: CONNACK {code}"
            await asyncio.sleep(random.uniform(0.05, 0.15))  # de-phase from the follower's poll timer
            latencies.append(await revoke_and_wait(registry, device_id, reader, writer))
            # Reconnect refused? (the CRL was proven in force before the kick)
            _, again, code = await open_mqtt(managed.port, client_context(home, creds), device_id)
            again.close()
            assert code != 0, f"{device_id} reconnected after its revocation"
    return {
        "revocations": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "goal_p99_ms": 1000,
        "reconnects_refused": len(latencies),
    }


async def measure_reconcile(home: Home, managed: Managed, fleet: int) -> dict[str, Any]:
    assert managed.mosquitto is not None
    rss_before = managed.rss()
    await fill_registry(home, fleet)
    started = time.monotonic()
    status = managed.start_follower()
    in_step = time.monotonic() - started
    rss_after = managed.rss()
    async with await open_registry(home.registry_db) as registry:
        records = [e for e in await registry.events() if e.kind in ("mosquitto.reconciled", "mosquitto.state.rebuilt")]
    verification = [e.data for e in records if e.kind == "mosquitto.reconciled"][-1]
    return {
        "devices": fleet,
        "seconds_to_in_step": round(in_step, 2),
        "path": "rebuild state file + restart" if any(e.kind == "mosquitto.state.rebuilt" for e in records)
        else "control API",
        "mosquitto_restarts": managed.mosquitto.starts - 1,
        "mosquitto_rss_mb_before": round(rss_before / 2**20, 1),
        "mosquitto_rss_mb_after": round(rss_after / 2**20, 1),
        "state_file_mb": round((managed.directory / "state" / "dynamic-security.json").stat().st_size / 2**20, 2),
        "full_verification_pass_seconds": verification["seconds"],
        "full_verification_commands": verification["commands"],
        "status": {k: status[k] for k in ("devices", "reconcile_seconds")},
    }


async def measure_api_path(home: Home, managed: Managed, count: int, victims: dict[str, Creds]) -> dict[str, Any]:
    """``count`` new devices while the follower runs: grants go through the control API (3 commands each).

    While those grants run, ``victims`` (connected) are revoked one after another: revocations overtake the
    queued grants, so their latency is measured under that load too.
    """
    devices = [(f"api-{n}", "default") for n in range(count)]
    sessions = {}
    for device_id, creds in victims.items():
        reader, writer, code = await open_mqtt(managed.port, client_context(home, creds), device_id)
        assert code == 0, f"{device_id}: CONNACK {code}"
        sessions[device_id] = (reader, writer)
    latencies: list[float] = []
    async with await open_registry(home.registry_db) as registry:
        mark = await registry.last_event_id()
        started = time.monotonic()
        issuing = asyncio.create_task(issue_creds(home, registry, devices, home.root.parent / "api"))
        await asyncio.sleep(1.0)
        for device_id, (reader, writer) in sessions.items():
            latencies.append(await revoke_and_wait(registry, device_id, reader, writer))
            await asyncio.sleep(random.uniform(0.2, 0.5))
        await issuing
        wanted = {d for d, _ in devices}
        while time.monotonic() - started < 1800:
            events = await registry.events(after_id=mark)
            synced = {e.device_id for e in events if e.kind == "mosquitto.device.synced"}
            if wanted <= synced:
                break
            await asyncio.sleep(0.2)
        seconds = time.monotonic() - started
        overtaken = sum(1 for e in events if e.kind == "mosquitto.session.kicked" and e.data.get("overtook"))
    return {"new_devices": count, "seconds_until_all_synced": round(seconds, 2),
            "commands": 3 * count, "ms_per_command": round(seconds / (3 * count) * 1000, 1),
            "revocations_meanwhile": {"revocations": len(latencies), "p50_ms": round(statistics.median(latencies), 1),
                                      "max_ms": round(max(latencies), 1), "kicks_that_overtook_grants": overtaken}}


async def measure_cpu(home: Home, creds: dict[str, Creds], brokers: dict[str, BrokerUnderTest], messages: int,
                      connects: int, rounds: int) -> dict[str, Any]:
    dev, ingest = creds["bench-dev"], creds["bench-ingest"]
    topic, sub_filter = "devices/bench-dev/telemetry/t", "devices/+/telemetry/#"
    context = client_context(home, dev)
    for broker in brokers.values():  # warm-up
        await publish_run(broker, home, dev, ingest, topic, sub_filter, min(messages, 5000))
        await connect_batch(broker, context, "bench-dev", 20, 4)
    per_message: dict[str, list[float]] = {k: [] for k in brokers}
    per_connect: dict[str, list[float]] = {k: [] for k in brokers}
    for _ in range(rounds):  # interleaved: the two brokers see the same machine noise
        for label, broker in brokers.items():
            per_message[label].append((await publish_run(broker, home, dev, ingest, topic, sub_filter,
                                                         messages))["cpu_us_per_message"])
            cpu, _ = await connect_batch(broker, context, "bench-dev", connects, 4)
            per_connect[label].append(cpu / connects * 1000)
    message = {k: statistics.fmean(v) for k, v in per_message.items()}
    connect = {k: statistics.fmean(v) for k, v in per_connect.items()}
    return {
        "messages_per_run": messages,
        "connects_per_run": connects,
        "rounds": rounds,
        "cpu_us_per_message": {k: round(v, 2) for k, v in message.items()},
        "cpu_us_per_message_runs": {k: [round(x, 2) for x in v] for k, v in per_message.items()},
        "cpu_ms_per_connect": {k: round(v, 3) for k, v in connect.items()},
        "ratio_per_message_managed_over_plain": round(message["managed"] / message["plain"], 3),
        "ratio_per_connect_managed_over_plain": round(connect["managed"] / connect["plain"], 3),
        "goal_ratio": 1.05,
        "plain": "iotauth export mosquitto (acl_file); managed: dynamic-security plugin with the fleet loaded",
    }


def start_plain(home: Home, root: Path) -> BrokerUnderTest:
    directory, port = root / "plain", free_port()
    subprocess.run([IOTAUTH, "--home", str(home.root), "export", "mosquitto", "--out", str(directory), "--bind",
                    f"127.0.0.1:{port}"], check=True, capture_output=True, timeout=120)
    config = directory / "mosquitto.conf"
    config.write_text(config.read_text() + "set_tcp_nodelay true\n")  # the same as the managed configuration
    return BrokerUnderTest("mosquitto-plain", ["mosquitto", "-c", str(config)], "", port=port)


def reachable_directory() -> Path:
    root = Path(tempfile.mkdtemp(prefix="iotauth-mosquitto-bench-"))
    root.chmod(0o755)  # Mosquitto started as root reads its files as 'mosquitto'
    return root


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = reachable_directory()
    small = [(f"rev-small-{n}", "default") for n in range(args.revocations)]
    large = [(f"rev-large-{n}", "default") for n in range(args.revocations)]
    busy = [(f"rev-busy-{n}", "default") for n in range(args.busy_revocations)]
    home, creds = await make_home(root, [("bench-dev", "default"), ("bench-ingest", "ingest"), *small, *large,
                                         *busy])
    managed = Managed(home, root, "managed")
    plain: BrokerUnderTest | None = None
    result: dict[str, Any] = {"benchmark": "mosquitto_control", "date": time.strftime("%Y-%m-%d"),
                              "machine": machine(), "mosquitto": mosquitto_version()}
    try:
        managed.export()
        managed.start_mosquitto()
        managed.start_follower()
        result["revocation_small_state"] = await measure_revocation(
            home, managed, {d: creds[d] for d, _ in small})
        assert managed.follower is not None
        managed.follower.stop()
        result["reconcile"] = await measure_reconcile(home, managed, args.fleet)
        result["revocation_with_fleet_loaded"] = await measure_revocation(
            home, managed, {d: creds[d] for d, _ in large})
        result["revocation_with_fleet_loaded"]["devices_loaded"] = args.fleet
        result["reconcile"]["control_api_path"] = await measure_api_path(
            home, managed, args.api_devices, {d: creds[d] for d, _ in busy})
        plain = start_plain(home, root)
        result["broker_cpu"] = await measure_cpu(home, creds, {"managed": managed.as_broker(), "plain": plain},
                                                 args.messages, args.connects, args.rounds)
        result["broker_cpu"]["devices_loaded_in_managed"] = args.fleet + args.api_devices
    finally:
        managed.stop()
        if plain is not None:
            plain.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def mosquitto_version() -> str:
    found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "mosquitto"], capture_output=True, text=True,
                           check=False)
    return found.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=int, default=10_000, help="devices loaded for the reconcile and CPU runs")
    parser.add_argument("--revocations", type=int, default=40, help="revocations per state size")
    parser.add_argument("--api-devices", type=int, default=100, help="devices added through the control API")
    parser.add_argument("--busy-revocations", type=int, default=5, help="revocations while those are added")
    parser.add_argument("--messages", type=int, default=300_000, help="messages per CPU run")
    parser.add_argument("--connects", type=int, default=150, help="connects per CPU run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.fleet, args.revocations, args.api_devices, args.messages, args.connects, args.rounds = (
            1000, 10, 30, 10_000, 40, 2)
        args.busy_revocations = 2
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
