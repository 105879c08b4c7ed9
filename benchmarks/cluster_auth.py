"""RabbitMQ cluster authorised by iotauth (issue 12): revocation latency, connect cost, serve's decision rate.

One run sets up what ``tests/fixtures/rabbitmq.py`` does: a home with
``[rabbitmq] enabled``, ``iotauth serve`` (TLS), ``iotauth export rabbitmq``,
three RabbitMQ nodes from the exported files (as the ``rabbitmq`` account when
run as root) and the follower (``iotauth export rabbitmq --watch``), then
measures:

* **revocation -> disconnect**: a device connected to node 2 or 3, revoked in
  the registry (this process, another connection to the SQLite file), until
  its TLS connection is closed; with the follower's own kick time (its audit
  record) as a component;
* **connects/s and broker CPU per connect**, iotauth's HTTP backend against
  RabbitMQ's internal backend *on the same cluster*, switched at run time
  (``application:set_env(rabbit, auth_backends, ...)`` on every node) and
  interleaved round by round, and the HTTP backend once more calling a second
  serve replica over plain HTTP (``http-plain``: what TLS to serve costs
  RabbitMQ): mTLS handshake (with the CRL check), CONNECT,
  CONNACK, DISCONNECT, ``--concurrency`` at a time against node 1. Broker CPU
  is read from the kernel for every ``beam.smp``; serve's CPU is reported apart
  (it is the cost moved out of RabbitMQ);
* **serve decisions/s** for each RabbitMQ endpoint: ``wrk`` over HTTPS with
  keep-alive, POSTing RabbitMQ's form bodies.

Usage: python benchmarks/cluster_auth.py [--revocations N] [--connects N] [--rounds N] [--seconds S]
(needs rabbitmq-server and wrk: apt-get install rabbitmq-server wrk)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from authorizer import _wrk as wrk
from harness import Creds, client_context, free_port, issue_creds, machine, open_device, percentile

from iotauth.bootstrap import initialise_home
from iotauth.config import Home
from iotauth.registry import RevocationReason, open_registry
from iotauth.testbed.rabbitmq import IOTAUTH, RabbitDeployment
from iotauth.testbed.rabbitmq_cluster import rabbitmq_available

BACKENDS = {"http": "[rabbit_auth_backend_http]", "http-plain": "[rabbit_auth_backend_http]",
            "internal": "[rabbit_auth_backend_internal]"}
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
local n = 0
request = function()
  n = n + 1
  local id = "cb-" .. (n % DEVICES)
  return wrk.format(nil, nil, nil, string.gsub(BODY, "DEVICE", id))
end
"""
BODIES = {
    "user": "username=DEVICE",
    "vhost": "username=DEVICE&vhost=%2F&ip=127.0.0.1&tags=&client_id=DEVICE",
    "resource": "username=DEVICE&vhost=%2F&resource=queue&name=mqtt-subscription-DEVICEqos1&permission=read"
                "&tags=&client_id=DEVICE",
    "topic": "username=DEVICE&vhost=%2F&resource=topic&name=amq.topic&permission=write&tags="
             "&routing_key=devices.DEVICE.telemetry.t&variable_map.client_id=DEVICE&variable_map.username=DEVICE"
             "&variable_map.vhost=%2F",
}


