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
``pong`` on ``devices/<id>/state``; others are printed.

Reconnecting follows the reference policy every device should follow
(:mod:`firmware_tools.backoff`): exponential backoff with full jitter, longer
after "server busy" (CONNACK 0x03, or closed before CONNACK), so a fleet that
comes back after an outage spreads itself out. A refusal that retrying cannot
fix (CONNACK 0x05, not authorised: the device was revoked or suspended) ends
the program with exit code 1 and a clear message.
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

from firmware_tools.backoff import Backoff, Outcome, outcome_of

V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}  # paho reports 3.1.1 CONNACK codes as MQTT 5 reasons
CONNACK_MEANING = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                   4: "bad user name or password", 5: "not authorised"}


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


class Session:
    """One device's connection, kept up with the reference backoff."""

    def __init__(self, client: mqtt.Client, host: str, port: int, backoff: Backoff, attempts: int) -> None:
        self.client, self.host, self.port = client, host, port
        self.backoff, self.attempts = backoff, attempts
        self.answer: list[int | None] = []
        self.answered = threading.Event()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.answer.append(V5_TO_V311.get(reason.value, reason.value))
        self.answered.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not self.answered.is_set():  # closed before any CONNACK: admission control, or a busy server
            self.answer.append(None)
            self.answered.set()
        elif reason.is_failure:
            print(f"disconnected by the broker: {reason}", flush=True)

    def up(self) -> str | None:
        """Connect (again); ``None`` once connected, else why it gave up."""
        for _ in range(self.attempts):
            self.answer.clear()
            self.answered.clear()
            try:
                self.client.connect(self.host, self.port, keepalive=30)
                self.client.loop_start()
                code = self.answer[0] if self.answered.wait(15) else None
            except (OSError, ssl.SSLError) as exc:
                outcome, detail = Outcome.NETWORK, f"cannot connect to {self.host}:{self.port}: {exc}"
            else:
                meaning = CONNACK_MEANING.get(code or 0, "unknown return code")
                outcome, detail = outcome_of(code), f"the broker refused the connection: {meaning} (CONNACK {code})"
                if code is None:
                    detail = "the connection closed before CONNACK (server busy, or a TLS failure)"
            if outcome is Outcome.CONNECTED:
                self.backoff.delay(outcome)
                return None
            self.client.loop_stop()
            if outcome is Outcome.REFUSED:
                return detail  # revoked, suspended or unknown: retrying soon will not change that
            delay = self.backoff.delay(outcome)
            print(f"{detail}; retrying in {delay:.1f} s", flush=True)
            time.sleep(delay)
        return f"gave up after {self.attempts} attempts"

    def down(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="iotauth example sensor (paho-mqtt over mTLS)")
    parser.add_argument("--state", type=Path, required=True, help="the device's flash directory")
    parser.add_argument("--host", help="override the broker host from config.json")
    parser.add_argument("--port", type=int, help="override the broker port from config.json")
    parser.add_argument("--count", type=int, default=10, help="telemetry messages to send")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--linger", type=float, default=2.0, help="seconds to keep listening for commands at the end")
    parser.add_argument("--attempts", type=int, default=10, help="connection attempts before giving up")
    parser.add_argument("--backoff-base", type=float, default=1.0, help="first backoff ceiling in seconds")
    args = parser.parse_args()

    config = load_identity(args.state)
    device_id = config["device_id"]
    host, port = args.host or config["broker_host"], args.port or config["broker_port"]

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    client.tls_set(
        ca_certs=str(args.state / "ca.pem"),
        certfile=str(args.state / "fullchain.pem"),
        keyfile=str(args.state / "key.pem"),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    session = Session(client, host, port, Backoff(base=args.backoff_base), args.attempts)

    def on_message(client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = message.topic.rsplit("/", 1)[-1]
        print(f"command {command}: {message.payload.decode(errors='replace')}", flush=True)
        if command == "ping":
            client.publish(f"devices/{device_id}/state", "pong", qos=1)

    client.on_message = on_message
    try:
        for n in range(args.count + 1):
            if not client.is_connected():
                failure = session.up()
                if failure is not None:
                    print(f"error: {failure}", file=sys.stderr)
                    return 1
                client.subscribe(f"devices/{device_id}/commands/#", qos=1)
                print(f"connected to {host}:{port} as {device_id}", flush=True)
            if n == args.count:
                break
            reading = {"seq": n, "celsius": round(21.0 + 2.0 * math.sin(n / 3), 2), "ts": time.time()}
            client.publish(f"devices/{device_id}/telemetry/temperature", json.dumps(reading), qos=1).wait_for_publish(
                10
            )
            time.sleep(args.interval)
        time.sleep(args.linger)
    finally:
        session.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
