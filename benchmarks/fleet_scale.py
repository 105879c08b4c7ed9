"""Fleet scale on one node (issue 20): memory per idle session, 20k sessions, and reconnect storms.

Prints one JSON document. Every broker is a subprocess; CPU and memory are read from the kernel for its pid.

* ``memory_per_idle_session``: iotauth, stock amqtt (TLS listener, client certificate presented, anonymous)
  and Mosquitto side by side in one run. Each broker gets ``--idle`` sessions, every one with its own
  certificate, ``--concurrency`` connecting at a time; memory per session = (RSS after - RSS before) / N.
* ``many_sessions``: ``--sessions`` concurrent device sessions on iotauth (19,900 by default: every session is a
  socket in both the broker and this process, and this sandbox's hard open-files limit is 20,000 and cannot be
  raised without CAP_SYS_RESOURCE; the JSON reports the limit), each with
  its own certificate: RSS; the broker's CPU per second while they idle (clients send PINGREQ on their
  keep-alive, staggered); telemetry from a sample of devices to an ingest subscriber (delivered/sent); and
  revocation -> disconnect latency, revoked from this process through the registry while all are connected.
* ``storms``: ``--storm`` devices connected, the broker killed (SIGKILL) and restarted on the same port; every
  device reconnects with the reference client's backoff (:mod:`firmware_tools.backoff`). Reported: time until
  all are back, refused attempts, and the CPU-bound floor N x (broker CPU per connect) / cores, where cores is
  what the broker can use: its event loop runs on one core (also printed: the floor over all the machine's
  cores). Run twice: devices spread over many loopback addresses, and all behind one address (CGNAT).

Usage: python benchmarks/fleet_scale.py [--quick] [--sessions N] [--idle N] [--storm N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    PINGREQ,
    BrokerUnderTest,
    Creds,
    LightDevice,
    client_context,
    connect_all,
    free_port,
    machine,
    make_home,
    open_device,
    percentile,
    raise_file_limit,
    start_amqtt,
    start_iotauth,
    start_mosquitto,
)

from firmware_tools.backoff import Backoff, Outcome, outcome_of
from iotauth.config import Home
from iotauth.registry import RevocationReason, open_registry

FLEET_CONFIG = """
[profiles.fleet]
publish = ["devices/{device_id}/telemetry/#"]
subscribe = ["devices/{device_id}/commands/#"]
"""
STORM_LIMITS_NOTE = "admission control on, with the defaults of iotauth.toml"


async def idle_memory(broker: BrokerUnderTest, home: Home, creds: list[Creds], concurrency: int) -> dict[str, Any]:
    await asyncio.sleep(1.0)
    before = broker.rss()
    started = time.perf_counter()
    devices = await connect_all(broker.port, home, creds, concurrency)
    elapsed = time.perf_counter() - started
    await asyncio.sleep(2.0)  # let allocations settle (audit flushes, GC)
    after = broker.rss()
    for device in devices:
        device.close()
    return {"sessions": len(devices), "kib_per_session": round((after - before) / len(devices) / 1024, 1),
            "rss_mib_with_sessions": round(after / 2**20, 1), "seconds_to_connect_all": round(elapsed, 2)}


async def measure_idle_memory(root: Path, count: int, concurrency: int) -> dict[str, Any]:
    home, creds = await make_home(root / "idle", [(f"idle-{n}", "default") for n in range(count)])
    devices = list(creds.values())
    result: dict[str, Any] = {}
    for name, starter in (("iotauth", lambda: start_iotauth(home)), ("amqtt", lambda: start_amqtt(home)),
                          ("mosquitto", lambda: start_mosquitto(home, root / "idle"))):
        broker = starter()
        if broker is None:
            result[name] = "not installed"
            continue
        try:
            result[name] = await idle_memory(broker, home, devices, concurrency)
        finally:
            broker.stop()
    if isinstance(result.get("mosquitto"), dict):
        result["ratio_iotauth_over_mosquitto"] = round(
            result["iotauth"]["kib_per_session"] / result["mosquitto"]["kib_per_session"], 2)
        result["goal_ratio"] = 3.0
    return result


async def keep_pinging(devices: list[LightDevice], keep_alive: float, stop: asyncio.Event) -> None:
    """Each connected device sends PINGREQ once per keep-alive, from the moment it connected (as a fleet does).

    The list may still be growing while the fleet connects: a device connected early must not fall silent for
    1.5 x its keep-alive while the rest are still connecting, or the broker rightly drops it.
    """
    while not stop.is_set():
        now = time.monotonic()
        for device in list(devices):
            if now - device.pinged_at >= keep_alive:
                device.write(PINGREQ)
                device.pinged_at = now
        await asyncio.sleep(0.5)


async def measure_many(root: Path, count: int, concurrency: int, sample: int, revocations: int) -> dict[str, Any]:
    fleet = [(f"fleet-{n}", "fleet") for n in range(count)]
    home, creds = await make_home(root / "many", [*fleet, ("fleet-ingest", "ingest")], FLEET_CONFIG)
    broker = start_iotauth(home)
    try:
        await asyncio.sleep(1.0)
        rss_before = broker.rss()
        cpu_before, started = broker.cpu(), time.perf_counter()
        members = [creds[d] for d, _ in fleet]
        devices: list[LightDevice] = []
        stop = asyncio.Event()
        pinger = asyncio.create_task(keep_pinging(devices, 50.0, stop))  # keep-alive 60 s, pinged every 50 s
        await connect_all(broker.port, home, members, concurrency, devices=devices)
        connect_seconds = time.perf_counter() - started
        cpu_per_connect_ms = (broker.cpu() - cpu_before) / count * 1000
        await asyncio.sleep(3.0)
        rss = broker.rss()
        await asyncio.sleep(2.0)
        cpu0 = broker.cpu()
        await asyncio.sleep(20.0)
        idle_cpu = (broker.cpu() - cpu0) / 20.0
        ingest, code = await open_device(broker.port, client_context(home, creds["fleet-ingest"]), "fleet-ingest")
        assert code == 0
        ingest.subscribe("devices/+/telemetry/#", 0)
        await asyncio.sleep(0.5)
        senders = random.Random(1).sample(devices, min(sample, len(devices)))
        sent = 0
        for _ in range(5):
            for device in senders:
                device.publish(f"devices/{device.client_id}/telemetry/t", b"21.5")
                sent += 1
            await asyncio.sleep(1.0)
        await asyncio.sleep(1.0)
        delivered = ingest.received
        still = sum(1 for device in devices if not device.lost.done())
        latencies = await revoke_some(home, devices, revocations)
        stop.set()
        await pinger
        for device in devices:
            device.close()
        ingest.close()
    finally:
        broker.stop()
    return {
        "sessions": count,
        "rss_mib": round(rss / 2**20, 1),
        "kib_per_session": round((rss - rss_before) / count / 1024, 1),
        "seconds_to_connect_all": round(connect_seconds, 1),
        "broker_cpu_ms_per_connect": round(cpu_per_connect_ms, 2),
        "idle_broker_cpu_seconds_per_second": round(idle_cpu, 4),
        "idle_note": "keep-alive 60 s: every device sends PINGREQ every 50 s from when it connected",
        "still_connected_before_revocations": still,
        "telemetry_sample_devices": len(senders),
        "telemetry_sent": sent,
        "telemetry_delivered_to_ingest": delivered,
        "revocation_to_disconnect_ms": {"revocations": len(latencies), "p50": round(percentile(latencies, 0.5), 1),
                                        "p99": round(percentile(latencies, 0.99), 1), "goal_p99": 250},
    }


async def revoke_some(home: Home, devices: list[LightDevice], count: int) -> list[float]:
    """Revoke ``count`` live devices one by one from this process; latency = EOF seen - commit returned."""
    latencies = []
    async with await open_registry(home.registry_db) as registry:
        for device in random.Random(2).sample(devices, min(count, len(devices))):
            await asyncio.sleep(random.uniform(0.05, 0.15))
            await registry.revoke(device.client_id, RevocationReason.KEY_COMPROMISE, actor="bench")
            committed = time.monotonic()
            lost = await asyncio.wait_for(device.lost, 10)
            latencies.append((lost - committed) * 1000)
    return latencies


async def storm(broker: BrokerUnderTest, home: Home, creds: list[Creds], source: Any, concurrency: int,
                deadline: float) -> dict[str, Any]:
    """Connect all, kill -9 the broker, restart it, and let every device come back with the reference backoff."""
    await connect_all(broker.port, home, creds, concurrency, source)
    broker.kill()
    contexts = {c.device_id: client_context(home, c) for c in creds}
    refused = 0
    busy = 0
    back: list[float] = []
    cpu_before = 0.0
    restarted = time.monotonic()
    broker.restart()
    cpu_before = broker.cpu()
    rng = random.Random(3)

    async def device(index: int, c: Creds) -> None:
        nonlocal refused, busy
        backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(rng.random()))
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # devices notice the outage at slightly different times
        while time.monotonic() - restarted < deadline:
            address = source(index) if callable(source) else source
            connection, code = await open_device(broker.port, contexts[c.device_id], c.device_id, source=address)
            outcome = outcome_of(code if code >= 0 else None)
            if outcome is Outcome.CONNECTED:
                back.append(time.monotonic() - restarted)
                connection.close()
                return
            refused += 1
            busy += outcome is Outcome.BUSY
            await asyncio.sleep(backoff.delay(outcome))

    await asyncio.gather(*(device(i, c) for i, c in enumerate(creds)))
    cpu = broker.cpu() - cpu_before
    return {"devices": len(creds), "back": len(back), "seconds_until_all_back": round(max(back), 2) if back else None,
            "refused_attempts": refused, "of_which_busy": busy, "broker_cpu_seconds": round(cpu, 2)}


async def measure_storms(root: Path, count: int, concurrency: int, cpu_per_connect_ms: float) -> dict[str, Any]:
    home, creds = await make_home(root / "storm", [(f"storm-{n}", "default") for n in range(count)])
    devices = list(creds.values())
    port = free_port()
    layouts = {
        "many_addresses": lambda index: f"127.{1 + index // 250 % 250}.{index % 250 + 1}.{7 + index // 62500}",
        "one_address_cgnat": "127.0.0.9",
    }
    out: dict[str, Any] = {"admission_control": STORM_LIMITS_NOTE, "broker_cpu_ms_per_connect": cpu_per_connect_ms}
    floor_one_core = count * cpu_per_connect_ms / 1000
    out["floor_seconds_broker_event_loop_one_core"] = round(floor_one_core, 2)
    out["floor_seconds_all_cores"] = round(floor_one_core / (os.cpu_count() or 1), 2)
    for name, source in layouts.items():
        broker = start_iotauth(home, port=port, name="iotauth")
        try:
            result = await storm(broker, home, devices, source, concurrency, deadline=max(120.0, floor_one_core * 10))
        finally:
            broker.stop()
        if result["seconds_until_all_back"]:
            result["ratio_over_floor_one_core"] = round(result["seconds_until_all_back"] / floor_one_core, 2)
        out[name] = result
    out["goal_ratio_over_floor"] = 2.0
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_file_limit()
    root = Path(tempfile.mkdtemp(prefix="iotauth-fleet-"))
    try:
        idle = await measure_idle_memory(root, args.idle, args.concurrency)
        many = await measure_many(root, args.sessions, args.concurrency, args.sample, args.revocations)
        storms = await measure_storms(root, args.storm, args.concurrency, many["broker_cpu_ms_per_connect"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import resource

    return {"benchmark": "fleet_scale", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "memory_per_idle_session": idle, "many_sessions": many, "storms": storms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions per broker for the memory comparison")
    parser.add_argument("--sessions", type=int, default=19_900, help="concurrent sessions on iotauth")
    parser.add_argument("--sample", type=int, default=200, help="devices sending telemetry among them")
    parser.add_argument("--revocations", type=int, default=40)
    parser.add_argument("--storm", type=int, default=3000, help="devices in each reconnect storm")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.idle, args.sessions, args.sample, args.revocations, args.storm = 200, 500, 20, 10, 200
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
