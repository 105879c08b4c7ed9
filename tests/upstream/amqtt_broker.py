"""Run an amqtt ``Broker`` from whichever amqtt package comes first on ``PYTHONPATH`` (a stock or patched copy).

    PYTHONPATH=<copy>:<repo> python tests/upstream/amqtt_broker.py '<plugins as JSON>' ['<listener as JSON>']

One TCP listener on an ephemeral loopback port (TLS if the listener options say ``"ssl": true``).
Prints ``{"port": N, "amqtt": "<path of the amqtt package>"}`` once it listens, and shuts the broker
down when its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import amqtt
from amqtt.broker import Broker


async def main() -> None:
    plugins = json.loads(sys.argv[1])
    listener = {"type": "tcp", **(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}), "bind": "127.0.0.1:0"}
    broker = Broker({"listeners": {"default": listener}, "plugins": plugins})
    await broker.start()
    port = broker._servers["default"].instance.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, "amqtt": amqtt.__file__}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await broker.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
