"""HTTP authorizer benchmark (issue 6): EMQX authorization decisions per second.

One ``iotauth serve`` application (the real one, plus a bare Starlette
"hello" route for reference) runs in a child process under uvicorn, plain
HTTP on loopback, one worker. ``wrk`` (Debian package) drives it with
keep-alive connections, first the bare endpoint, then the authorizer, in the
same run. Each authorizer request is a full decision: one registry read for
the device's status and profile, the policy engine's answer.

Prints JSON: requests/s for both, the ratio, and p50/p99 latency from wrk.

Usage: python benchmarks/authorizer.py [--devices N] [--seconds S] [--connections C]
(needs ``wrk``: apt-get install wrk)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local id = "dev-" .. (n % DEVICES)
  local body = '{"clientid":"' .. id .. '","action":"publish","topic":"devices/' .. id .. '/telemetry/t"}'
  return wrk.format(nil, nil, nil, body)
end
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _prepare(home_dir: Path, devices: int) -> None:
    from cryptography import x509

    from iotauth.authority import open_authority
    from iotauth.bootstrap import initialise_home
    from iotauth.config import Home
    from iotauth.pki.keys import generate_private_key
    from iotauth.registry import open_registry

    home = Home(home_dir)
    await initialise_home(home, "bench.test", ["localhost"], passphrase=None, actor="bench")
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        profile = authority.settings.profile("default")
        certs = [
            authority.ca.issue_for_key(generate_private_key().public_key(), f"dev-{n}", profile) for n in range(devices)
        ]
        await asyncio.gather(
            *[
                registry.record_issuance(c, device_id=f"dev-{n}", profile="default", activate=True, actor="bench")
                for n, c in enumerate(certs)
            ]
        )
    del x509


def serve(home_dir: str, port: int) -> None:
    """Child process: the real app plus /hello, under uvicorn like 'iotauth serve --no-tls'."""
    import uvicorn
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from iotauth.config import Home, load_settings
    from iotauth.http.server import ServeOptions, build_app
    from iotauth.registry import open_registry

    async def main() -> None:
        home = Home(Path(home_dir))
        async with await open_registry(home.registry_db) as registry:
            app = await build_app(home, registry, load_settings(home), ServeOptions(tls=False))

            async def hello(_request: object) -> PlainTextResponse:
                return PlainTextResponse("hello")

            app.router.routes.append(Route("/hello", hello))
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="error",
                lifespan="off",
                access_log=False,
                timeout_keep_alive=30,
            )
            await uvicorn.Server(config).serve()

    asyncio.run(main())


def _wrk(url: str, seconds: int, connections: int, script: Path | None) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script is not None:
        args[1:1] = ["-s", str(script)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_second": rate,
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def _ms(text: str) -> float:
    value, unit = float(re.match(r"[\d.]+", text).group(0)), re.sub(r"[\d.]+", "", text)  # type: ignore[union-attr]
    return round(value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description="EMQX authorizer decisions/s vs a bare endpoint")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if shutil.which("wrk") is None:
        sys.exit("error: this benchmark needs wrk (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="iotauth-authz-"))
    asyncio.run(_prepare(work / "home", args.devices))
    script = work / "authz.lua"
    script.write_text(f"DEVICES = {args.devices}\n{LUA}")
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(work / "home"), str(port)])
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        _wrk(f"{base}/hello", 2, args.connections, None)  # warm-up
        hello = _wrk(f"{base}/hello", args.seconds, args.connections, None)
        authz = _wrk(f"{base}/emqx/authz", args.seconds, args.connections, script)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(
        json.dumps(
            {
                "benchmark": "authorizer",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus python {platform.python_version()}",
                "devices": args.devices,
                "connections": args.connections,
                "hello": hello,
                "emqx_authz": authz,
                "ratio_authz_to_hello": round(authz["requests_per_second"] / hello["requests_per_second"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
