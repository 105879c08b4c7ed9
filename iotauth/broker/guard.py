"""Admission, live revocation and expiry: the broker's security state, free of amqtt.

The :class:`Guard` decides whether a connection may become a session (from
the certificate on *that* TLS connection, the registry and the policy), and
then keeps every admitted connection honest for as long as it lives:

* **Change feed.** It reads the registry's events table (one indexed range
  query, bounded by ``registry_timeout``) whenever PostgreSQL announces a
  commit and at least every ``poll_interval`` (SQLite is only polled) and, on
  ``device.revoked`` / ``device.suspended`` / ``device.pending`` /
  ``certificate.revoked``, closes the affected connections at once and has the
  broker forget their sessions (subscriptions and queued messages). Events it
  does not know that name a device with a live session trigger a fresh
  registry lookup for that device, so a new kind of state change fails safe.
  There is no decision cache: a kicked binding loses every right immediately,
  even before its socket is gone.
* **Connect/revoke race.** An admission remembers the feed position from
  before its registry lookup. A revocation that lands between the lookup and
  the moment the connection is registered is caught by comparing event ids
  (:meth:`Guard.admit`); one that lands later finds the registered binding.
* **Expiry.** Each binding has a timer for its certificate's ``notAfter``; when
  it fires the connection is closed (the session is kept, so a renewed
  certificate resumes it). A periodic sweep re-checks expiry against the wall
  clock in case the monotonic timer and the clock disagree.
* **Registry outage.** If the feed cannot be read within ``registry_timeout``
  the guard is *unhealthy*: new connects are refused (CONNACK 0x03) because
  revocations could no longer be enforced. Live sessions are kept for
  ``registry_grace`` seconds (a short hiccup should not drop a fleet) and then
  closed; their sessions are kept and they can reconnect once the registry is
  readable again. ``fail_open`` (dangerous, see :class:`GuardOptions`) keeps
  everything up instead.
* **Policy reload.** :meth:`Guard.reload` swaps the compiled profiles and
  recompiles every live binding (connected or offline); the broker then drops
  subscriptions the new rules no longer cover.

The broker side talks to the guard through the small :class:`SessionHost`
protocol and the :data:`ADMISSION` context variable; nothing here imports amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from iotauth.broker.audit import LIMIT, VIOLATION, BrokerAudit
from iotauth.broker.mqtt import IDENTIFIER_REJECTED, NOT_AUTHORISED, SERVER_UNAVAILABLE, Connect
from iotauth.config import DEFAULT_PROFILE
from iotauth.errors import IotAuthError, PolicyDenied
from iotauth.pki.ca import now_utc
from iotauth.pki.verify import CertificateIdentity, ClientCertificateVerifier, Rejection
from iotauth.policy import Action, PolicySet, SessionPolicy, deny_all
from iotauth.registry import AuditEvent, CertificateStatus, Credential, DeviceStatus

log = logging.getLogger("iotauth.broker")

KICK_STATUSES = frozenset({DeviceStatus.REVOKED.value, DeviceStatus.SUSPENDED.value, DeviceStatus.PENDING.value})
HARMLESS_EVENTS = frozenset({"certificate.issued", "certificate.activated", "device.created", "device.active"})
CREDENTIAL_CACHE = 200_000
RECENT_TTL = 300.0  # far longer than any admission can take (its awaits are all bounded)


class Registry(Protocol):
    """The registry calls the guard makes (``iotauth.registry.Registry`` provides them)."""

    async def find_credential(self, cert_fingerprint: str) -> Credential | None: ...

    async def events(
        self, *, after_id: int = 0, since: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[AuditEvent]: ...

    async def last_event_id(self) -> int: ...

    async def wait_for_change(self, interval: float) -> None: ...


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


@dataclass(frozen=True)
class GuardOptions:
    """Tunables. Defaults are the secure ones.

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
    """

    fail_open: bool = False
    poll_interval: float = 0.05
    registry_timeout: float = 2.0
    registry_grace: float = 10.0
    sweep_interval: float = 30.0


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


@dataclass(frozen=True)
class Precheck:
    """What the certificate of a connection established, before its CONNECT (see :meth:`Guard.precheck`)."""

    identity: CertificateIdentity
    profile: str
    policy: SessionPolicy
    cursor: int


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
        self.cancel_timer()  # the host sees ``revoked`` and publishes no will: a kicked client gets no last word
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


ADMISSION: ContextVar[Binding | None] = ContextVar("iotauth_admission", default=None)
"""Set by the gate for the task that hands an admitted connection to amqtt.

