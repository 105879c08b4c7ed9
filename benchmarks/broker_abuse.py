"""Broker under attack (issue 10): legitimate connects during floods, memory per pending connection, filters.

Prints one JSON document. ``iotauth broker`` runs as a subprocess with the defaults ``iotauth init`` writes;
attackers and devices run in this process, attackers from loopback aliases (127.0.0.2, 127.0.0.3: Linux
routes all of 127.0.0.0/8 to lo), devices from 127.0.0.1.

* ``attacks``: for each attack, ``--legit`` device connects from another source while it runs, against the
  no-attack baseline measured in the same run: success ratio (CONNACK 0 within 2 s) and latency p50/p99,
  plus the broker's RSS. Attacks: idle TCP sockets (``--idle`` per source, two sources); TLS sessions with
  valid certificates that never send CONNECT (``--silent`` per source, two sources); both at once.
* ``memory_per_pending_connection``: RSS growth per connection held in the handshake (idle TCP, spread over
  many sources so no cap refuses them) and per TLS session waiting for CONNECT.
* ``filters``: one device holding ``--filters`` subscriptions of its own; another device's delivery
  latency (publish -> receive, p50/p99) and broker CPU per message, against the same with no such filters.

Usage: python benchmarks/broker_abuse.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    BrokerUnderTest,
    Creds,
    LightDevice,
    client_context,
    machine,
    make_home,
    open_device,
    percentile,
    raise_file_limit,
    start_iotauth,
)

from iotauth.config import Home

PROFILES = """
[profiles.hoarder]
publish = ["hoard/{device_id}/#"]
subscribe = ["hoard/{device_id}/#"]

