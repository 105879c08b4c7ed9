"""Admission: one connection's certificate, the registry and the policy in; a binding or a denial out.

Two steps. :meth:`AdmissionControl.precheck` runs as soon as the TLS handshake
ends and decides from the certificate presented on *this* TLS connection
alone (chain, usage and identity, cached by the verifier; the registry:
certificate and device both active; the profile's compiled policy), so a
refused certificate never waits for a CONNECT. :meth:`AdmissionControl.admit`
then decides on the CONNECT: the client id must be the certificate's device
id, the will must be inside the policy, and no revocation may have landed
in between.

* **Credential cache.** Usable credentials are cached by fingerprint
  (:class:`CredentialCache`), and the change feed keeps the cache coherent:
  every registry event that names a device drops that device's entries before
  anything else sees the event, and an entry is only stored if no event about
  the device was applied while its lookup was in flight. So a cached answer is
  never older than the feed position -- the same freshness every live session
  already has -- and a revoked credential is refused or kicked within one poll.
* **Connect/revoke race.** An admission remembers the feed position from
  before its registry lookup. A revocation that lands between the lookup and
  the moment the connection is registered is caught by comparing event ids
  (:class:`RecentRevocations`); one that lands later finds the registered binding.
* **Fail closed.** While the feed cannot be read or the audit log cannot be
  written, connects are refused with CONNACK 0x03, unless ``fail_open``.
* **Renewals activate at their first CONNECT.** A *pending* certificate is
  refused, except a renewal issued over MQTT (``renewal_of``) of an active
  device, younger than ``renewal_ttl``: the device proved it holds the new key
  in this handshake, so after the CONNECT checks (client id, will) the renewal
  is activated -- new certificate active, the one it replaces revoked
  (superseded), one registry transaction -- before CONNACK. The feed then
  closes any session still on the old certificate. The registry re-checks
  everything in that transaction; a refusal there refuses the CONNECT.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from iotauth.broker.audit import BrokerAudit
from iotauth.broker.binding import Admission, Binding, Bindings, Denial, GuardOptions
from iotauth.broker.mqtt import IDENTIFIER_REJECTED, NOT_AUTHORISED, SERVER_UNAVAILABLE, Connect
from iotauth.certs import cert_time
from iotauth.config import DEFAULT_PROFILE
from iotauth.errors import IotAuthError, PolicyDenied, Rejection, RenewalRefused
from iotauth.pki.verify import CertificateIdentity, ClientCertificateVerifier
from iotauth.policy import PolicySet, SessionPolicy
from iotauth.registry import CertificateStatus, Credential, DeviceStatus
from iotauth.registry.activation import Activation
from iotauth.registry.events import ACTIVATED_AT_CONNECT

log = logging.getLogger("iotauth.broker")

CREDENTIAL_CACHE = 200_000
RECENT_TTL = 300.0  # far longer than any admission can take (its awaits are all bounded)


class CredentialSource(Protocol):
    """The registry read admission makes, and its one write (``iotauth.registry.Registry`` provides them)."""

    async def find_credential(self, cert_fingerprint: str) -> Credential | None: ...

    async def activate_renewal(self, serial: str, *, device_id: str, actor: str, via: str,
                               max_age: timedelta | None = None, request_id: str | None = None) -> Activation: ...


class FeedPosition(Protocol):
    """How far the change feed has been applied, and whether it can be read at all."""

    @property
    def cursor(self) -> int: ...

    @property
    def healthy(self) -> bool: ...


class CredentialCache:
    """Usable credentials by fingerprint -> (device, profile), invalidated by the change feed per device."""

    def __init__(self, size: int = CREDENTIAL_CACHE) -> None:
        self._size = size
        self._profiles: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._by_device: dict[str, set[str]] = {}
        self._touched: dict[str, tuple[int, float]] = {}

    def profile(self, fingerprint: str) -> str | None:
        """The cached profile of a usable certificate (and mark it recently used), or None."""
        cached = self._profiles.get(fingerprint)
        if cached is None:
            return None
        self._profiles.move_to_end(fingerprint)
        return cached[1]

    def last_profile(self, fingerprint: str) -> str | None:
        """The profile last seen for this certificate, without touching the cache (fail-open)."""
        cached = self._profiles.get(fingerprint)
        return cached[1] if cached is not None else None

    def store(self, device_id: str, fingerprint: str, profile: str, cursor: int) -> None:
        """Remember a lookup made at feed position ``cursor``, unless the device changed since."""
        touched = self._touched.get(device_id)
        if touched is not None and touched[0] > cursor:
            return  # the device changed while we were reading it: do not keep what we read
        self._profiles[fingerprint] = (device_id, profile)
        self._profiles.move_to_end(fingerprint)
        self._by_device.setdefault(device_id, set()).add(fingerprint)
        if len(self._profiles) > self._size:
            fp, (evicted, _) = self._profiles.popitem(last=False)
            self._by_device.get(evicted, set()).discard(fp)

    def invalidate(self, device_id: str, event_id: int, now: float) -> None:
        """Event ``event_id`` changed the device: drop its entries and refuse lookups made before it."""
        self._touched[device_id] = (event_id, now)
        for fp in self._by_device.pop(device_id, ()):
            self._profiles.pop(fp, None)

    def drop(self, fingerprint: str) -> None:
        self._profiles.pop(fingerprint, None)

    def clear(self) -> None:
        self._profiles.clear()
        self._by_device.clear()

    def forget_before(self, horizon: float) -> None:
        """Forget change markers older than ``horizon`` (monotonic seconds): no lookup is that old."""
        _expire(self._touched, horizon)


class RecentRevocations:
    """Revocations the feed applied lately, by device and by certificate, with their event ids."""

    def __init__(self) -> None:
        self._devices: dict[str, tuple[int, float]] = {}
        self._certificates: dict[str, tuple[int, float]] = {}

    def device(self, device_id: str, event_id: int, now: float) -> None:
        self._devices[device_id] = (event_id, now)

    def certificate(self, fingerprint: str, event_id: int, now: float) -> None:
        self._certificates[fingerprint] = (event_id, now)

    def since(self, identity: CertificateIdentity, cursor: int) -> bool:
        """Whether the identity's device or certificate was revoked by an event after ``cursor``."""
        device = self._devices.get(identity.device_id)
        cert = self._certificates.get(identity.fingerprint)
        return (device is not None and device[0] > cursor) or (cert is not None and cert[0] > cursor)

    def forget_before(self, horizon: float) -> None:
        _expire(self._devices, horizon)
        _expire(self._certificates, horizon)


