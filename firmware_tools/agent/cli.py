"""``python -m firmware_tools.agent``: renew once, stay connected and renew when ordered or due, or show the state."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from firmware_tools.agent.journal import CRASH_POINTS, AgentError, StateDir
from firmware_tools.agent.rotation import CERTIFICATE_REFUSED, Agent
from firmware_tools.agent.session import Session, describe
from firmware_tools.backoff import Outcome, outcome_of
from iotauth.errors import RotationMessageError
from iotauth.rotation import messages


def ordered(state: StateDir, topic: str, payload: bytes) -> bool:
    """Whether a message is an operator's order to renew *this* certificate (``devices/<id>/commands/rotate``).

    The order is retained and names the serial it was made for: once the
    device renewed, a copy still held by the broker names the old serial and
    is ignored. An empty payload clears the order.
    """
    if topic != messages.command_topic(state.device_id) or not payload:
        return False
    try:
        order = messages.decode_order(payload)
    except RotationMessageError:
        return False
    return order.serial == format(state.live.cert().serial_number, "x")


def due_at(cert: x509.Certificate, fraction: float) -> float | None:
    """When (POSIX time) the device renews on its own: ``fraction`` of the validity (None: only when ordered)."""
    if fraction <= 0:
        return None
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return start + (end - start) * fraction


def run_forever(agent: Agent, renew_at: float, max_rounds: int | None = None) -> int:
    """Keep a session up (reference backoff); renew on an order naming the current certificate, or when due."""
    state, rounds = agent.state, 0
    with contextlib.suppress(AgentError):
        if state.journal():
            agent.renew()
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        opened = agent.open(state.live)
        if not isinstance(opened, Session):
            if opened in CERTIFICATE_REFUSED and state.journal():  # a renewal a crash left half done: finish it
                with contextlib.suppress(AgentError):
                    agent.renew()
                    continue
            delay = agent.backoff.delay(outcome_of(opened))
            agent.log(f"cannot connect ({describe(opened)}); retrying in {delay:.1f} s")
            time.sleep(delay)
            continue
        agent.backoff.delay(Outcome.CONNECTED)
        session = opened
        session.subscribe(messages.command_topic(state.device_id))
        due = due_at(state.live.cert(), renew_at)
        while not session.closed:
            message = session.next_message(1.0)
            order = message is not None and ordered(state, message.topic, bytes(message.payload))
            if order or (due is not None and time.time() >= due):
                try:
                    serial = agent.renew(session)
                    agent.log(f"renewed: now {serial}")
                except AgentError as exc:
                    agent.log(f"renewal refused: {exc.code} ({exc})")
                    due = time.time() + (exc.retry_after or 3600)
                    continue
                break  # the session was replaced: reconnect with the new identity
        session.close()
    return 0


def status(state: StateDir) -> dict[str, Any]:
    cert = state.live.cert()
    return {"device_id": state.device_id, "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(), "rotation": state.journal() or None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_tools.agent",
                                     description="The reference device agent for certificate rotation over MQTT.")
    parser.add_argument("--state", type=Path, required=True, help="the device's state directory")
    parser.add_argument("--host", help="override config.json's broker host")
    parser.add_argument("--port", type=int, help="override config.json's broker port")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--renew-at", type=float, default=0.7,
                        help="run: renew on its own after this fraction of the validity (0: only when ordered)")
    parser.add_argument("--crash-at", choices=CRASH_POINTS, help="testing: die with SIGKILL at this step")
    parser.add_argument("command", choices=("renew", "run", "status"))
    args = parser.parse_args(argv)
    try:
        state = StateDir(args.state, args.crash_at)
        if args.command == "status":
            print(json.dumps(status(state), indent=2))
            return 0
        agent = Agent(state, host=args.host, port=args.port, answer_timeout=args.timeout, attempts=args.attempts)
        if args.command == "run":
            return run_forever(agent, args.renew_at)
        serial = agent.renew()
    except AgentError as exc:
        hint = f"; retry after {exc.retry_after} s" if exc.retry_after else ""
        print(f"error: {exc.code}: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"device_id": state.device_id, "serial": serial}))
    return 0
