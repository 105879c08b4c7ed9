"""The reference device agent for certificate rotation over MQTT (PROTOCOL.md part 2).

    python -m firmware_tools.agent --state DIR renew     # renew once: exit 0, or non-zero with the reason
    python -m firmware_tools.agent --state DIR run       # stay connected; renew when ordered or when due
    python -m firmware_tools.agent --state DIR status    # what the state directory holds (JSON)

``DIR`` is the device's state directory as the emulator and the station leave
it: ``key.pem``, ``cert.pem``, ``chain.pem``, ``fullchain.pem``, ``ca.pem`` and
``config.json`` (device id, broker host and port). The agent keeps the old key
and certificate until the new ones have worked, in a journal whose every
write is atomic (temporary file, fsync, rename, fsync of the directory):

``rotation.json`` state   files that exist besides the live ones
``keyed``                 ``next-key.pem`` (the new key, never sent anywhere)
``requested``             + the request's id and time (a retry sends a new request for the same key)
``issued``                + ``next-cert.pem``, ``next-chain.pem``, ``next-fullchain.pem``
``confirmed``             the confirmation (signed by the new key) was sent
``switched``              a CONNACK 0 with the new certificate: live files replaced by the new ones
                          (the old kept as ``previous-*`` until the replacement is complete)

Killed at any point and restarted, it resumes from the journal. Until the
new certificate has been accepted it connects with the old one (which stays
valid until the renewal is activated); once the renewal is active, with the
new one. If one of them is refused it tries the other, so a crash between the
registry's activation and the files' promotion never leaves it without a
working identity.

The broker address comes from ``config.json``; reconnects follow the
reference backoff (:mod:`firmware_tools.backoff`). Real firmware implements
the same journal with its own MQTT stack; the messages are
:mod:`iotauth.rotation.messages`, byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from paho.mqtt.enums import CallbackAPIVersion

from firmware_tools.backoff import Backoff, Outcome, outcome_of
from iotauth.errors import RefusalCode, RotationMessageError
from iotauth.rotation import messages

V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
JOURNAL = "rotation.json"
LIVE = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem")
RETRY_CODES = frozenset({RefusalCode.REPLAYED, RefusalCode.STALE, RefusalCode.INTERNAL})
EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_STATE = 1, 2, 3
CRASH_POINTS = ("keyed", "requested", "published", "issued", "confirmed", "confirm-sent", "activated", "switched",
                "promoting", "promoted")
"""Where ``--crash-at`` kills the agent with SIGKILL (a power cut at that step), for the crash tests."""


class AgentError(Exception):
    """The renewal did not complete; ``code`` is the protocol's refusal code or the agent's own reason."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_REFUSED, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code, self.exit_code, self.retry_after = code, exit_code, retry_after


# -- files -------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` so that a crash leaves either the old or the new content: temp, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if paths:
        _fsync_dir(paths[0].parent)


def load_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def new_key_like(key: PrivateKeyTypes) -> PrivateKeyTypes:
    """A fresh key of the same type as the current one (the profile allowed that type)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(key.curve)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ed25519.Ed25519PrivateKey.generate()
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=max(2048, key.key_size))
    raise AgentError("bad-state", f"unsupported key type {type(key).__name__}", EXIT_STATE)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Identity:
    """One key and certificate chain, as files paho can load."""

    name: str
    key: Path
    fullchain: Path

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.fullchain.read_bytes())


class StateDir:
    """The device's state directory and its rotation journal."""

    def __init__(self, root: Path, crash_at: str | None = None) -> None:
        self.root = root
        self.crash_at = crash_at
        try:
            self.config = json.loads((root / "config.json").read_text())
            self.device_id = str(self.config["device_id"])
        except (OSError, ValueError, KeyError) as exc:
            raise AgentError("not-provisioned", f"{root} holds no provisioned config.json ({exc})", EXIT_STATE) from exc
        for name in ("key.pem", "fullchain.pem", "ca.pem"):
            if not (root / name).exists():
                raise AgentError("not-provisioned", f"{root / name} is missing; provision the device first", EXIT_STATE)
        self.live = Identity("current", root / "key.pem", root / "fullchain.pem")
        self.next = Identity("new", root / "next-key.pem", root / "next-fullchain.pem")

    def path(self, name: str) -> Path:
        return self.root / name

    def crash(self, point: str) -> None:
        """Die here, as a power cut would, if ``--crash-at`` names this point (the crash tests)."""
        if point == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def journal(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path(JOURNAL).read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # only a write that never completed could leave this; the rename makes that impossible
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, **state: Any) -> dict[str, Any]:
        journal = {**self.journal(), **state}
        write_atomic(self.path(JOURNAL), json.dumps(journal, sort_keys=True).encode(), 0o600)
        return journal

    def reset(self) -> None:
        """Forget an unfinished rotation (the live identity is untouched)."""
        _remove(*(self.path(f"next-{n}") for n in LIVE), self.path(JOURNAL))

    def promote(self) -> None:
        """Make the new files the live ones (idempotent: a crash in the middle is finished by the next call)."""
        self.record(state="switched")
        self.crash("switched")
        new_fp = messages.certificate_sha256(self.next.cert()) if self.next.fullchain.exists() else None
        live_fp = messages.certificate_sha256(self.live.cert())
        for name in LIVE:
            keep = self.path(f"previous-{name}")
            if live_fp != new_fp and not keep.exists() and self.path(name).exists():
                write_atomic(keep, self.path(name).read_bytes(), 0o600)
        for name in LIVE:
            source = self.path(f"next-{name}")
            if source.exists():
                write_atomic(self.path(name), source.read_bytes(), 0o600 if name == "key.pem" else 0o644)
                self.crash("promoting")  # the live key replaced, the live certificate not yet
        self.crash("promoted")
        _remove(*(self.path(f"next-{n}") for n in LIVE), *(self.path(f"previous-{n}") for n in LIVE))
        _remove(self.path(JOURNAL))