class Bench:
    """The testbed deployment (serve, export, cluster, follower) and a second serve replica on plain HTTP."""

    def __init__(self, root: Path, devices: list[tuple[str, str]]) -> None:
        self.root = root
        self.home = Home(root / "home")
        self.devices = devices
        self.creds: dict[str, Creds] = {}
        self.deployment = RabbitDeployment(self.home, root)
        self.cluster = self.deployment.cluster
        self.serve_url = self.deployment.serve_url
        self.plain_url = f"http://127.0.0.1:{free_port()}"
        self.plain: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        await initialise_home(self.home, "bench.test", ["localhost", "127.0.0.1"], passphrase=None, rabbitmq=True,
                              actor="bench")
        async with await open_registry(self.home.registry_db) as registry:
            self.creds = await issue_creds(self.home, registry, self.devices, self.root / "devices")
        await asyncio.to_thread(self.deployment.start)
        await asyncio.to_thread(self._start_plain)

    def _start_plain(self) -> None:
        self.plain = subprocess.Popen([*IOTAUTH, "--home", str(self.home.root), "serve", "--no-tls", "--bind",
                                       self.plain_url.removeprefix("http://")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.plain_url}/healthz").status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("the plain-HTTP serve replica did not start")

    def serves(self) -> list[psutil.Process]:
        assert self.deployment.serve is not None
        assert self.plain is not None
        return [psutil.Process(self.deployment.serve.pid), psutil.Process(self.plain.pid)]

    def stop(self) -> None:
        if self.plain is not None:
            self.plain.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.plain.wait(10)
        self.deployment.stop()


# -- revocation -> disconnect ------------------------------------------------------------------


async def revocations(deployment: Bench, count: int) -> dict[str, Any]:
    assert deployment.cluster is not None
    latencies: list[float] = []
    kicks: list[float] = []
    async with await open_registry(deployment.home.registry_db) as registry:
        for n in range(count):
            device_id = f"rv-{n}"
            node = deployment.cluster.nodes[1 + n % 2]  # never the node whose API the follower tries first
            context = client_context(deployment.home, deployment.creds[device_id])
            device, code = await open_device(node.mqtt_port, context, device_id)
            if code != 0:
                raise SystemExit(f"{device_id} refused ({code})")
            await asyncio.sleep(random.uniform(0.1, 0.3))
            await registry.revoke(device_id, RevocationReason.KEY_COMPROMISE, actor="bench")
            committed = time.monotonic()
            dropped = await asyncio.wait_for(device.lost, 30)
            latencies.append((dropped - committed) * 1000)
            for _ in range(100):
                kicked = [e for e in await registry.events(device_id=device_id) if e.kind == "rabbitmq.session.kicked"]
                if kicked:
                    kicks.append(float(kicked[0].data["ms"]))
                    break
                await asyncio.sleep(0.05)
    return {
        "revocations": count,
        "p50_ms": round(percentile(latencies, 0.5), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "follower_kick_api_p50_ms": round(percentile(kicks, 0.5), 1),
        "follower_kick_api_p99_ms": round(percentile(kicks, 0.99), 1),
        "goal_p99_ms": 2000,
    }


# -- connects: iotauth's HTTP backend against RabbitMQ's internal one ---------------------------


def use_backend(deployment: Bench, backend: str) -> None:
    """Switch every node's auth backend (and, for HTTP, which serve it calls) while the cluster runs."""
    assert deployment.cluster is not None
    base = deployment.plain_url if backend == "http-plain" else deployment.serve_url
    paths = ", ".join(f'application:set_env(rabbitmq_auth_backend_http, {kind}_path, "{base}/rabbitmq/{kind}")'
                      for kind in ("user", "vhost", "resource", "topic"))
    for node in deployment.cluster.nodes:
        deployment.cluster.eval(node.index, f"application:set_env(rabbit, auth_backends, {BACKENDS[backend]}), "
                                            f"{paths}.")


def internal_users(deployment: Bench, device_ids: list[str]) -> None:
    """Each device as an internal user without a password (certificate login), with full rights on '/'."""
    with deployment.deployment.management() as api:
        for device_id in device_ids:
            api.put(f"/api/users/{device_id}", json={"password_hash": "", "tags": ""}).raise_for_status()
            api.put(f"/api/permissions/%2F/{device_id}",
                    json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()


async def connect_round(deployment: Bench, device_ids: list[str], count: int, concurrency: int) -> dict[str, Any]:
    assert deployment.cluster is not None
    port = deployment.cluster.nodes[0].mqtt_port
    contexts = {d: client_context(deployment.home, deployment.creds[d]) for d in device_ids}
    beams = [psutil.Process(pid) for pid in deployment.cluster.beam_pids()]
    serves = deployment.serves()
    cpu = [_cpu(p) for p in beams]
    serve_cpu = sum(_cpu(p) for p in serves)
    failures = 0
    queue = list(range(count))
    latencies: list[float] = []

    async def worker(worker_id: int) -> None:
        nonlocal failures
        ids = device_ids[worker_id::concurrency]
        while queue:
            n = queue.pop()
            device_id = ids[n % len(ids)]
            opened = time.monotonic()
            device, code = await open_device(port, contexts[device_id], device_id)
            latencies.append((time.monotonic() - opened) * 1000)
            if code != 0:
                failures += 1
            device.write(b"\xe0\x00")  # DISCONNECT, then a clean close (abort would drop it unsent)
            if device.transport is not None:
                device.transport.close()
            await asyncio.sleep(0)

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - started
    spent = [_cpu(p) - before for p, before in zip(beams, cpu, strict=True)]
    return {
        "connects": count,
        "failures": failures,
        "connects_per_second": count / elapsed,
        "connect_p50_ms": percentile(latencies, 0.5),  # TCP + TLS + CONNECT -> CONNACK, as a device waits for it
        "connect_p99_ms": percentile(latencies, 0.99),
        "node1_cpu_ms_per_connect": spent[0] * 1000 / count,
        "cluster_cpu_ms_per_connect": sum(spent) * 1000 / count,
        "serve_cpu_ms_per_connect": (sum(_cpu(p) for p in serves) - serve_cpu) * 1000 / count,
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def connects(deployment: Bench, count: int, rounds: int, concurrency: int) -> dict[str, Any]:
    device_ids = [d for d, _ in deployment.devices if d.startswith("cb-")]
    internal_users(deployment, device_ids)
    results: dict[str, list[dict[str, Any]]] = {backend: [] for backend in BACKENDS}
    for backend in BACKENDS:  # warm-up, unmeasured
        await asyncio.to_thread(use_backend, deployment, backend)
        await connect_round(deployment, device_ids, 40, concurrency)
    for _ in range(rounds):
        for backend in BACKENDS:
            await asyncio.to_thread(use_backend, deployment, backend)
            results[backend].append(await connect_round(deployment, device_ids, count, concurrency))
    await asyncio.to_thread(use_backend, deployment, "http")
    summary: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds, "connects_per_round": count}
    for backend, runs in results.items():
        summary[backend] = {key: round(sum(r[key] for r in runs) / len(runs), 2) for key in runs[0]}
    internal = summary["internal"]
    for backend in ("http", "http-plain"):
        http = summary[backend]
        summary[f"{backend}_to_internal"] = {
            "connects_per_second": round(http["connects_per_second"] / internal["connects_per_second"], 3),
            "node1_cpu_per_connect": round(http["node1_cpu_ms_per_connect"] / internal["node1_cpu_ms_per_connect"], 3),
            "cluster_cpu_per_connect": round(
                http["cluster_cpu_ms_per_connect"] / internal["cluster_cpu_ms_per_connect"], 3
            ),
        }
    return summary


# -- serve's decision rate ------------------------------------------------------------------------


def decisions(deployment: Bench, seconds: int, connections: int) -> dict[str, Any]:
    devices = len([d for d, _ in deployment.devices if d.startswith("cb-")])
    results: dict[str, Any] = {"connections": connections, "seconds": seconds, "tls": True}
    context = ssl.create_default_context(cafile=str(deployment.home.chain_file))
    with httpx.Client(verify=context) as client:  # each body is a real decision: check what it answers
        results["answers"] = {name: client.post(f"{deployment.serve_url}/rabbitmq/{name}",
                                                content=body.replace("DEVICE", "cb-1"),
                                                headers={"content-type": "application/x-www-form-urlencoded"}).text
                              for name, body in BODIES.items()}
    for name, body in BODIES.items():
        script = deployment.root / f"{name}.lua"
        script.write_text(f'DEVICES = {devices}\nBODY = "{body}"\n{WRK_LUA}')
        results[name] = wrk(f"{deployment.serve_url}/rabbitmq/{name}", seconds, connections, script)
    return results


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    devices = [(f"rv-{n}", "default") for n in range(args.revocations)]
    devices += [(f"cb-{n}", "default") for n in range(max(8, args.concurrency * 4))]
    deployment = Bench(root, devices)
    try:
        await deployment.start()
        latency = await revocations(deployment, args.revocations)
        connect = await connects(deployment, args.connects, args.rounds, args.concurrency)
        rate = await asyncio.to_thread(decisions, deployment, args.seconds, args.connections)
    finally:
        deployment.stop()
    return {
        "benchmark": "cluster_auth",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rabbitmq": "3-node cluster on loopback, Debian rabbitmq-server 3.10.8, MQTT over TLS 1.3, crl_check = peer",
        "timings": deployment.deployment.timings,
        "revocation_to_disconnect": latency,
        "connect": connect,
        "serve_decisions": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="RabbitMQ cluster authorised by iotauth: latency, cost, rate")
    parser.add_argument("--revocations", type=int, default=40)
    parser.add_argument("--connects", type=int, default=300, help="connects per round and backend")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per endpoint")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    args = parser.parse_args()
    if not rabbitmq_available():
        sys.exit("error: this benchmark needs rabbitmq-server (apt-get install rabbitmq-server)")
    if shutil.which("wrk") is None:
        sys.exit("error: this benchmark needs wrk (apt-get install wrk)")
    root = Path(tempfile.mkdtemp(prefix="iotauth-cluster-bench-"))
    root.chmod(0o755)  # the nodes run as 'rabbitmq' and read the export under it
    result = asyncio.run(run(args, root))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
