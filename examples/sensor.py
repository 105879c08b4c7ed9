"""A device client: connect with the credentials the station wrote, publish telemetry, obey commands.

    python examples/sensor.py --state DEVICE_STATE_DIR [--count 10] [--interval 1] [--linger 5]

DEVICE_STATE_DIR is the device's flash as the emulator keeps it
(``python -m firmware_tools.emulator --state DIR``): ``key.pem``,
``fullchain.pem`` (device certificate + issuing CA), ``ca.pem`` (the trust
anchor for the broker) and ``config.json`` (device id, broker host and port),
all written during provisioning. Real firmware does the same with its own
MQTT stack.

Telemetry goes to ``devices/<id>/telemetry/temperature``; commands arrive on
``devices/<id>/commands/<name>``. A ``ping`` command is answered with
``pong`` on ``devices/<id>/state``; others are printed. Exits 1 with a clear
message if the broker refuses the connection (for example after revocation).
"""

from __future__ import annotations

import argparse
import json
import math
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def load_identity(state: Path) -> dict[str, Any]:
    try:
        config = json.loads((state / "config.json").read_text())
    except (OSError, ValueError) as exc:
        message = f"error: {state} holds no provisioned config.json ({exc}); provision the device first"
        raise SystemExit(message) from exc
    for name in ("key.pem", "fullchain.pem", "ca.pem"):
        if not (state / name).exists():
            raise SystemExit(f"error: {state / name} is missing; provision the device first")
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description="iotauth example sensor (paho-mqtt over mTLS)")
    parser.add_argument("--state", type=Path, required=True, help="the device's flash directory")
    parser.add_argument("--host", help="override the broker host from config.json")
    parser.add_argument("--port", type=int, help="override the broker port from config.json")
    parser.add_argument("--count", type=int, default=10, help="telemetry messages to send")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--linger", type=float, default=2.0, help="seconds to keep listening for commands at the end")
    args = parser.parse_args()

    config = load_identity(args.state)
    device_id = config["device_id"]
    host, port = args.host or config["broker_host"], args.port or config["broker_port"]
    connected = threading.Event()
    refused: list[str] = []

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.tls_set(
        ca_certs=str(args.state / "ca.pem"),
        certfile=str(args.state / "fullchain.pem"),
        keyfile=str(args.state / "key.pem"),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )

    def on_connect(client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            connected.set()
            return
        client.subscribe(f"devices/{device_id}/commands/#", qos=1)
        print(f"connected to {host}:{port} as {device_id}", flush=True)
        connected.set()

    def on_message(client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = message.topic.rsplit("/", 1)[-1]
        print(f"command {command}: {message.payload.decode(errors='replace')}", flush=True)
        if command == "ping":
            client.publish(f"devices/{device_id}/state", "pong", qos=1)

    def on_disconnect(_client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            print(f"disconnected by the broker: {reason}", flush=True)

    client.on_connect, client.on_message, client.on_disconnect = on_connect, on_message, on_disconnect
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        if not connected.wait(15) or refused:
            print(
                f"error: the broker refused the connection: {refused[0] if refused else 'no answer'}", file=sys.stderr
            )
            return 1
        for n in range(args.count):
            reading = {"seq": n, "celsius": round(21.0 + 2.0 * math.sin(n / 3), 2), "ts": time.time()}
            client.publish(f"devices/{device_id}/telemetry/temperature", json.dumps(reading), qos=1).wait_for_publish(
                10
            )
            time.sleep(args.interval)
        time.sleep(args.linger)
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
