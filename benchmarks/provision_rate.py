"""Provisioning throughput benchmark (issue 3).

Provisions emulated devices on 1, 4 and 16 ports at once, at 115200 baud with
100 ms of emulated key generation, through the real station (pyserial on
pseudo-terminals, real registry with durable writes, real CA) against real
emulator processes that pace every byte at the baud rate. Each emulator is a
fixture fed ``--devices-per-port`` boards in turn (``--boards``).

Prints JSON with, per port count:

* ``devices_per_hour``: boards provisioned per hour of wall time;
* ``link_limit_ratio``: the wall time the link itself needs (the wire time of
  the bytes actually exchanged, both directions, 10 bits per byte, plus the
  emulated key generation) divided by the measured wall time, averaged over
  ports. 1.0 would mean the station and the devices add nothing to the wire;
* ``scaling_vs_linear``: throughput divided by (ports x the 1-port throughput);
* ``station_cpu_ms_per_device`` / ``emulator_cpu_ms_per_device``: CPU time
  (user + system) of the station process (its registry threads included) and
  of the emulator processes while provisioning (start-up excluded).

Goals: ``link_limit_ratio >= 0.85`` at 1 port, ``scaling_vs_linear >= 0.8``
up to 16 ports. The machine is shared and has 2 cores; the 16-port run puts
17 busy processes on them.

Usage: python benchmarks/provision_rate.py [--ports 1,4,16] [--devices-per-port 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iotauth.authority import open_authority
from iotauth.bootstrap import initialise_home
from iotauth.config import Home
from iotauth.provisioning.ids import IdTemplate, TemplateIds
from iotauth.provisioning.results import ProvisionResult
from iotauth.provisioning.station import Station, StationConfig
from iotauth.registry import open_registry

REPO = Path(__file__).resolve().parents[1]


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by running processes (Linux /proc), so emulator start-up is not counted."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_emulators(
    root: Path, count: int, boards: int, baud: int, keygen_ms: float
) -> list[tuple[subprocess.Popen[bytes], str]]:
    started = []
    for n in range(count):
        process = subprocess.Popen(
            [sys.executable, "-m", "firmware_tools.emulator", "--pty", "--state", str(root / f"port-{n:02d}"),
             "--hardware-id", f"BENCH{count:02d}P{n:02d}", "--baud", str(baud), "--keygen-ms", str(keygen_ms),
             "--boards", str(boards)],
            stdout=subprocess.PIPE, cwd=REPO,
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready:
            raise RuntimeError("emulator did not start")
        started.append((process, process.stdout.readline().decode().strip()))
    return started


async def run_ports(home: Home, ports: int, per_port: int, baud: int, keygen_ms: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix=f"iotauth-bench-{ports}p-"))
    emulators = start_emulators(root, ports, per_port, baud, keygen_ms)
    pids = [process.pid for process, _ in emulators]
    try:
        async with await open_registry(home.registry_db) as registry:
            authority = await open_authority(home, registry)
            station = Station(authority, StationConfig(f"bench-{ports}", "bench", baudrate=baud),
                              TemplateIds(IdTemplate("sensor-{hardware_id}")))
            results: dict[str, list[ProvisionResult]] = {}
            cpu, emulator_cpu, started = _cpu(resource.RUSAGE_SELF), _process_cpu(pids), time.perf_counter()

            async def line(port: str) -> tuple[str, float]:
                out = results.setdefault(port, [])
                for _ in range(per_port):
                    out.append(await station.provision(port))
                return port, time.perf_counter()

            finished = dict(await asyncio.gather(*(line(port) for _, port in emulators)))
            wall = time.perf_counter() - started
            station_cpu = _cpu(resource.RUSAGE_SELF) - cpu
            emulator_cpu = _process_cpu(pids) - emulator_cpu
            await station.close()
    finally:
        for process, _ in emulators:
            process.terminate()
        for process, _ in emulators:
            process.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    all_results = [r for rs in results.values() for r in rs]
    failures = [r.error for r in all_results if not r.ok]
    byte_time = 10.0 / baud
    ratios = []
    for port, rs in results.items():
        link_seconds = sum(r.bytes_exchanged * byte_time + keygen_ms / 1000.0 for r in rs)
        ratios.append(link_seconds / (finished[port] - started))
    devices = len(all_results)
    bytes_per_device = sum(r.bytes_exchanged for r in all_results) / max(devices, 1)
    return {
        "ports": ports,
        "devices": devices,
        "failed": len(failures),
        "failures": failures[:5],
        "wall_seconds": round(wall, 3),
        "devices_per_hour": round(devices / wall * 3600),
        "seconds_per_device_per_port": round(wall / per_port, 4),
        "link_limit_seconds_per_device": round(bytes_per_device * byte_time + keygen_ms / 1000.0, 4),
        "bytes_per_device": round(bytes_per_device, 1),
        "link_limit_ratio": round(sum(ratios) / len(ratios), 3),
        "link_limit_ratio_min": round(min(ratios), 3),
        "station_cpu_ms_per_device": round(station_cpu / devices * 1000, 2),
        "emulator_cpu_ms_per_device": round(emulator_cpu / devices * 1000, 2),
    }


async def main(port_counts: list[int], per_port: int, baud: int, keygen_ms: float) -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="iotauth-bench-home-"))
    home = Home(scratch / "home")
    await initialise_home(home, "bench.test", ["localhost"], passphrase=None, actor="bench")
    try:
        runs = [await run_ports(home, n, per_port, baud, keygen_ms) for n in port_counts]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = next((r for r in runs if r["ports"] == 1), None)
    for run in runs:
        if base is not None:
            linear = float(base["devices_per_hour"]) * int(run["ports"])  # type: ignore[arg-type]
            run["scaling_vs_linear"] = round(float(run["devices_per_hour"]) / linear, 3)  # type: ignore[arg-type]
    return {
        "benchmark": "provision_rate",
        "baud": baud,
        "keygen_ms": keygen_ms,
        "devices_per_port": per_port,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg()[0],
        "runs": runs,
        "goals": {"link_limit_ratio_1_port": 0.85, "scaling_vs_linear": 0.8},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", default="1,4,16", help="comma list of port counts")
    parser.add_argument("--devices-per-port", type=int, default=8)
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--keygen-ms", type=float, default=100.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.ports.split(",") if n.strip()]
    print(json.dumps(asyncio.run(main(counts, args.devices_per_port, args.baud, args.keygen_ms)), indent=2))