def _expire(table: dict[str, tuple[int, float]], horizon: float) -> None:
    for key in [k for k, (_, seen) in table.items() if seen < horizon]:
        del table[key]


class CompiledPolicies:
    """The profiles' topic rules, compiled once per identity and shared until the next reload.

    Compiled policies are immutable, so sessions of one identity share one.
    ``generation`` counts reloads, so a binding compiled earlier can tell it is stale.
    """

    def __init__(self, policies: PolicySet) -> None:
        self.generation = 1
        self._policies = policies
        self._compiled: dict[tuple[str, str], SessionPolicy] = {}

    @property
    def policies(self) -> PolicySet:
        return self._policies

    @policies.setter
    def policies(self, value: PolicySet) -> None:
        self._policies = value
        self._compiled = {}

    def reload(self, policies: PolicySet) -> None:
        self.policies = policies
        self.generation += 1

    def bind(self, profile: str, device_id: str) -> SessionPolicy:
        key = (profile, device_id)
        policy = self._compiled.get(key)
        if policy is None:
            policy = self._compiled[key] = self._policies.bind(profile, device_id)
            if len(self._compiled) > CREDENTIAL_CACHE:
                self._compiled.pop(next(iter(self._compiled)))
        return policy


@dataclass(frozen=True)
class Precheck:
    """What the certificate of a connection established, before its CONNECT (see :meth:`AdmissionControl.precheck`)."""

    identity: CertificateIdentity
    profile: str
    policy: SessionPolicy
    cursor: int
    renewal: str | None = None
    """The serial of a pending renewal this connection activates once its CONNECT passes."""


@dataclass(frozen=True)
class _PendingRenewal:
    profile: str
    serial: str


