"""The broker's security state, free of amqtt: admission, live revocation, expiry and policy reload.

The :class:`Guard` puts three parts together and is what the gate and the
hosts behind it (iotauth's engine, or amqtt) talk to:

* **Admission** (:mod:`iotauth.broker.admission`) decides whether a connection
  may become a session, from the certificate on *that* TLS connection, the
  registry and the policy, with a credential cache the change feed keeps
  coherent and a guard against revocations that race a connect.
* **The feed follower** (:mod:`iotauth.broker.feed`) applies the registry's
  change feed to every admitted connection and fails closed when the
  registry cannot be read.
* **Bindings** (:mod:`iotauth.broker.binding`) are the live connections and
  the one way to withdraw their rights.

What stays here is what spans them:

* **Expiry.** Each binding has a timer for its certificate's ``notAfter``; when
  it fires the connection is closed (the session is kept, so a renewed
  certificate resumes it). A periodic sweep re-checks expiry against the wall
  clock in case the monotonic timer and the clock disagree.
* **Policy reload.** :meth:`Guard.reload` swaps the compiled profiles and
  recompiles every live binding (connected or offline); the broker then drops
  subscriptions the new rules no longer cover.

The hosts talk to the guard through the small
:class:`~iotauth.broker.binding.SessionHost` protocol; nothing here imports amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any

from iotauth.broker.admission import (
    RECENT_TTL,
    AdmissionControl,
    CompiledPolicies,
    CredentialCache,
    Precheck,
    RecentRevocations,
)
from iotauth.broker.audit import BrokerAudit
from iotauth.broker.binding import Binding, Bindings, Denial, GuardOptions, SessionHost
from iotauth.broker.feed import FeedFollower, FeedSource
from iotauth.broker.mqtt import Connect
from iotauth.certs import now_utc
from iotauth.errors import IotAuthError, PolicyDenied
from iotauth.histogram import LatencyHistogram
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.policy import Action, PolicySet, deny_all
from iotauth.registry import AuditEvent, EventKind

log = logging.getLogger("iotauth.broker")
DEFAULT_OPTIONS = GuardOptions()


class Guard:
    """See the module docstring.

    Args:
        registry: the registry reads admission and the feed follower make.
        verifier: client-certificate checks.
        policies: the profiles' topic rules.
        audit: the broker's audit writer.
        options: see :class:`~iotauth.broker.binding.GuardOptions`.
        load_policies: re-reads the profiles for :meth:`reload`.
        revoked_serials: serials on the published CRL file (consulted only when failing open).
        clock: the wall clock (pinned in tests).
        expire_pending: revokes stale pending certificates (one registry write; see
            :mod:`iotauth.registry.expiry`); run at every sweep, its failure only logged.
    """

    def __init__(
        self,
        *,
        registry: FeedSource,
        verifier: ClientCertificateVerifier,
        policies: PolicySet,
        audit: BrokerAudit,
        options: GuardOptions = DEFAULT_OPTIONS,
        load_policies: Callable[[], PolicySet] | None = None,
        revoked_serials: Callable[[], Collection[str]] | None = None,
        clock: Callable[[], datetime] = now_utc,
        expire_pending: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.registry = registry
        self._expire_pending = expire_pending
        self.audit = audit
        self.options = options
        self._load_policies = load_policies
        self._clock = clock
        self._compiled = CompiledPolicies(policies)
        self._bindings = Bindings(audit)
        credentials = CredentialCache()
        self._recent = RecentRevocations()
        self.feed = FeedFollower(
            registry=registry, bindings=self._bindings, credentials=credentials, recent=self._recent, options=options
        )
        self._admission = AdmissionControl(
            registry=registry,
            verifier=verifier,
            compiled=self._compiled,
            audit=audit,
            bindings=self._bindings,
            feed=self.feed,
            credentials=credentials,
            recent=self._recent,
            options=options,
            revoked_serials=revoked_serials,
            clock=clock,
        )
        self._credentials = credentials
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: SessionHost) -> None:
        """Attach to the broker and start following the registry (which must be readable now)."""
        self._bindings.host = host
        await self.feed.start()
        self.audit.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.feed.run(), name="iotauth-broker-feed"),
            loop.create_task(self._sweep(), name="iotauth-broker-sweep"),
        ]
        log.info("following the registry change feed from event %d (poll every %g s)",
                 self.feed.cursor, self.options.poll_interval)

    async def close(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        self._bindings.cancel_timers()
        await self.audit.close()

    @property
    def healthy(self) -> bool:
        return self.feed.healthy

    @property
    def cursor(self) -> int:
        """The id of the last registry event applied."""
        return self.feed.cursor

    @property
    def policies(self) -> PolicySet:
        return self._compiled.policies

    @policies.setter
    def policies(self, value: PolicySet) -> None:
        self._compiled.policies = value

    @property
    def generation(self) -> int:
        """How many times the policies were loaded; a binding of an older generation is recompiled."""
        return self._compiled.generation

    def connections(self, device_id: str | None = None) -> list[Binding]:
        return self._bindings.connected(device_id)

    def sessions(self) -> list[Binding]:
        """Every binding the broker holds: connected ones and those of offline persistent sessions."""
        return self._bindings.matching(None, None)

    @property
    def revocation_latency(self) -> LatencyHistogram:
        """Seconds from a revoking registry event to the disconnect it caused."""
        return self._bindings.revocation_latency

    # -- admission -------------------------------------------------------------------------

    async def precheck(self, der: bytes, peer: str, listener: str) -> Precheck | Denial:
        """What the certificate alone decides, when the TLS handshake ends (see :mod:`iotauth.broker.admission`)."""
        return await self._admission.precheck(der, peer, listener)

    async def admit(
        self, pre: Precheck, connect: Connect, peer: str, listener: str, close: Callable[[], None]
    ) -> Binding | Denial:
        """Decide on the CONNECT of a connection whose certificate passed :meth:`precheck`, and register it."""
        return await self._admission.admit(pre, connect, peer, listener, close)

    def deny_handshake(self, reason: str, detail: str, peer: str, listener: str) -> None:
        """Record a connection refused before a certificate named it (summarised per source under a flood)."""
        self._admission.deny_handshake(reason, detail, peer, listener)

    def deny_connect(self, reason: str, detail: str, fingerprint: str | None, peer: str, listener: str, *,
                     device_id: str | None = None) -> None:
        """Record a connection refused after its handshake (a bad first packet, a deadline) by its certificate."""
        self._admission.deny_connect(reason, detail, fingerprint, peer, listener, device_id=device_id)

    def limit_exceeded(self, binding: Binding, limit: str, detail: str) -> None:
        """Record that a session was closed for breaking a limit (``max_...``) or the protocol."""
        admission = binding.admission
        kind = EventKind.BROKER_PROTOCOL_VIOLATION if limit == "protocol-violation" else EventKind.BROKER_LIMIT_EXCEEDED
        self.audit.limit_exceeded(kind, limit, admission.device_id, {
            "limit": limit, "detail": detail[:300], "fingerprint": admission.fingerprint, "peer": admission.peer,
            "listener": admission.listener,
        })

    def attach(self, binding: Binding, session: Any, client_id: str | None, will_topic: str | None) -> bool:
        """Bind an admitted connection to the session its host opened for it.

        Re-checks what the host parsed against what the gate decided, so even a
        parser disagreement (amqtt's) cannot attach the binding to another client's session.
        """
        if binding.revoked is not None or client_id != binding.device_id:
            return False
        if binding.generation != self._compiled.generation:
            self._rebind(binding)
        if will_topic is not None and not binding.allows(Action.PUBLISH, will_topic):
            return False
        binding.session = session
        self._arm_expiry(binding)
        return binding.revoked is None

    def release(self, binding: Binding) -> None:
        """The connection is gone (its session may live on, offline)."""
        self._bindings.release(binding)

    def topic_denied(self, binding: Binding, action: str, topic: str) -> None:
        reason = binding.revoked or binding.policy.denial_reason(action, topic)
        self.audit.topic_denied(binding.device_id, str(action), reason, topic)

    # -- the change feed -------------------------------------------------------------------

    async def apply(self, batch: list[AuditEvent]) -> None:
        """Enforce a batch of registry events (in id order) and advance the cursor past them."""
        await self.feed.apply(batch)

    # -- expiry ----------------------------------------------------------------------------

    def _arm_expiry(self, binding: Binding) -> None:
        remaining = (binding.admission.not_after - self._clock()).total_seconds()
        binding.arm(remaining + 0.001, self._expired)

    def _expired(self, binding: Binding) -> None:
        if self._clock() <= binding.admission.not_after:
            self._arm_expiry(binding)  # the monotonic timer ran ahead of the wall clock
            return
        self._bindings.kick([binding], "certificate-expired", trigger=None)

    # -- periodic checks -------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.options.sweep_interval)
            await self.sweep()

    async def sweep(self) -> None:
        """Expire by wall clock, forget old race markers, and notice a registry that went back in time."""
        now = self._clock()
        self._bindings.kick([b for b in self._bindings.matching(None, None) if now > b.admission.not_after],
                           "certificate-expired", None)
        horizon = time.monotonic() - RECENT_TTL
        self._recent.forget_before(horizon)
        self._credentials.forget_before(horizon)
        await self.feed.check_position()
        if self._expire_pending is not None:
            try:
                async with asyncio.timeout(max(self.options.registry_timeout, 5.0)):
                    await self._expire_pending()
            except (IotAuthError, TimeoutError) as exc:
                log.warning("cannot expire stale pending certificates: %s", exc)

    # -- policy reload ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Reload the profiles and recompile every live binding; keep the old rules if the new ones are bad."""
        if self._load_policies is None:
            return False
        try:
            policies = self._load_policies()
        except IotAuthError as exc:
            log.error("policy reload failed, keeping the previous rules: %s", exc)
            self.audit.event(EventKind.BROKER_POLICY_RELOAD_FAILED, None, {"error": str(exc)[:500]})
            return False
        self._compiled.reload(policies)
        changed = pruned = 0
        for binding in self._bindings.matching(None, None):
            if binding.revoked is None:
                changed += 1
                pruned += self._rebind(binding)
        log.info("policies reloaded (generation %d): %d sessions recompiled, %d subscriptions dropped",
                 self.generation, changed, pruned)
        self.audit.event(EventKind.BROKER_POLICY_RELOADED, None, {"generation": self.generation, "sessions": changed,
                                                                  "subscriptions_dropped": pruned,
                                                                  "profiles": sorted(policies.profiles)})
        return True

    def _rebind(self, binding: Binding) -> int:
        admission = binding.admission
        try:
            binding.policy = self._compiled.bind(admission.profile, admission.device_id)
        except (PolicyDenied, IotAuthError):
            binding.policy = deny_all(admission.device_id, admission.profile)
            self._bindings.kick([binding], "profile-removed", None)
        binding.generation = self._compiled.generation
        host = self._bindings.host
        if host is not None and binding.session is not None:
            return host.prune([binding])
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
