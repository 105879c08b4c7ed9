"""A device client: connect with the credentials the station wrote, publish telemetry, obey commands, renew.

    python examples/sensor.py --state DEVICE_STATE_DIR [--count 10] [--interval 1] [--linger 5] [--renew-at 0.7]

DEVICE_STATE_DIR is the device's flash as the emulator keeps it
(``python -m firmware_tools.emulator --state DIR``): ``key.pem``,
``fullchain.pem`` (device certificate + issuing CA), ``ca.pem`` (the trust
anchor for the broker) and ``config.json`` (device id, broker host and port),
all written during provisioning. Real firmware does the same with its own
MQTT stack.

Telemetry goes to ``devices/<id>/telemetry/temperature``; commands arrive on
``devices/<id>/commands/<name>``. A ``ping`` command is answered with
``pong`` on ``devices/<id>/state``; others are printed.

Certificate rotation uses the reference agent (:mod:`firmware_tools.agent`,
PROTOCOL.md part 2) on the same state directory. The sensor renews when an
operator orders it (``iotauth rotate``: a retained order on
``devices/<id>/commands/rotate`` naming its current certificate) or on its
own once ``--renew-at`` of its certificate's validity has passed (0: only
when ordered). It then closes its session, lets the agent renew (the agent
keeps the old key until the new certificate is active; a renewal a power cut
interrupted is finished at the next start), and reconnects with whatever
identity the state directory holds. A refused renewal is printed with its
code and tried again later; telemetry goes on with the old certificate.

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

from firmware_tools.agent import Agent, AgentError, StateDir, due_at, ordered
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


class Sensor:
    """The device: its MQTT client (made again after each renewal: paho loads the certificate once) and its loop."""

    def __init__(self, args: argparse.Namespace, config: dict[str, Any]) -> None:
        self.args = args
        self.device_id = str(config["device_id"])
        self.host = args.host or config["broker_host"]
        self.port = args.port or config["broker_port"]
        self.rotate = threading.Event()  # an operator's order for the current certificate arrived
        self.backoff = Backoff(base=args.backoff_base)
        self.client, self.session = self._connectable()
        self.retry_renewal_at = 0.0

    def _connectable(self) -> tuple[mqtt.Client, Session]:
        state = self.args.state
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv311,
                             reconnect_on_failure=False)
        client.tls_set(
            ca_certs=str(state / "ca.pem"),
            certfile=str(state / "fullchain.pem"),
            keyfile=str(state / "key.pem"),
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.on_message = self.on_message
        return client, Session(client, self.host, self.port, self.backoff, self.args.attempts)

    def on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = message.topic.rsplit("/", 1)[-1]
        if command == "rotate":
            if ordered(StateDir(self.args.state), message.topic, bytes(message.payload)):
                print("command rotate: the operator orders a renewal", flush=True)
                self.rotate.set()
            return  # a cleared order, or one for a certificate this device no longer uses
        print(f"command {command}: {message.payload.decode(errors='replace')}", flush=True)
        if command == "ping":
            client.publish(f"devices/{self.device_id}/state", "pong", qos=1)

    def renewal_due(self) -> bool:
        if self.rotate.is_set():
            return True
        cert = StateDir(self.args.state).live.cert()
        due = due_at(cert, self.args.renew_at)
        return due is not None and time.time() >= max(due, self.retry_renewal_at)

    def renew(self) -> None:
        """Close the session, let the agent renew on the state directory, and make a client for what it holds."""
        self.rotate.clear()
        if self.client.is_connected():
            self.session.down()
        agent = Agent(StateDir(self.args.state), host=self.host, port=self.port,
                      log=lambda text: print(f"rotation: {text}", flush=True))
        try:
            print(f"renewed: now {agent.renew()}", flush=True)
        except AgentError as exc:
            print(f"renewal refused: {exc.code} ({exc})", flush=True)
            self.retry_renewal_at = time.time() + (exc.retry_after or 3600)
        self.client, self.session = self._connectable()

    def connect(self) -> str | None:
        failure = self.session.up()
        if failure is None:
            self.client.subscribe(f"devices/{self.device_id}/commands/#", qos=1)
            print(f"connected to {self.host}:{self.port} as {self.device_id}", flush=True)
        return failure

    def run(self) -> int:
        if StateDir(self.args.state).journal():  # a renewal a power cut interrupted: finish it first
            self.renew()
        try:
            for n in range(self.args.count + 1):
                if self.renewal_due():
                    self.renew()
                if not self.client.is_connected():
                    failure = self.connect()
                    if failure is not None:
                        print(f"error: {failure}", file=sys.stderr)
                        return 1
                if n == self.args.count:
                    break
                reading = {"seq": n, "celsius": round(21.0 + 2.0 * math.sin(n / 3), 2), "ts": time.time()}
                self.client.publish(f"devices/{self.device_id}/telemetry/temperature", json.dumps(reading),
                                    qos=1).wait_for_publish(10)
                time.sleep(self.args.interval)
            time.sleep(self.args.linger)
        finally:
            self.session.down()
        return 0


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
    parser.add_argument("--renew-at", type=float, default=0.7,
                        help="renew on its own after this fraction of the certificate's validity (0: only when "
                             "an operator orders it)")
    args = parser.parse_args()
    try:
        return Sensor(args, load_identity(args.state)).run()
    except AgentError as exc:  # the state directory itself is unusable
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