class AdmissionControl:
    """Decide on connections (see the module docstring) and record every denial.

    Args:
        registry: where credentials are looked up.
        verifier: chain, usage and identity checks of client certificates.
        compiled: the current policies.
        audit: the broker's audit writer (accepts, denials).
        bindings: where admitted connections are registered.
        feed: the change feed's position and health.
        credentials, recent: the caches the feed keeps coherent.
        revoked_serials: serials on the published CRL file (used only when failing open).
        clock: the wall clock (pinned in tests).
    """

    def __init__(
        self,
        *,
        registry: CredentialSource,
        verifier: ClientCertificateVerifier,
        compiled: CompiledPolicies,
        audit: BrokerAudit,
        bindings: Bindings,
        feed: FeedPosition,
        credentials: CredentialCache,
        recent: RecentRevocations,
        options: GuardOptions,
        revoked_serials: Callable[[], Collection[str]] | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self.compiled = compiled
        self.audit = audit
        self.bindings = bindings
        self.feed = feed
        self.credentials = credentials
        self.recent = recent
        self.options = options
        self._revoked_serials = revoked_serials
        self._clock = clock

    async def precheck(self, der: bytes, peer: str, listener: str) -> Precheck | Denial:
        """Decide what the certificate alone decides: chain, identity, registry status and profile.

        Called as soon as the TLS handshake ends, so a refused certificate is
        audited and its connection closed without waiting for a CONNECT. The
        feed position read *before* the registry lookup travels with the result,
        so :meth:`admit` can see a revocation that lands in between.
        """
        decision = await self._precheck(der)
        if isinstance(decision, Denial):
            self._record_denial(decision, None, peer, listener)
        return decision

    async def admit(
        self, pre: Precheck, connect: Connect, peer: str, listener: str, close: Callable[[], None]
    ) -> Binding | Denial:
        """Decide on the CONNECT of a connection whose certificate passed :meth:`precheck`, and register it."""
        decision = await self._admit(pre, connect, peer, listener, close)
        if isinstance(decision, Denial):
            self._record_denial(decision, connect.client_id, peer, listener)
        return decision

    def deny_handshake(self, reason: str, detail: str, peer: str, listener: str) -> None:
        """Record a connection refused before a certificate named it."""
        self._record_denial(Denial(reason, detail), None, peer, listener)

    def deny_connect(self, reason: str, detail: str, fingerprint: str | None, peer: str, listener: str, *,
                     device_id: str | None = None) -> None:
        """Record a connection refused after its handshake, by its certificate."""
        self._record_denial(Denial(reason, detail, device_id=device_id, fingerprint=fingerprint), None, peer,
                            listener)

    async def _precheck(self, der: bytes) -> Precheck | Denial:
        try:
            identity = self.verifier.verify_der(der, self._clock())
        except Rejection as exc:
            return Denial(f"certificate-{exc.code}", str(exc), fingerprint=hashlib.sha256(der).hexdigest())
        deny = _denier(identity)
        if not self.options.fail_open:
            if not self.feed.healthy:
                return deny("registry-unavailable", "registry change feed is not readable", SERVER_UNAVAILABLE)
            if not self.audit.healthy:
                return deny("audit-unavailable", "the audit log cannot be written", SERVER_UNAVAILABLE)
        cursor = self.feed.cursor
        found = await self._lookup(identity)
        if isinstance(found, Denial):
            return found
        profile, renewal = (found.profile, found.serial) if isinstance(found, _PendingRenewal) else (found, None)
        try:
            policy = self.compiled.bind(profile, identity.device_id)
        except (PolicyDenied, IotAuthError) as exc:
            return deny("unknown-profile", str(exc))
        return Precheck(identity, profile, policy, cursor, renewal)

    async def _admit(
        self, pre: Precheck, connect: Connect, peer: str, listener: str, close: Callable[[], None]
    ) -> Binding | Denial:
        identity, profile = pre.identity, pre.profile
        deny = _denier(identity)
        if not connect.client_id:
            return deny("client-id-empty", "a zero-length client id cannot name a certificate's device",
                        IDENTIFIER_REJECTED)
        if connect.client_id != identity.device_id:
            return deny("client-id-mismatch",
                        f"client id {connect.client_id[:80]!r} is not the certificate's device id")
        try:
            policy = self.compiled.bind(profile, identity.device_id)  # the same object unless a reload happened
        except (PolicyDenied, IotAuthError) as exc:
            return deny("unknown-profile", str(exc))
        if connect.will is not None and not policy.allows_publish(connect.will.topic):
            return deny("will-topic-denied", f"will topic {connect.will.topic[:120]!r} is outside the policy")
        if pre.renewal is not None:
            refused = await self._activate(identity, pre.renewal)
            if refused is not None:
                return refused
        admission = Admission(
            identity.device_id, profile, identity.fingerprint, identity.serial, identity.not_after, peer, listener,
            connect.clean_session,
        )
        binding = Binding(admission, policy, self.compiled.generation, close)
        if self.recent.since(identity, pre.cursor):
            return deny("revoked-during-connect", "revoked while the connection was being checked")
        self.bindings.register(binding)
        try:
            await self.audit.accepted(identity.device_id, _accept_record(admission, connect),
                                      self.options.registry_timeout)
        except IotAuthError as exc:
            if not self.options.fail_open:
                self.bindings.release(binding)
                return deny("audit-unavailable", str(exc), SERVER_UNAVAILABLE)
            log.error("fail-open: admitting %s without an accept record: %s", identity.device_id, exc)
        if binding.revoked is not None:
            self.bindings.release(binding)
            return deny("revoked-during-connect", binding.revoked)
        log.debug("accepted %s (profile %s, certificate %s) from %s",
                  identity.device_id, profile, identity.serial, peer)
        return binding

    async def _activate(self, identity: CertificateIdentity, serial: str) -> Denial | None:
        """Activate the pending renewal this connection presents (see the module docstring); a Denial if not."""
        deny = _denier(identity)
        try:
            async with asyncio.timeout(self.options.registry_timeout):
                await self.registry.activate_renewal(serial, device_id=identity.device_id, actor=self.audit.actor,
                                                     via=ACTIVATED_AT_CONNECT,
                                                     max_age=timedelta(seconds=self.options.renewal_ttl))
        except RenewalRefused as exc:
            return deny(f"renewal-{exc.code.value}", str(exc))
        except Exception as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return deny("registry-unavailable", f"activating renewal {serial}: {exc or type(exc).__name__}",
                        SERVER_UNAVAILABLE)
        log.info("activated renewal %s of %s at its first CONNECT", serial, identity.device_id)
        return None

    async def _lookup(self, identity: CertificateIdentity) -> str | _PendingRenewal | Denial:
        """The device's profile if the registry says certificate and device are both active (cached).

        A pending renewal that may be activated at this CONNECT is returned as such (never cached).
        """
        if self.feed.healthy:
            cached = self.credentials.profile(identity.fingerprint)
            if cached is not None:
                return cached
        deny = _denier(identity)
        cursor = self.feed.cursor
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
        if credential.activatable(self._clock(), timedelta(seconds=self.options.renewal_ttl)):
            return _PendingRenewal(credential.device.profile, credential.certificate.serial)
        if credential.certificate.status is not CertificateStatus.ACTIVE:
            return deny(f"certificate-{credential.certificate.status.value}", "certificate is not active")
        if credential.device.status is not DeviceStatus.ACTIVE:
            return deny(f"device-{credential.device.status.value}", "device is not active")
        self.credentials.store(identity.device_id, identity.fingerprint, credential.device.profile, cursor)
        return credential.device.profile

    def _fail_open_profile(self, identity: CertificateIdentity) -> str | Denial:
        deny = _denier(identity)
        if self.recent.since(identity, -1):
            return deny("revoked", "revoked (seen on the change feed)")
        if self._revoked_serials is not None and identity.serial in self._revoked_serials():
            return deny("certificate-on-crl", "certificate is listed on the published CRL")
        log.warning("fail-open: admitting %s without the registry", identity.device_id)
        return self.credentials.last_profile(identity.fingerprint) or DEFAULT_PROFILE

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


def _denier(identity: CertificateIdentity) -> Callable[..., Denial]:
    def deny(reason: str, detail: str = "", code: int = NOT_AUTHORISED) -> Denial:
        return Denial(reason, detail, code, identity.device_id, identity.fingerprint)

    return deny


_not_after_text = functools.lru_cache(maxsize=4096)(cert_time)


def _accept_record(admission: Admission, connect: Connect) -> dict[str, Any]:
    return {
        "fingerprint": admission.fingerprint,
        "serial": admission.serial,
        "client_id": connect.client_id,
        "peer": admission.peer,
        "listener": admission.listener,
        "profile": admission.profile,
        "clean_session": connect.clean_session,
        "not_after": _not_after_text(admission.not_after),
    }
