"""What the gate, the broker and the guard share about admitted connections.

A :class:`Binding` is one admitted connection's authorization state; the gate
creates it (through the guard's admission), the host attaches it to the
session it opens, and the guard withdraws it. :class:`Bindings` is the table of
live ones, and the one way to take a binding's rights away (:meth:`Bindings.kick`).
The broker hosting the sessions is reached only through the small
:class:`SessionHost` protocol, so nothing here imports amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from iotauth.broker.audit import BrokerAudit
from iotauth.broker.mqtt import NOT_AUTHORISED
from iotauth.certs import TIMESTAMP_FORMAT
from iotauth.histogram import LatencyHistogram
from iotauth.policy import Action, SessionPolicy
from iotauth.registry import AuditEvent

log = logging.getLogger("iotauth.broker")


@dataclass(frozen=True)
class GuardOptions:
    """Tunables of the guard (admission and the feed follower). Defaults are the secure ones.

    Attributes:
        fail_open: DANGEROUS. When the registry cannot be read, admit clients whose
            certificate passes the chain, validity and identity checks and is not on
            the published CRL file, with the profile last seen for that certificate
            (else ``default``); never drop live sessions for an outage. Revocations
            made during the outage are not enforced until the registry is back.
        poll_interval: seconds between change-feed polls when idle.
        registry_timeout: bound on each registry read and on the accept audit write.
        registry_grace: how long live sessions survive a registry outage (fail closed).
        sweep_interval: seconds between wall-clock expiry checks and feed-reset checks.
        renewal_ttl: a *pending* renewal certificate (issued over MQTT by ``iotauth renewer``) younger than
            this is accepted, and activated, at its device's first CONNECT with it (``[provisioning]
            pending_ttl_minutes``); 0 refuses every pending certificate.
    """

    fail_open: bool = False
    poll_interval: float = 0.05
    registry_timeout: float = 2.0
    registry_grace: float = 10.0
    sweep_interval: float = 30.0
    renewal_ttl: float = 3600.0


@dataclass(frozen=True)
class Admission:
    """What the gate established about one connection, from its own TLS certificate."""

    device_id: str
    profile: str
    fingerprint: str
    serial: str
    not_after: datetime
    peer: str
    listener: str
    clean_session: bool


@dataclass(frozen=True)
class Denial:
    """Why a connection was refused, and the CONNACK code it gets."""

    reason: str
    detail: str = ""
    return_code: int = NOT_AUTHORISED
    device_id: str | None = None
    fingerprint: str | None = None


class Binding:
    """One admitted connection's authorization state, shared by the gate, the broker and the guard.

    ``revoked`` is set once and never cleared: from that moment every topic
    decision is a denial, whatever the socket is still doing.
    """

    __slots__ = ("_close", "_timer", "admission", "connected", "generation", "policy", "revoked", "session")

    def __init__(self, admission: Admission, policy: SessionPolicy, generation: int,
                 close: Callable[[], None]) -> None:
        self.admission = admission
        self.policy = policy
        self.generation = generation
        self.revoked: str | None = None
        self.session: Any = None
        self.connected = False
        self._close = close
        self._timer: asyncio.TimerHandle | None = None

    @property
    def device_id(self) -> str:
        return self.admission.device_id

    def allows(self, action: Action | str, topic: str) -> bool:
        return self.revoked is None and self.policy.allows(action, topic)

    def revoke(self, reason: str) -> bool:
        """Withdraw every right and close the connection; ``False`` if it was already revoked."""
        if self.revoked is not None:
            return False
        self.revoked = reason
        self.cancel_timer()  # hosts see ``revoked`` and publish no will: a kicked client gets no last word
        with contextlib.suppress(Exception):
            self._close()
        return True

    def arm(self, delay: float, callback: Callable[[Binding], None]) -> None:
        self.cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), callback, self)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        return f"Binding({self.device_id!r}, {self.admission.fingerprint[:12]}, revoked={self.revoked!r})"


class SessionHost(Protocol):
    """What the guard needs from the broker whose sessions it guards."""

    def bound(self, device_id: str | None = None) -> Iterable[Binding]:
        """Bindings attached to broker sessions (of ``device_id``, or all), connected or offline."""
        ...

    async def forget(self, device_id: str, fingerprint: str | None) -> None:
        """Delete the device's session state (only if bound to ``fingerprint``, when given)."""
        ...

    def prune(self, bindings: Collection[Binding]) -> int:
        """Drop subscriptions that the bindings' current policies no longer cover; return how many."""
        ...


class Bindings:
    """The live connections by device, and the sessions the host keeps for offline ones.

    Args:
        audit: where every disconnect is recorded (``broker.session.kicked``).
    """

    def __init__(self, audit: BrokerAudit, clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.host: SessionHost | None = None
        self._connected: dict[str, set[Binding]] = {}
        self._clock = clock
        self.revocation_latency = LatencyHistogram()
        """Seconds from the registry event that revoked a connection to its disconnect (metrics)."""

    def connected(self, device_id: str | None = None) -> list[Binding]:
        """Connections that are up (of ``device_id``, or all)."""
        if device_id is not None:
            return list(self._connected.get(device_id, ()))
        return [b for group in self._connected.values() for b in group]

    def matching(self, device_id: str | None, fingerprint: str | None) -> list[Binding]:
        """Connected and offline bindings of ``device_id`` (or all); of one certificate if ``fingerprint`` is set."""
        candidates = self.connected(device_id)
        if self.host is not None:
            seen = {id(b) for b in candidates}
            candidates += [b for b in self.host.bound(device_id) if id(b) not in seen]
        if fingerprint is not None:
            candidates = [b for b in candidates if b.admission.fingerprint == fingerprint]
        return candidates

    def register(self, binding: Binding) -> None:
        self._connected.setdefault(binding.device_id, set()).add(binding)
        binding.connected = True

    def release(self, binding: Binding) -> None:
        """The connection is gone (its session may live on, offline)."""
        binding.connected = False
        group = self._connected.get(binding.device_id)
        if group is not None:
            group.discard(binding)
            if not group:
                del self._connected[binding.device_id]
        if binding.admission.clean_session:
            binding.cancel_timer()

    def cancel_timers(self) -> None:
        for bindings in self._connected.values():
            for binding in bindings:
                binding.cancel_timer()

    def kick(self, bindings: Iterable[Binding], reason: str, trigger: AuditEvent | None) -> int:
        """Revoke ``bindings``; disconnect (and record) the connected ones; return how many were disconnected."""
        kicked = 0
        for binding in bindings:
            connected = binding.connected
            if not binding.revoke(reason):
                continue
            if not connected:  # an offline session: it just loses its rights, nobody is disconnected
                log.debug("withdrew the rights of %s's offline session: %s", binding.device_id, reason)
                continue
            kicked += 1
            if trigger is not None:
                self._measure(trigger)
            admission = binding.admission
            log.warning("disconnected %s (certificate %s, %s): %s", admission.device_id, admission.serial,
                        admission.peer, reason)
            self.audit.kicked(
                admission.device_id,
                {
                    "reason": reason,
                    "fingerprint": admission.fingerprint,
                    "serial": admission.serial,
                    "peer": admission.peer,
                    "trigger_event": trigger.id if trigger is not None else None,
                    "trigger_kind": trigger.kind if trigger is not None else None,
                },
            )
        return kicked

    def _measure(self, trigger: AuditEvent) -> None:
        """Revocation -> disconnect: the triggering event's registry time to now (clocks of two hosts)."""
        try:
            written = datetime.strptime(trigger.ts, TIMESTAMP_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            return
        self.revocation_latency.observe(self._clock() - written)
