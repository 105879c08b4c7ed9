"""Revocation push to EMQX, iotauth's side: registry commit -> ban and kick requests at EMQX's REST API.

No EMQX runs here. ``iotauth serve`` (a subprocess, SQLite registry, plain HTTP)
pushes to the EMQX REST contract server of the test suite
(``tests/fixtures/emqx_api.py``, every answer transcribed from EMQX's source).
For each revocation the benchmark records when ``Registry.revoke`` was called
and when the server received the ban (which in EMQX kicks the session,
``emqx_banned:on_banned/1``) and the kick. What EMQX itself adds (its RPC to
the node holding the session) is not measured and not included.

Prints JSON: p50/p99 of revocation -> ban and revocation -> kick, in ms.

Usage: python benchmarks/emqx_push.py [--revocations N] [--gap SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import free_port, machine, make_home, percentile

from iotauth.registry import RevocationReason, open_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the contract server lives with the tests
from tests.fixtures.emqx_api import EmqxApi, EmqxApiServer


async def run(revocations: int, gap: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="iotauth-emqx-push-"))
    devices = [f"dev-{n}" for n in range(revocations)]
    home, _ = await make_home(root, [(d, "default") for d in devices])
    api = EmqxApiServer(EmqxApi(free_port()))
    api.api.connected |= set(devices)
    api.start()
    config = home.config_file.read_text()
    config = config.replace('# base_url = "http://emqx:18083"', f'base_url = "{api.url}"')
    home.config_file.write_text(config.replace('# api_key = "iotauth"', 'api_key = "iotauth-key"'))
    port = free_port()
    env = {**os.environ, "IOTAUTH_EMQX_API_SECRET": "s3cret"}
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iotauth.cli.main", "--home", str(home.root), "serve", "--no-tls",
        "--bind", f"127.0.0.1:{port}", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    ban_ms: list[float] = []
    kick_ms: list[float] = []
    try:
        async with await open_registry(home.registry_db) as registry:
            while await registry.follower_cursor("push:emqx") is None:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
            for device in devices:
                await asyncio.sleep(gap)
                start = time.monotonic()
                await registry.revoke(device, RevocationReason.KEY_COMPROMISE, actor="bench")
                kick = f"DELETE /api/v5/clients/{device}"
                while not any(c.method + " " + c.path == kick for c in api.api.calls):  # noqa: ASYNC110 - a thread
                    await asyncio.sleep(0.002)
                calls = {c.method + " " + c.path: c.at for c in api.api.calls if device in c.path
                         or (c.method == "POST" and isinstance(c.body, dict) and c.body.get("who") == device)}
                ban_ms.append((calls["POST /api/v5/banned"] - start) * 1000)
                kick_ms.append((calls[kick] - start) * 1000)
    finally:
        serve.terminate()
        await asyncio.wait_for(serve.wait(), 20)
        api.stop()
    return {
        "benchmark": "emqx_push",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "registry": "sqlite (polled every 0.2 s)",
        "revocations": revocations,
        "revocation_to_ban_ms": {"p50": round(percentile(ban_ms, 0.5), 1), "p99": round(percentile(ban_ms, 0.99), 1)},
        "revocation_to_kick_ms": {"p50": round(percentile(kick_ms, 0.5), 1),
                                  "p99": round(percentile(kick_ms, 0.99), 1)},
        "note": "iotauth's side only, against EMQX's REST contract; EMQX's own kick RPC is not included",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between revocations")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.revocations, args.gap)), indent=2))


if __name__ == "__main__":
    main()