[profiles.hoarder.limits]
max_subscriptions = 300000
max_filters_per_subscribe = 1000
max_packet_size = 1048576
"""


# -- attackers -------------------------------------------------------------------------------


async def idle_sockets(port: int, source: str, count: int) -> list[socket.socket]:
    """Open ``count`` TCP connections that never send a byte (closed ones the broker refused are dropped)."""
    held = []
    loop = asyncio.get_running_loop()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), 5)
            held.append(sock)
        except (OSError, TimeoutError):
            sock.close()
    return held


async def silent_sessions(port: int, home: Home, creds: Creds, source: str, count: int) -> list[LightDevice]:
    """TLS sessions with a valid certificate that never send CONNECT."""
    loop = asyncio.get_running_loop()
    context = client_context(home, creds)
    sessions = []

    class Silent(LightDevice):
        def _step(self) -> None:  # finish the handshake, then say nothing
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError, OSError):
                self._ssl.do_handshake()
                self.handshaken = True
            self._flush()

    async def one() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            _, session = await asyncio.wait_for(loop.create_connection(
                lambda: Silent(context, creds.device_id), HOST, port, local_addr=(source, 0)), 5)
            sessions.append(session)

    for start in range(0, count, 64):
        await asyncio.gather(*(one() for _ in range(min(64, count - start))))
    return sessions


# -- measurements ----------------------------------------------------------------------------


async def legit_connects(port: int, home: Home, devices: list[Creds]) -> dict[str, Any]:
    latencies, ok = [], 0
    for creds in devices:
        started = time.perf_counter()
        device, code = await open_device(port, client_context(home, creds), creds.device_id, timeout=2.0)
        elapsed = time.perf_counter() - started
        if code == 0 and elapsed <= 2.0:
            ok += 1
            latencies.append(elapsed * 1000)
        device.close()
    return {"attempts": len(devices), "success_ratio": round(ok / len(devices), 4),
            "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1)}


async def measure_attacks(broker: BrokerUnderTest, home: Home, creds: dict[str, Creds], args: argparse.Namespace
                          ) -> dict[str, Any]:
    legit = [creds[f"legit-{n}"] for n in range(args.legit)]
    out: dict[str, Any] = {}
    base_rss = broker.rss()
    out["baseline"] = {**await legit_connects(broker.port, home, legit), "broker_rss_mib": round(base_rss / 2**20, 1)}
    plans = {
        "idle_tcp_two_sources": (args.idle, 0),
        "silent_tls_two_sources": (0, args.silent),
        "idle_tcp_and_silent_tls_two_sources": (args.idle, args.silent),
    }
    for name, (idle, silent) in plans.items():
        sockets: list[socket.socket] = []
        sessions: list[LightDevice] = []
        for source in ("127.0.0.2", "127.0.0.3"):
            sockets += await idle_sockets(broker.port, source, idle)
            sessions += await silent_sessions(broker.port, home, creds["attacker"], source, silent)
        peak = broker.rss()
        result = await legit_connects(broker.port, home, legit)
        peak = max(peak, broker.rss())
        out[name] = {**result, "attacker_sockets_opened": idle * 2, "attacker_tls_sessions_opened": silent * 2,
                     "broker_rss_mib_during": round(peak / 2**20, 1),
                     "success_ratio_over_baseline": round(result["success_ratio"] / out["baseline"]["success_ratio"],
                                                          4)}
        for sock in sockets:
            sock.close()
        for session in sessions:
            session.close()
        await asyncio.sleep(2.0)
    out["goal"] = ">= 0.99 of legitimate connects succeed, each within 2 s; broker memory bounded"
    return out


async def measure_pending_memory(home: Home, creds: dict[str, Creds], count: int) -> dict[str, Any]:
    """RSS growth per connection held in each pending phase, each phase on a fresh broker (no reused memory).

    Connections are spread over enough sources (50 each, under ``max_pending_per_address``) that every one
    is held by the broker, none waits in a queue and none is refused.
    """
    per_source = 50
    results: dict[str, Any] = {}
    for phase in ("idle_tcp_in_handshake", "tls_waiting_for_connect"):
        broker = start_iotauth(home)
        try:
            await asyncio.sleep(1.0)
            before = broker.rss()
            held: list[Any] = []
            for index in range(count // per_source):
                source = f"127.{10 + len(results)}.{index // 200}.{index % 200 + 1}"
                if phase == "idle_tcp_in_handshake":
                    held += await idle_sockets(broker.port, source, per_source)
                else:
                    held += await silent_sessions(broker.port, home, creds["attacker"], source, per_source)
            await asyncio.sleep(1.0)
            grown = broker.rss() - before
            results[phase] = {"held": len(held), "kib_each": round(grown / max(1, len(held)) / 1024, 1),
                              "broker_rss_mib": round(broker.rss() / 2**20, 1)}
            for item in held:
                item.close()
        finally:
            broker.stop()
    results["note"] = "RSS growth / connections held, each phase on a fresh broker"
    return results


async def delivery(port: int, home: Home, creds: dict[str, Creds], messages: int, broker: BrokerUnderTest
                   ) -> dict[str, float]:
    subscriber, code = await open_device(port, client_context(home, creds["filters-sub"]), "filters-sub")
    assert code == 0
    subscriber.subscribe("devices/filters-pub/telemetry/#", 0)
    publisher, code = await open_device(port, client_context(home, creds["filters-pub"]), "filters-pub")
    assert code == 0
    await asyncio.sleep(0.5)
    latencies: list[float] = []
    arrived: asyncio.Queue[float] = asyncio.Queue()
    subscriber.on_publish = lambda _body: arrived.put_nowait(time.perf_counter())
    for _ in range(messages):  # latency: one message at a time
        sent = time.perf_counter()
        publisher.publish("devices/filters-pub/telemetry/t", b"x" * 64)
        latencies.append((await asyncio.wait_for(arrived.get(), 10) - sent) * 1000)
    subscriber.on_publish = None
    burst, window = messages * 100, 200  # CPU: enough messages for the kernel's 10 ms CPU clock
    cpu, seen = broker.cpu(), subscriber.received
    for _ in range(burst // window):
        for _ in range(window):
            publisher.publish("devices/filters-pub/telemetry/t", b"x" * 64)
        target = seen + window
        while subscriber.received < target:  # noqa: ASYNC110 - polling the counter is the cheapest wait here
            await asyncio.sleep(0.001)
        seen = target
    used = broker.cpu() - cpu
    publisher.close()
    subscriber.close()
    return {"p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "cpu_us_per_message": used / burst * 1e6}


async def measure_filters(broker: BrokerUnderTest, home: Home, creds: dict[str, Creds], filters: int,
                          messages: int, runs: int = 3) -> dict[str, Any]:
    empty = [await delivery(broker.port, home, creds, messages, broker) for _ in range(runs)]
    hoarder, code = await open_device(broker.port, client_context(home, creds["hoarder"]), "hoarder")
    assert code == 0
    for start in range(0, filters, 1000):
        for index in range(start, min(start + 1000, filters), 100):
            body = b"".join(len(f).to_bytes(2, "big") + f + b"\x00"
                            for f in (f"hoard/hoarder/{n}".encode() for n in range(index, min(index + 100, filters))))
            payload = (index % 65535 + 1).to_bytes(2, "big") + body
            length, header = len(payload), bytearray([0x82])
            while True:
                byte, length = length % 128, length // 128
                header.append(byte | (0x80 if length else 0))
                if not length:
                    break
            hoarder.write(bytes(header) + payload)
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)
    hoarded = [await delivery(broker.port, home, creds, messages, broker) for _ in range(runs)]
    hoarder.close()
    await asyncio.sleep(1.0)
    after = [await delivery(broker.port, home, creds, messages, broker) for _ in range(runs)]

    def median(results: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in results), 3)

    out: dict[str, Any] = {"filters_held_by_one_device": filters, "messages_per_run": messages, "runs": runs}
    for label, results in (("no_filters", empty), ("with_filters", hoarded), ("after_hoarder_left", after)):
        out[label] = {k: median(results, k) for k in ("p50_ms", "p99_ms", "cpu_us_per_message")}
    out["ratio_latency_p50"] = round(out["with_filters"]["p50_ms"] / out["no_filters"]["p50_ms"], 3)
    out["ratio_cpu_per_message"] = round(out["with_filters"]["cpu_us_per_message"]
                                         / out["no_filters"]["cpu_us_per_message"], 3)
    out["goal_ratio"] = 1.5
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_file_limit()
    root = Path(tempfile.mkdtemp(prefix="iotauth-abuse-"))
    devices = [(f"legit-{n}", "default") for n in range(args.legit)] + [
        ("attacker", "default"), ("filters-sub", "ingest"), ("filters-pub", "default"), ("hoarder", "hoarder")]
    home, creds = await make_home(root, devices, PROFILES)
    try:
        pending = await measure_pending_memory(home, creds, args.pending)
        broker = start_iotauth(home)
        try:
            attacks = await measure_attacks(broker, home, creds, args)
            filters = await measure_filters(broker, home, creds, args.filters, args.messages)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "broker_abuse", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "attacks": attacks, "memory_per_pending_connection": pending, "filters": filters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=5000, help="idle TCP sockets per attacking source")
    parser.add_argument("--silent", type=int, default=1000, help="TLS sessions without CONNECT per source")
    parser.add_argument("--legit", type=int, default=200, help="legitimate connects measured per attack")
    parser.add_argument("--pending", type=int, default=2000, help="connections held for the memory figure")
    parser.add_argument("--filters", type=int, default=200_000)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.idle, args.silent, args.legit, args.pending, args.filters, args.messages = 500, 100, 30, 300, 5000, 100
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
