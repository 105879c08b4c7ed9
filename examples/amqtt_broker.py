"""Run iotauth's broker from an amqtt YAML configuration (yours, with iotauth's plugin in it).

    python examples/amqtt_broker.py examples/amqtt_config.yaml [--bind HOST:PORT]

Uses :class:`iotauth.broker.IotAuthBroker` (amqtt's Broker behind iotauth's gate), never
``amqtt.broker.Broker``: under a stock broker the plugin fails closed. ``iotauth broker`` itself
runs iotauth's own engine; this is for configurations that need amqtt's plugins.
Prints the listening addresses as one JSON line, runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import yaml

from iotauth.broker.amqtt_host import serve
from iotauth.errors import IotAuthError

PLUGIN = "iotauth.broker.IotAuthPlugin"


def main() -> int:
    parser = argparse.ArgumentParser(description="Run an amqtt configuration that uses iotauth's plugin.")
    parser.add_argument("config", type=Path)
    parser.add_argument("--bind", help="override the plugin's bind (HOST:PORT)")
    args = parser.parse_args()
    try:
        config = yaml.safe_load(args.config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: cannot read {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.bind:
        config["plugins"][PLUGIN]["bind"] = args.bind

    def started(state: object) -> None:
        addresses = getattr(state, "addresses", {})
        print(json.dumps({name: f"{host}:{port}" for name, (host, port) in addresses.items()}), flush=True)

    try:
        asyncio.run(serve(config, on_started=started))
    except IotAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
