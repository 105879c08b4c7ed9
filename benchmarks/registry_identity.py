"""What checking the registry's identity costs a follower of the change feed, side by side with the poll itself.

Every poll of the broker's feed follower (and every 0.25 s in ``iotauth serve``) now asks
``Registry.ensure_identity()`` whether the SQLite file is still the one open (a stat of the path and one
indexed read of the instance id) before reading new events (one indexed range query). This prints the CPU
and wall time of each, per call, measured in one run on one registry with ``--events`` events.

    python benchmarks/registry_identity.py [--events 10000] [--calls 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from iotauth.registry import open_registry


async def measure(calls: int, work: Callable[[], Awaitable[object]]) -> dict[str, float]:
    for _ in range(100):  # warm up
        await work()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await work()
    return {"wall_us": round((time.perf_counter() - wall) / calls * 1e6, 1),
            "cpu_us": round((time.process_time() - cpu) / calls * 1e6, 1)}


async def main(events: int, calls: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "registry.db"
        async with await open_registry(path, create=True) as registry:
            for start in range(0, events, 500):
                await asyncio.gather(*[registry.record_event("broker.started", actor="bench")
                                       for _ in range(min(500, events - start))])
            last = await registry.last_event_id()
            poll = await measure(calls, lambda: registry.events(after_id=last, limit=1000))
            identity = await measure(calls, registry.ensure_identity)
    return {"events": events, "calls": calls, "feed_poll": poll, "identity_check": identity,
            "identity_over_poll_cpu": round(identity["cpu_us"] / poll["cpu_us"], 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=5_000)
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(main(arguments.events, arguments.calls)), indent=2))