# -- one MQTT session --------------------------------------------------------------------------


class Session:
    """A paho-mqtt 3.1.1 session over TLS with one identity; messages arrive in a queue."""

    def __init__(self, state: StateDir, identity: Identity, host: str, port: int) -> None:
        self.state, self.identity = state, identity
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=state.device_id, protocol=mqtt.MQTTv311,
                                  clean_session=True, reconnect_on_failure=False)
        self.client.tls_set(ca_certs=str(state.path("ca.pem")), certfile=str(identity.fullchain),
                            keyfile=str(identity.key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.host, self.port = host, port
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.answer: queue.Queue[int | None] = queue.Queue()
        self.closed = False
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.answer.put(V5_TO_V311.get(reason.value,
                                                                                                 reason.value))
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, message: self.inbox.put(message)

    def _on_disconnect(self, *_args: Any) -> None:
        self.closed = True
        self.answer.put(None)

    def connect(self, timeout: float) -> int | None:
        """The CONNACK code (0: connected), or None if the connection closed or failed first."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return None
        self.client.loop_start()
        try:
            code = self.answer.get(timeout=timeout)
        except queue.Empty:
            code = None
        if code != 0:
            self.close()
        return code

    def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def next_message(self, timeout: float) -> mqtt.MQTTMessage | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


# -- the rotation ------------------------------------------------------------------------------


class Agent:
    """Renew the device's certificate (see the module docstring).

    Args:
        state: the state directory.
        host, port: override ``config.json``'s broker address.
        answer_timeout: seconds to wait for the renewer's answer.
        attempts: requests (and connections) tried before giving up.
        log: where progress lines go.
    """

    def __init__(self, state: StateDir, *, host: str | None = None, port: int | None = None,
                 answer_timeout: float = 30.0, attempts: int = 5, backoff: Backoff | None = None,
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.state = state
        self.host = host or str(state.config.get("broker_host", "localhost"))
        self.port = port or int(state.config.get("broker_port", 8883))
        self.answer_timeout = answer_timeout
        self.attempts = attempts
        self.backoff = backoff or Backoff(base=0.5, cap=10.0)
        self.log = log
        self.response_topic = messages.response_topic(state.device_id)
        self.request_topic = messages.request_topic(state.device_id)

    def open(self, identity: Identity) -> Session | int | None:
        """A connected session with ``identity``, or its CONNACK code / None."""
        session = Session(self.state, identity, self.host, self.port)
        code = session.connect(15.0)
        if code != 0:
            return code
        session.subscribe(self.response_topic)  # the broker handles it before any PUBLISH sent after it
        return session

    def renew(self, session: Session | None = None) -> str:
        """Renew once (or finish a renewal a crash interrupted); return the new serial.

        Raises:
            AgentError: refused (the protocol's code) or the broker could not be reached.
        """
        journal = self.state.journal()
        if journal.get("state") == "switched":
            self.state.promote()
            return str(journal.get("serial", ""))
        if journal.get("state") not in ("issued", "confirmed"):
            session = self._request(journal, session)
        return self._switch(session)

    # -- request -----------------------------------------------------------------------------

    def _request(self, journal: dict[str, Any], session: Session | None) -> Session:
        live_cert = self.state.live.cert()
        if journal.get("state") not in ("keyed", "requested") or not self.state.next.key.exists():
            journal = self._new_key(live_cert)
        rekeyed = False
        for attempt in range(self.attempts):
            if session is None or session.closed:
                session = self._connect_live()
            request = messages.make_renew(load_key(self.state.live.key), live_cert,
                                          messages.make_csr(load_key(self.state.next.key), self.state.device_id),
                                          self.state.device_id)
            request_id = messages.b64(request.request_id)
            self.state.record(state="requested", request_id=request_id, timestamp=request.timestamp)
            self.state.crash("requested")
            session.publish(self.request_topic, request.encode())
            self._settle("published")
            answer = self._wait(session, request_id)
            if answer is None:
                self.log(f"no answer to request {request_id} (attempt {attempt + 1}); trying again")
                session.close()
                session = None
                time.sleep(self.backoff.delay(Outcome.BUSY))
                continue
            if answer.status is messages.Status.ISSUED:
                self._store(answer)
                return session
            code = answer.error or RefusalCode.INTERNAL
            if code is RefusalCode.KEY_REUSED and not rekeyed:  # our pending renewal expired: start from a new key
                self.log("the new key was used already (an expired renewal): making another")
                self._new_key(live_cert)
                rekeyed = True
                continue
            if code in RETRY_CODES:
                self.log(f"request refused ({code.value}: {answer.reason}); trying again")
                time.sleep(min(answer.retry_after or 0, 30) or self.backoff.delay(Outcome.BUSY))
                continue
            if code in (RefusalCode.OUTSIDE_WINDOW, RefusalCode.RATE_LIMITED, RefusalCode.RENEWAL_PENDING):
                self.state.reset()  # nothing was issued for this key; a later renewal makes a new one
            raise AgentError(code.value, answer.reason or code.value, retry_after=answer.retry_after)
        raise AgentError("no-answer", f"the renewer did not answer {self.attempts} requests", EXIT_UNREACHABLE)

    def _new_key(self, live_cert: x509.Certificate) -> dict[str, Any]:
        key = new_key_like(load_key(self.state.live.key))
        write_atomic(self.state.next.key, key_pem(key), 0o600)
        journal = self.state.record(state="keyed", renewing=messages.certificate_sha256(live_cert))
        self.state.crash("keyed")
        return journal

    def _store(self, answer: messages.Response) -> None:
        assert answer.chain is not None
        assert answer.serial is not None
        try:
            chain = x509.load_pem_x509_certificates(answer.chain.encode())
        except ValueError:
            raise AgentError("bad-answer", "the issued chain is not PEM") from None
        key = load_key(self.state.next.key)
        anchors = x509.load_pem_x509_certificates(self.state.path("ca.pem").read_bytes())
        if chain[0].public_key() != key.public_key() or format(chain[0].serial_number, "x") != answer.serial:
            raise AgentError("bad-answer", "the issued certificate is not for the new key")
        if not _chains_to(chain, anchors):
            raise AgentError("bad-answer", "the issued certificate does not chain to the device's trust anchors")
        pems = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
        write_atomic(self.state.path("next-cert.pem"), pems[0])
        write_atomic(self.state.path("next-chain.pem"), b"".join(pems[1:]))
        write_atomic(self.state.path("next-fullchain.pem"), b"".join(pems))
        self.state.record(state="issued", serial=answer.serial)
        self.state.crash("issued")
        self.log(f"issued {answer.serial} (valid until {answer.not_after})")

    # -- switch ------------------------------------------------------------------------------

    def _switch(self, session: Session | None) -> str:
        """Confirm over the old identity, then connect with the new one; promote the files once it works."""
        serial = str(self.state.journal().get("serial"))
        for attempt in range(self.attempts):
            if (self.state.journal().get("state") == "confirmed" or attempt > 0) and self._try_new():
                return serial
            if session is None or session.closed:
                opened = self.open(self.state.live)
                if not isinstance(opened, Session):
                    # The old certificate is refused: the renewal was activated (it superseded it), or the device
                    # was barred. Only the new one can tell.
                    if self._try_new():
                        return serial
                    time.sleep(self.backoff.delay(outcome_of(opened)))
                    continue
                session = opened
            self._confirm(session, serial)
            self.state.crash("activated")  # answered (or the old session closed): not yet connected with the new
            session.close()
            session = None
            if self._try_new():
                return serial
            time.sleep(self.backoff.delay(Outcome.BUSY))
        raise AgentError("not-switched", f"neither certificate was accepted after {self.attempts} attempts; the "
                         "journal is kept, run again", EXIT_UNREACHABLE)

    def _confirm(self, session: Session, serial: str) -> None:
        for _ in range(self.attempts):
            confirm = messages.make_confirm(load_key(self.state.next.key), self.state.device_id, serial)
            request_id = messages.b64(confirm.request_id)
            self.state.record(state="confirmed", confirm_id=request_id)
            self.state.crash("confirmed")
            session.publish(self.request_topic, confirm.encode())
            self._settle("confirm-sent")
            answer = self._wait(session, request_id)
            if answer is None:  # kicked (the old certificate was just revoked) or no answer: try the new one
                return
            if answer.status is messages.Status.ACTIVATED:
                self.log(f"renewal {serial} activated")
                return
            code = answer.error or RefusalCode.INTERNAL
            if code in (RefusalCode.RENEWAL_EXPIRED, RefusalCode.NOT_CURRENT_CERTIFICATE):
                self.state.reset()
                raise AgentError(code.value, f"{answer.reason}; the next renewal starts from a new key")
            if code not in RETRY_CODES:
                raise AgentError(code.value, answer.reason or code.value, retry_after=answer.retry_after)

    def _settle(self, point: str) -> None:
        """Before a crash after a PUBLISH: give paho's thread the moment it needs to put it on the wire."""
        if self.state.crash_at == point:
            time.sleep(0.3)
            self.state.crash(point)

    def _try_new(self) -> bool:
        opened = self.open(self.state.next)
        if not isinstance(opened, Session):
            return False
        opened.close()
        serial = str(self.state.journal().get("serial"))
        self.state.promote()
        self.log(f"switched to {serial}")
        return True

    def _connect_live(self) -> Session:
        for _ in range(self.attempts):
            opened = self.open(self.state.live)
            if isinstance(opened, Session):
                return opened
            outcome = outcome_of(opened)
            if outcome is Outcome.REFUSED:
                raise AgentError("not-authorised", f"the broker refuses the current certificate (CONNACK {opened})")
            time.sleep(self.backoff.delay(outcome))
        raise AgentError("unreachable", f"cannot connect to {self.host}:{self.port}", EXIT_UNREACHABLE)

    def _wait(self, session: Session, request_id: str) -> messages.Response | None:
        deadline = time.monotonic() + self.answer_timeout
        while time.monotonic() < deadline and not session.closed:
            message = session.next_message(min(0.2, max(0.0, deadline - time.monotonic())))
            if message is None or message.topic != self.response_topic:
                continue
            try:
                answer = messages.decode_response(bytes(message.payload))
            except RotationMessageError:
                continue
            if answer.request_id == request_id:
                return answer
        return None


def _chains_to(chain: list[x509.Certificate], anchors: list[x509.Certificate]) -> bool:
    """Each certificate is issued by the next, and the last by one of the anchors (or is one)."""
    try:
        for child, parent in itertools.pairwise(chain):
            child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    last = chain[-1]
    for anchor in anchors:
        if last == anchor:
            return True
        try:
            last.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


# -- run: stay connected, renew when ordered or due -------------------------------------------


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
            outcome = outcome_of(opened)
            delay = agent.backoff.delay(outcome)
            agent.log(f"cannot connect (CONNACK {opened}); retrying in {delay:.1f} s")
            time.sleep(delay)
            continue
        agent.backoff.delay(Outcome.CONNECTED)
        session = opened
        session.subscribe(messages.command_topic(state.device_id))
        due = _due(state.live.cert(), renew_at)
        while not session.closed:
            ordered = False
            message = session.next_message(1.0)
            if message is not None and message.topic == messages.command_topic(state.device_id) and message.payload:
                with contextlib.suppress(RotationMessageError):
                    order = messages.decode_order(bytes(message.payload))
                    ordered = order.serial == format(state.live.cert().serial_number, "x")
            if ordered or (due is not None and time.time() >= due):
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


def _due(cert: x509.Certificate, fraction: float) -> float | None:
    if fraction <= 0:
        return None
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return start + (end - start) * fraction


def status(state: StateDir) -> dict[str, Any]:
    cert = state.live.cert()
    return {"device_id": state.device_id, "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(), "rotation": state.journal() or None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_tools.agent", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
