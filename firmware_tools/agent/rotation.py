"""The exchange with the renewer: request, store the issued chain, confirm, switch (PROTOCOL.md part 2).

:class:`Agent` drives one renewal through the journal's states (see
:mod:`firmware_tools.agent`), over :class:`~firmware_tools.agent.session.Session`
connections, and resumes one a crash interrupted.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from firmware_tools.agent.journal import (
    EXIT_UNREACHABLE,
    AgentError,
    Identity,
    StateDir,
    key_pem,
    load_key,
    new_key_like,
    write_atomic,
)
from firmware_tools.agent.session import TLS_REFUSED, Session, describe
from firmware_tools.backoff import Backoff, Outcome, outcome_of
from iotauth.errors import RefusalCode, RotationMessageError
from iotauth.rotation import messages

RETRY_CODES = frozenset({RefusalCode.REPLAYED, RefusalCode.STALE, RefusalCode.INTERNAL})
DEAD_RENEWAL = frozenset({RefusalCode.RENEWAL_EXPIRED, RefusalCode.NOT_CURRENT_CERTIFICATE})
"""Refusals of a confirmation after which the new key can never become current: start again from a new key."""
CERTIFICATE_REFUSED = frozenset({4, 5, TLS_REFUSED})
"""Connect outcomes that say the broker will not have this certificate (not a network or load problem)."""


class Agent:
    """Renew the device's certificate (see :mod:`firmware_tools.agent`).

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
        """A connected session with ``identity``, or how the connect ended (CONNACK code, TLS_REFUSED, None)."""
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
        if journal.get("state") not in ("issued", "confirmed", "activated"):
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
        """Confirm over the old identity, then connect with the new one; promote the files once it is active."""
        serial = str(self.state.journal().get("serial"))
        for attempt in range(self.attempts):
            if (self.state.journal().get("state") in ("confirmed", "activated") or attempt > 0) and self._try_new():
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
        raise AgentError("not-switched", f"the new certificate was not accepted as active after {self.attempts} "
                         "attempts; the journal is kept, run again", EXIT_UNREACHABLE)

    def _confirm(self, session: Session, serial: str) -> bool:
        """Send the confirmation (signed by the new key) over ``session``; True once the renewer answers activated.

        False when no answer came (the renewer is down, or the session closed:
        the old certificate was just revoked). Raises on a final refusal.
        """
        for _ in range(self.attempts):
            confirm = messages.make_confirm(load_key(self.state.next.key), self.state.device_id, serial)
            request_id = messages.b64(confirm.request_id)
            if self.state.journal().get("state") != "activated":
                self.state.record(state="confirmed", confirm_id=request_id)
            self.state.crash("confirmed")
            session.publish(self.request_topic, confirm.encode())
            self._settle("confirm-sent")
            answer = self._wait(session, request_id)
            if answer is None:
                return False
            if answer.status is messages.Status.ACTIVATED:
                self.state.record(state="activated")
                self.log(f"renewal {serial} activated")
                return True
            code = answer.error or RefusalCode.INTERNAL
            if code in DEAD_RENEWAL:
                self.state.reset()
                raise AgentError(code.value, f"{answer.reason}; the next renewal starts from a new key")
            if code not in RETRY_CODES:
                raise AgentError(code.value, answer.reason or code.value, retry_after=answer.retry_after)
        return False

    def _settle(self, point: str) -> None:
        """Before a crash after a PUBLISH: give paho's thread the moment it needs to put it on the wire."""
        if self.state.crash_at == point:
            time.sleep(0.3)
            self.state.crash(point)

    def _try_new(self) -> bool:
        """Connect with the new identity and promote it once the renewal is known to be active.

        Known active: the journal says the renewer answered ``activated``; else a
        confirmation over this new session is answered ``activated``; else (no
        renewer) the old certificate is refused as revoked -- then the new one is
        the only identity that works.
        """
        opened = self.open(self.state.next)
        if not isinstance(opened, Session):
            return False
        serial = str(self.state.journal().get("serial"))
        try:
            active = self.state.journal().get("state") == "activated" or self._confirm(opened, serial)
        finally:
            opened.close()
        if not active:
            old = self.open(self.state.live)
            if isinstance(old, Session):
                old.close()
                self.log(f"the new certificate {serial} connects but is not active yet; keeping the old one")
                return False
            if old not in CERTIFICATE_REFUSED:
                return False
            self.log(f"the old certificate is refused ({describe(old)}): the renewal is active")
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
                raise AgentError("not-authorised", f"the broker refuses the current certificate ({describe(opened)})")
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