amqtt runs plugin calls in tasks created from that task, which copy the
context, so the auth plugin sees the binding of *this* connection and nothing
else; a connection that did not come through the gate has none and is refused.
"""


class Guard:
    """See the module docstring."""

    def __init__(
        self,
        *,
        registry: Registry,
        verifier: ClientCertificateVerifier,
        policies: PolicySet,
        audit: BrokerAudit,
        options: GuardOptions = GuardOptions(),
        load_policies: Callable[[], PolicySet] | None = None,
        revoked_serials: Callable[[], Collection[str]] | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self._policies = policies
        self.generation = 1
        self.audit = audit
        self.options = options
        self._load_policies = load_policies
        self._revoked_serials = revoked_serials
        self._clock = clock
        self._host: SessionHost | None = None
        self._connections: dict[str, set[Binding]] = {}
        self._cursor = 0
        self._recent_devices: dict[str, tuple[int, float]] = {}
        self._recent_fingerprints: dict[str, tuple[int, float]] = {}
        self._credentials: OrderedDict[str, tuple[str, str]] = OrderedDict()  # fingerprint -> (device, profile)
        self._cached_by_device: dict[str, set[str]] = {}
        self._touched: dict[str, tuple[int, float]] = {}
        self._compiled: dict[tuple[str, str], SessionPolicy] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._unhealthy_since: float | None = None
        self._outage_kicked = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: SessionHost) -> None:
        """Attach to the broker and start following the registry (which must be readable now)."""
        self._host = host
        self._cursor = await asyncio.wait_for(self.registry.last_event_id(), self.options.registry_timeout)
        self.audit.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(), name="iotauth-broker-feed"),
            loop.create_task(self._sweep(), name="iotauth-broker-sweep"),
        ]
        log.info("following the registry change feed from event %d (poll every %g s)",
                 self._cursor, self.options.poll_interval)

    async def close(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        for bindings in self._connections.values():
            for binding in bindings:
                binding.cancel_timer()
        await self.audit.close()

    @property
    def healthy(self) -> bool:
        return self._unhealthy_since is None

    @property
    def policies(self) -> PolicySet:
        return self._policies

    @policies.setter
    def policies(self, value: PolicySet) -> None:
        self._policies = value
        self._compiled = {}

    @property
    def cursor(self) -> int:
        """The id of the last registry event applied."""
        return self._cursor

    def connections(self, device_id: str | None = None) -> list[Binding]:
        if device_id is not None:
            return list(self._connections.get(device_id, ()))
        return [b for group in self._connections.values() for b in group]

    # -- admission -------------------------------------------------------------------------

    async def precheck(self, der: bytes, peer: str, listener: str) -> Precheck | Denial:
        """Decide what the certificate alone decides, as soon as the TLS handshake ends.

        Chain, identity, registry status and profile. A refused certificate is
        audited here and its connection closed at once, without waiting for a
        CONNECT. The feed position read *before* the registry lookup travels
        with the result, so :meth:`admit` can see a revocation that lands in
        between.
        """
        decision = await self._precheck(der)
        if isinstance(decision, Denial):
            self._record_denial(decision, None, peer, listener)
        return decision

    async def _precheck(self, der: bytes) -> Precheck | Denial:
        try:
            identity = self._verify(der)
        except Rejection as exc:
            return Denial(f"certificate-{exc.code}", str(exc), fingerprint=hashlib.sha256(der).hexdigest())
        deny = _denier(identity)
        if not self.options.fail_open:
            if not self.healthy:
                return deny("registry-unavailable", "registry change feed is not readable", SERVER_UNAVAILABLE)
            if not self.audit.healthy:
                return deny("audit-unavailable", "the audit log cannot be written", SERVER_UNAVAILABLE)
        cursor = self._cursor
        found = await self._lookup(identity)
        if isinstance(found, Denial):
            return found
        try:
            policy = self._compile(found, identity.device_id)
        except (PolicyDenied, IotAuthError) as exc:
            return deny("unknown-profile", str(exc))
        return Precheck(identity, found, policy, cursor)

    async def admit(
        self, pre: Precheck, connect: Connect, peer: str, listener: str, close: Callable[[], None]
    ) -> Binding | Denial:
        """Decide on the CONNECT of a connection whose certificate passed :meth:`precheck`, and register it."""
        decision = await self._admit(pre, connect, peer, listener, close)
        if isinstance(decision, Denial):
            self._record_denial(decision, connect.client_id, peer, listener)
        return decision

    async def _admit(
        self, pre: Precheck, connect: Connect, peer: str, listener: str, close: Callable[[], None]
    ) -> Binding | Denial:
        identity, policy = pre.identity, pre.policy
        deny = _denier(identity)
        if not connect.client_id:
            return deny("client-id-empty", "a zero-length client id cannot name a certificate's device",
                        IDENTIFIER_REJECTED)
        if connect.client_id != identity.device_id:
            return deny("client-id-mismatch",
                        f"client id {connect.client_id[:80]!r} is not the certificate's device id")
        if connect.will is not None and not policy.allows_publish(connect.will.topic):
            return deny("will-topic-denied", f"will topic {connect.will.topic[:120]!r} is outside the policy")
        if policy is not self._compiled.get((pre.profile, identity.device_id)):
            policy = self._compile(pre.profile, identity.device_id)  # a reload happened meanwhile
        admission = Admission(
            identity.device_id, pre.profile, identity.fingerprint, identity.serial, identity.not_after, peer,
            listener, connect.clean_session,
        )
        binding = Binding(admission, policy, self.generation, close)
        if self._revoked_after(identity, pre.cursor):
            return deny("revoked-during-connect", "revoked while the connection was being checked")
        self._connections.setdefault(identity.device_id, set()).add(binding)
        binding.connected = True
        try:
            await self.audit.accepted(identity.device_id, _accept_record(admission, connect),
                                      self.options.registry_timeout)
        except IotAuthError as exc:
            if not self.options.fail_open:
                self.release(binding)
                return deny("audit-unavailable", str(exc), SERVER_UNAVAILABLE)
            log.error("fail-open: admitting %s without an accept record: %s", identity.device_id, exc)
        if binding.revoked is not None:
            self.release(binding)
            return deny("revoked-during-connect", binding.revoked)
        log.debug("accepted %s (profile %s, certificate %s) from %s",
                  identity.device_id, pre.profile, identity.serial, peer)
        return binding

    def _verify(self, der: bytes) -> CertificateIdentity:
        """Chain, usage and identity (cached by the verifier per certificate); the validity window every time."""
        return self.verifier.verify_der(der, self._clock())

    def _compile(self, profile: str, device_id: str) -> SessionPolicy:
        """Compiled policies are immutable, so sessions of one identity share one (until the next reload)."""
        key = (profile, device_id)
        policy = self._compiled.get(key)
        if policy is None:
            policy = self._compiled[key] = self.policies.bind(profile, device_id)
            if len(self._compiled) > CREDENTIAL_CACHE:
                self._compiled.pop(next(iter(self._compiled)))
        return policy

    async def _lookup(self, identity: CertificateIdentity) -> str | Denial:
        """The device's profile if the registry says certificate and device are both active.

        Usable credentials are cached by fingerprint, and the cache is kept
        coherent by the change feed: every registry event that names a device
        drops that device's entries before anything else sees the event, and an
        entry is only stored if no event about the device was applied while its
        lookup was in flight. So a cached answer is never older than the feed
        position -- the same freshness every live session already has -- and
        a revoked credential is refused or kicked within one poll either way.
        """
        cached = self._credentials.get(identity.fingerprint)
        if cached is not None and self.healthy:
            self._credentials.move_to_end(identity.fingerprint)
            return cached[1]
        deny = _denier(identity)
        cursor = self._cursor
        try:
            async with asyncio.timeout(self.options.registry_timeout):
                credential = await self.registry.find_credential(identity.fingerprint)
        except Exception as exc:  # any failure to read is an outage: fail closed unless told otherwise
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("registry lookup failed: %s", exc or type(exc).__name__)
            if self.options.fail_open:
                return self._fail_open_profile(identity)
            return deny("registry-unavailable", f"registry lookup failed: {exc or type(exc).__name__}",
                        SERVER_UNAVAILABLE)
        if credential is None:
            return deny("certificate-unknown", "certificate is not in the registry")
        if credential.certificate.device_id != identity.device_id:
            return deny("registry-mismatch", f"registry has this certificate for {credential.certificate.device_id!r}")
        if credential.certificate.status is not CertificateStatus.ACTIVE:
            return deny(f"certificate-{credential.certificate.status.value}", "certificate is not active")
        if credential.device.status is not DeviceStatus.ACTIVE:
            return deny(f"device-{credential.device.status.value}", "device is not active")
        self._cache(identity, credential.device.profile, cursor)
        return credential.device.profile

    def _cache(self, identity: CertificateIdentity, profile: str, cursor: int) -> None:
        touched = self._touched.get(identity.device_id)
        if touched is not None and touched[0] > cursor:
            return  # the device changed while we were reading it: do not keep what we read
        self._credentials[identity.fingerprint] = (identity.device_id, profile)
        self._credentials.move_to_end(identity.fingerprint)
        self._cached_by_device.setdefault(identity.device_id, set()).add(identity.fingerprint)
        if len(self._credentials) > CREDENTIAL_CACHE:
            fp, (device_id, _) = self._credentials.popitem(last=False)
            self._cached_by_device.get(device_id, set()).discard(fp)

    def _invalidate(self, device_id: str, event_id: int, now: float) -> None:
        self._touched[device_id] = (event_id, now)
        for fp in self._cached_by_device.pop(device_id, ()):
            self._credentials.pop(fp, None)

    def _fail_open_profile(self, identity: CertificateIdentity) -> str | Denial:
        deny = _denier(identity)
        if self._revoked_after(identity, -1):
            return deny("revoked", "revoked (seen on the change feed)")
        if self._revoked_serials is not None and identity.serial in self._revoked_serials():
            return deny("certificate-on-crl", "certificate is listed on the published CRL")
        cached = self._credentials.get(identity.fingerprint)
        log.warning("fail-open: admitting %s without the registry", identity.device_id)
        return cached[1] if cached is not None else DEFAULT_PROFILE

    def _revoked_after(self, identity: CertificateIdentity, cursor: int) -> bool:
        device = self._recent_devices.get(identity.device_id)
        cert = self._recent_fingerprints.get(identity.fingerprint)
        return (device is not None and device[0] > cursor) or (cert is not None and cert[0] > cursor)

    def _record_denial(self, denial: Denial, client_id: str | None, peer: str, listener: str) -> None:
        recorded = self.audit.denied(
            denial.reason,
            denial.device_id,
            {
                "detail": denial.detail[:300],
                "fingerprint": denial.fingerprint,
                "client_id": client_id[:128] if client_id is not None else None,
                "peer": peer,
                "listener": listener,
            },
        )
        if recorded:  # floods are counted in the audit log, not spelled out in the log file
            log.info("denied %s from %s: %s (%s)", ascii(client_id)[:80] if client_id is not None else "-", peer,
                     denial.reason, denial.detail)

    def deny_handshake(self, reason: str, detail: str, peer: str, listener: str) -> None:
        """Record a connection refused before a certificate named it (summarised per source under a flood)."""
        self._record_denial(Denial(reason, detail), None, peer, listener)

    def deny_connect(self, reason: str, detail: str, fingerprint: str | None, peer: str, listener: str, *,
                     device_id: str | None = None) -> None:
        """Record a connection refused after its handshake (a bad first packet, a deadline) by its certificate."""
        self._record_denial(Denial(reason, detail, device_id=device_id, fingerprint=fingerprint), None, peer,
                            listener)

    def limit_exceeded(self, binding: Binding, limit: str, detail: str) -> None:
        """Record that a session was closed for breaking a limit (``max_...``) or the protocol."""
        admission = binding.admission
        kind = VIOLATION if limit == "protocol-violation" else LIMIT
        self.audit.limit_exceeded(kind, limit, admission.device_id, {
            "limit": limit, "detail": detail[:300], "fingerprint": admission.fingerprint, "peer": admission.peer,
            "listener": admission.listener,
        })

    def attach(self, binding: Binding, session: Any, client_id: str | None, will_topic: str | None) -> bool:
        """Bind an admitted connection to the broker session amqtt built for it (the auth plugin's call).

        Re-checks what amqtt parsed against what the gate decided, so even a
        parser disagreement cannot attach the binding to another client's session.
        """
        if binding.revoked is not None or client_id != binding.device_id:
            return False
        if binding.generation != self.generation:
            self._rebind(binding)
        if will_topic is not None and not binding.allows(Action.PUBLISH, will_topic):
            return False
        binding.session = session
        self._arm_expiry(binding)
        return binding.revoked is None

    def release(self, binding: Binding) -> None:
        """The connection is gone (its session may live on, offline)."""
        binding.connected = False
        group = self._connections.get(binding.device_id)
        if group is not None:
            group.discard(binding)
            if not group:
                del self._connections[binding.device_id]
        if binding.admission.clean_session:
            binding.cancel_timer()

    def topic_denied(self, binding: Binding, action: str, topic: str) -> None:
        reason = binding.revoked or binding.policy.denial_reason(action, topic)
        self.audit.topic_denied(binding.device_id, str(action), reason, topic)

    # -- expiry ----------------------------------------------------------------------------

    def _arm_expiry(self, binding: Binding) -> None:
        remaining = (binding.admission.not_after - self._clock()).total_seconds()
        binding.arm(remaining + 0.001, self._expired)

    def _expired(self, binding: Binding) -> None:
        if self._clock() <= binding.admission.not_after:
            self._arm_expiry(binding)  # the monotonic timer ran ahead of the wall clock
            return
        self._kick([binding], "certificate-expired", trigger=None)

    # -- the change feed -------------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = self.options.poll_interval
        while True:
            try:
                async with asyncio.timeout(self.options.registry_timeout):
                    batch = await self.registry.events(after_id=self._cursor, limit=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._unhealthy(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = self.options.poll_interval
            self._healthy()
            if batch:
                await self.apply(batch)
            else:  # PostgreSQL wakes this at once on NOTIFY; SQLite sleeps the poll interval
                await self.registry.wait_for_change(self.options.poll_interval)

    async def apply(self, batch: list[AuditEvent]) -> None:
        """Enforce a batch of registry events (in id order) and advance the cursor past them."""
        forget: list[tuple[str, str | None]] = []
        recheck: set[str] = set()
        now = time.monotonic()
        for event in batch:
            kind, device_id = event.kind, event.device_id
            if kind.startswith("broker."):
                self._cursor = event.id
                continue
            if device_id:
                self._invalidate(device_id, event.id, now)
            if kind in HARMLESS_EVENTS:
                pass
            elif kind == "certificate.revoked":
                fp = event.data.get("fingerprint")
                if isinstance(fp, str):
                    self._recent_fingerprints[fp] = (event.id, now)
                    self._credentials.pop(fp, None)
                    self._kick(self._bindings_with(device_id, fp), "certificate-revoked", event)
                    if device_id:
                        forget.append((device_id, fp))
            elif kind.startswith("device.") and device_id:
                status = kind.removeprefix("device.")
                if status in KICK_STATUSES:
                    self._recent_devices[device_id] = (event.id, now)
                    self._kick(self._bindings_with(device_id, None), f"device-{status}", event)
                    forget.append((device_id, None))
                else:
                    recheck.add(device_id)
            elif device_id:
                recheck.add(device_id)
            self._cursor = event.id
        host = self._host
        if host is not None:
            for device_id, fp in forget:
                try:
                    await host.forget(device_id, fp)
                except Exception:
                    log.exception("could not forget the session of %s", device_id)
        for device_id in recheck:
            await self.revalidate(self._bindings_with(device_id, None))

    def _bindings_with(self, device_id: str | None, fingerprint: str | None) -> list[Binding]:
        candidates = self.connections(device_id)
        if self._host is not None:
            seen = {id(b) for b in candidates}
            candidates += [b for b in self._host.bound(device_id) if id(b) not in seen]
        if fingerprint is not None:
            candidates = [b for b in candidates if b.admission.fingerprint == fingerprint]
        return candidates

    def _kick(self, bindings: Iterable[Binding], reason: str, trigger: AuditEvent | None) -> int:
        kicked = 0
        for binding in bindings:
            connected = binding.connected
            if not binding.revoke(reason):
                continue
            if not connected:  # an offline session: it just loses its rights, nobody is disconnected
                log.debug("withdrew the rights of %s's offline session: %s", binding.device_id, reason)
                continue
            kicked += 1
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

    async def revalidate(self, bindings: Iterable[Binding]) -> None:
        """Ask the registry again about these bindings and kick or rebind as it says."""
        for binding in list(bindings):
            if binding.revoked is not None:
                continue
            try:
                credential = await asyncio.wait_for(
                    self.registry.find_credential(binding.admission.fingerprint), self.options.registry_timeout
                )
            except Exception as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self._unhealthy(exc)
                return
            if credential is None or not credential.usable:
                self._kick([binding], "registry-revalidation", None)
                if self._host is not None:
                    await self._host.forget(binding.device_id, binding.admission.fingerprint)
            elif credential.device.profile != binding.admission.profile:
                self._kick([binding], "profile-changed", None)

    # -- health ----------------------------------------------------------------------------

    def _unhealthy(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
            log.error("registry unreadable (%s): refusing new connections%s", exc or type(exc).__name__,
                      "" if not self.options.fail_open else " -- NOT: running --fail-open")
            return
        if (not self.options.fail_open and not self._outage_kicked
                and now - self._unhealthy_since >= self.options.registry_grace):
            self._outage_kicked = True
            live = self.connections()
            log.error("registry unreadable for %.1f s: failing closed, disconnecting %d sessions",
                      now - self._unhealthy_since, len(live))
            self._kick(live, "registry-unavailable", None)

    def _healthy(self) -> None:
        if self._unhealthy_since is not None:
            outage = time.monotonic() - self._unhealthy_since
            log.warning("registry readable again after %.1f s", outage)
            self.audit.event("broker.registry.recovered", None, {"outage_seconds": round(outage, 3),
                                                                 "sessions_dropped": self._outage_kicked})
            self._unhealthy_since = None
            self._outage_kicked = False

    # -- periodic checks -------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.options.sweep_interval)
            await self.sweep()

    async def sweep(self) -> None:
        """Expire by wall clock, forget old race markers, and notice a registry that went back in time."""
        now = self._clock()
        self._kick([b for b in self._bindings_with(None, None) if now > b.admission.not_after],
                   "certificate-expired", None)
        horizon = time.monotonic() - RECENT_TTL
        for table in (self._recent_devices, self._recent_fingerprints, self._touched):
            for key in [k for k, (_, seen) in table.items() if seen < horizon]:
                del table[key]
        try:
            last = await asyncio.wait_for(self.registry.last_event_id(), self.options.registry_timeout)
        except Exception as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._unhealthy(exc)
            return
        if last < self._cursor:
            log.error("registry event ids went back from %d to %d (restored from a backup?): re-checking all sessions",
                      self._cursor, last)
            self._cursor = last
            self._credentials.clear()
            self._cached_by_device.clear()
            await self.revalidate(self._bindings_with(None, None))

    # -- policy reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Reload the profiles and recompile every live binding; keep the old rules if the new ones are bad."""
        if self._load_policies is None:
            return False
        try:
            policies = self._load_policies()
        except IotAuthError as exc:
            log.error("policy reload failed, keeping the previous rules: %s", exc)
            self.audit.event("broker.policy.reload_failed", None, {"error": str(exc)[:500]})
            return False
        self.policies = policies
        self.generation += 1
        changed = pruned = 0
        for binding in self._bindings_with(None, None):
            if binding.revoked is None:
                changed += 1
                pruned += self._rebind(binding)
        log.info("policies reloaded (generation %d): %d sessions recompiled, %d subscriptions dropped",
                 self.generation, changed, pruned)
        self.audit.event("broker.policy.reloaded", None, {"generation": self.generation, "sessions": changed,
                                                           "subscriptions_dropped": pruned,
                                                           "profiles": sorted(policies.profiles)})
        return True

    def _rebind(self, binding: Binding) -> int:
        admission = binding.admission
        try:
            binding.policy = self._compile(admission.profile, admission.device_id)
        except (PolicyDenied, IotAuthError):
            binding.policy = deny_all(admission.device_id, admission.profile)
            self._kick([binding], "profile-removed", None)
        binding.generation = self.generation
        if self._host is not None and binding.session is not None:
            return self._host.prune([binding])
        return 0


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it, re-cancelling if needed.

    On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives
    just as its inner await completes; a single ``cancel()`` may then be lost and
    ``await task`` would hang forever.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


def _denier(identity: CertificateIdentity) -> Callable[..., Denial]:
    def deny(reason: str, detail: str = "", code: int = NOT_AUTHORISED) -> Denial:
        return Denial(reason, detail, code, identity.device_id, identity.fingerprint)

    return deny


@functools.lru_cache(maxsize=4096)
def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _accept_record(admission: Admission, connect: Connect) -> dict[str, Any]:
    return {
        "fingerprint": admission.fingerprint,
        "serial": admission.serial,
        "client_id": connect.client_id,
        "peer": admission.peer,
        "listener": admission.listener,
        "profile": admission.profile,
        "clean_session": connect.clean_session,
        "not_after": _timestamp(admission.not_after),
    }

