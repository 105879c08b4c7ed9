"""What the renewal service decides for one message on ``devices/<id>/rotation/request``.

Authorization never rests on the broker's ACL alone. The broker lets only
``<id>`` publish on ``devices/<id>/...``, but the renewer checks everything
again, in this order, and refuses with the protocol's code (each refusal in
the audit log, aggregated per device and reason like the broker's):

1. the message's shape and size (bounded before parsing), and that its
   ``device_id`` is the topic's: a request published on another device's
   topic is refused, and every answer goes to the *topic's* device;
2. per-device request rate (in memory, before any cryptography);
3. the timestamp is within ``[rotation] max_clock_skew`` of the renewer's clock;
4. the certificate the request names (by SHA-256) is this device's, and the
   signature verifies with *its* key: only the holder of the current key gets
   further; then certificate active and unexpired, device active;
5. the CSR proves possession of the new key, whose type the profile allows;
6. the renewal window (``[profiles.NAME] renew_after``) unless an operator's
   order is open;
7. signed, then recorded pending inside one registry transaction that checks
   again what can race: request id never seen (replay), current certificate
   and device still active, new key never used, one pending renewal per
   device, renewals per hour, window (:mod:`iotauth.registry.renewal`).

A confirmation (signed by the *new* key over the new serial) activates the
renewal: new certificate active, old one revoked (superseded), one
transaction. Failures of the registry or the CA become ``internal`` with a
``retry_after``, never a silent drop.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotauth.authority import Authority
from iotauth.broker.ledger import DenialLedger
from iotauth.certs import cert_time, now_utc
from iotauth.errors import CsrRejected, IotAuthError, RefusalCode, RenewalRefused, RotationMessageError
from iotauth.histogram import LatencyHistogram
from iotauth.pki.csr import load_device_csr
from iotauth.pki.keys import check_key_allowed
from iotauth.registry import CertificateRecord, CertificateStatus, DeviceStatus, EventKind
from iotauth.registry.journal import EventJournal
from iotauth.rotation import messages
from iotauth.rotation.messages import Confirm, Renew, Response

log = logging.getLogger("iotauth.rotation")

RETRY_INTERNAL = 30
ACTIVATED_BY_CONFIRM = "confirm"


@dataclass(frozen=True)
class Answer:
    """A response to publish on ``devices/<device_id>/rotation/response``."""

    device_id: str
    response: Response

    @property
    def topic(self) -> str:
        return messages.response_topic(self.device_id)


def window_opens(record: CertificateRecord, renew_after: float) -> str | None:
    """When a certificate's device may renew it on its own (certificate time), or None for any time."""
    if renew_after <= 0:
        return None
    return _window_opens(record.not_before, record.not_after, renew_after)


@functools.lru_cache(maxsize=4096)
def _window_opens(not_before: str, not_after: str, renew_after: float) -> str:
    """(A fleet issued together shares its validity: one computation per batch of certificates.)"""
    start, end = _cert_time(not_before), _cert_time(not_after)
    return cert_time(start + (end - start) * renew_after)


def _cert_time(text: str) -> datetime:
    """A certificate time (``2026-11-30T16:00:00Z``) as an aware UTC datetime."""
    return datetime.fromisoformat(text).astimezone(UTC)


@functools.lru_cache(maxsize=8192)
def _certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


@functools.lru_cache(maxsize=8)
def _pem(ca: x509.Certificate) -> str:
    """An issuing CA's PEM (the second half of every chain the renewer answers with)."""
    return ca.public_bytes(Encoding.PEM).decode()


class RequestRate:
    """Requests per device in the last minute, in memory: a flood is refused before any cryptography."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def allow(self, device_id: str) -> int | None:
        """None if the device may send another request now, else seconds until it may."""
        now = self._clock()
        times = self._seen.setdefault(device_id, deque())
        while times and now - times[0] >= 60.0:
            times.popleft()
        if len(times) >= self.per_minute:
            return max(1, int(60.0 - (now - times[0]) + 0.999))
        times.append(now)
        if len(self._seen) > 100_000:  # forget idle devices
            for key in [k for k, v in self._seen.items() if not v or now - v[-1] >= 60.0]:
                del self._seen[key]
        return None


class RefusalAudit:
    """``rotation.refused`` events: the first per (device, certificate, code) in full, repeats counted.

    The same aggregation as the broker's refusals (:class:`~iotauth.broker.ledger.DenialLedger`), so a device
    flooding its request topic cannot thin out the trail, and costs one event per interval, not one per message.
    """

    def __init__(self, journal: EventJournal) -> None:
        self._journal = journal
        self.ledger = DenialLedger()

    def refused(self, device_id: str, code: RefusalCode, data: dict[str, Any]) -> bool:
        return self.ledger.record(EventKind.ROTATION_REFUSED, code.value, device_id, {**data, "peer": device_id})

    async def flush(self, *, everything: bool = False) -> None:
        for kind, device_id, data in self.ledger.due(everything=everything):
            self._journal.record(kind, device_id, data)
        if self._journal.backlog:
            await self._journal.flush(timeout=30.0)


UNREADABLE, IGNORED, REFUSED = "unreadable", "ignored", "refused"


@dataclass
class RenewalCounts:
    """What the renewer answered, for ``--metrics-bind`` (plain numbers, read when scraped; no device ids).

    Attributes:
        requests: by (message type, result): ``renew``/``confirm``/``unreadable`` (no type could be read) and
            ``issued``/``reissued`` (a retry got its pending certificate again)/``activated``/``refused``/``ignored``
            (not a request topic).
        refusals: by the protocol's refusal code.
        issuance: seconds from taking up a renewal request to its certificate signed and durably recorded.
    """

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    issuance: LatencyHistogram = field(default_factory=LatencyHistogram)


class Renewer:
    """Decide on renewal requests and confirmations (see the module docstring).

    Args:
        authority: signs and records (its registry is the one every check reads).
        audit: where refusals go.
        actor: who the renewer's registry events are written as.
        clock: the wall clock (pinned in tests).
    """

    def __init__(self, authority: Authority, audit: RefusalAudit, *, actor: str,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.authority = authority
        self.registry = authority.registry
        self.settings = authority.settings
        self.audit = audit
        self.actor = actor
        self._clock = clock
        self.rate = RequestRate(self.settings.rotation.max_requests_per_minute)
        self.stats: dict[str, int] = {"issued": 0, "reissued": 0, "activated": 0, "refused": 0}
        self.counts = RenewalCounts()

    async def handle(self, topic: str, payload: bytes) -> Answer | None:
        """Decide on one message from a request topic; the answer to publish, or None if there is no one to answer."""
        device_id = messages.device_of_request_topic(topic)
        if device_id is None:
            log.warning("message on %r ignored: not a device's rotation request topic", topic[:120])
            self.counts.requests[(UNREADABLE, IGNORED)] += 1
            return None
        request_id: str | None = None
        details: dict[str, Any] = {}
        started = time.monotonic()
        try:
            message = messages.decode_request(payload)
            request_id = messages.b64(message.request_id)
            details = {"request_id": request_id, "type": message.kind.value}
            response = await self._decide(device_id, message, details)
            result = "reissued" if details.get("reissued") else response.status.value
            self.counts.requests[(message.kind.value, result)] += 1
            if response.status is messages.Status.ISSUED:
                self.counts.issuance.observe(time.monotonic() - started)
            return Answer(device_id, response)
        except RotationMessageError as exc:
            request_id = exc.request_id or request_id
            return self._refuse(device_id, request_id, exc, details)
        except RenewalRefused as exc:
            return self._refuse(device_id, request_id, exc, details)
        except Exception as exc:  # the registry or the CA failed: the device should come back later
            log.error("renewal request of %s failed: %s: %s", device_id, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, IotAuthError))
            return self._refuse(device_id, request_id, RenewalRefused(
                RefusalCode.INTERNAL, "the renewal service cannot decide now; try again later", RETRY_INTERNAL),
                {**details, "detail": str(exc)[:200]})

    def _refuse(self, device_id: str, request_id: str | None, exc: RenewalRefused,
                details: dict[str, Any]) -> Answer | None:
        self.stats["refused"] += 1
        self.counts.requests[(str(details.get("type", UNREADABLE)), REFUSED)] += 1
        self.counts.refusals[exc.code.value] += 1
        if self.audit.refused(device_id, exc.code, {"fingerprint": details.pop("fingerprint", None),
                                                     "detail": str(exc)[:300], **details}):
            log.info("refused %s of %s: %s (%s)", details.get("type", "message"), device_id, exc.code.value, exc)
        if request_id is None:
            return None
        return Answer(device_id, messages.refused(request_id, exc.code, str(exc), exc.retry_after))

    async def _decide(self, device_id: str, message: Renew | Confirm, details: dict[str, Any]) -> Response:
        if message.device_id != device_id:
            raise RenewalRefused(RefusalCode.BAD_REQUEST,
                                 f"the message names device {message.device_id!r} but was published on the topic of "
                                 f"{device_id!r}")
        wait = self.rate.allow(device_id)
        if wait is not None:
            raise RenewalRefused(RefusalCode.RATE_LIMITED, f"more than {self.rate.per_minute} requests a minute",
                                 wait)
        skew = abs(self._clock().timestamp() - message.timestamp)
        if skew > self.settings.rotation.max_clock_skew.total_seconds():
            raise RenewalRefused(RefusalCode.STALE, f"timestamp is {int(skew)} s away from the renewer's clock "
                                 f"(at most {int(self.settings.rotation.max_clock_skew.total_seconds())} s)")
        if isinstance(message, Renew):
            details["fingerprint"] = message.certificate
            return await self._renew(device_id, message, details)
        return await self._confirm(device_id, message, details)

    async def _renew(self, device_id: str, message: Renew, details: dict[str, Any]) -> Response:
        credential = await self.registry.renewal_credential(message.certificate)
        if credential is None or credential.certificate.device_id != device_id:
            raise RenewalRefused(RefusalCode.NOT_CURRENT_CERTIFICATE,
                                 "the registry has no certificate with that SHA-256 for this device")
        current, device = credential.certificate, credential.device
        if not messages.verify(_certificate(current.pem).public_key(), message.signature, message.signed):
            raise RenewalRefused(RefusalCode.BAD_SIGNATURE, "the signature does not verify with the named "
                                 "certificate's key")
        if device.status is not DeviceStatus.ACTIVE:
            raise RenewalRefused(RefusalCode.DEVICE_NOT_ACTIVE, f"device is {device.status.value}")
        if current.status is not CertificateStatus.ACTIVE:
            raise RenewalRefused(RefusalCode.NOT_CURRENT_CERTIFICATE, f"certificate {current.serial} is "
                                 f"{current.status.value}, not the device's current one")
        now = self._clock()
        if current.not_after <= cert_time(now):
            raise RenewalRefused(RefusalCode.CERTIFICATE_EXPIRED, f"certificate expired at {current.not_after}")
        try:
            csr = load_device_csr(message.csr)  # proof of possession: the CSR's signature verified, once
        except CsrRejected as exc:
            raise RenewalRefused(RefusalCode.BAD_REQUEST, str(exc)) from None
        profile = self.settings.profile(device.profile)
        try:
            check_key_allowed(csr.csr.public_key(), profile.key_types, profile.rsa_min_bits)
        except CsrRejected as exc:
            raise RenewalRefused(RefusalCode.KEY_TYPE_NOT_ALLOWED, str(exc)) from None
        opens = window_opens(current, profile.renew_after)
        if opens is not None and cert_time(now) < opens and await self.registry.open_order(device_id) is None:
            raise RenewalRefused(RefusalCode.OUTSIDE_WINDOW, f"the renewal window opens at {opens}",
                                 max(1, int((_cert_time(opens) - now).total_seconds() + 0.999)))
        request_id = details["request_id"]
        result, chain = await self.authority.renew(csr, device, current, request_id=request_id,
                                                   window_opens=opens, actor=self.actor)
        self.stats["reissued" if result.reused else "issued"] += 1
        details["reissued"] = result.reused
        log.debug("issued renewal %s of %s (%s) for request %s", result.record.serial, device_id, result.trigger,
                  request_id)
        return messages.issued(request_id, result.record.serial, result.record.not_after,
                               result.record.pem + _pem(chain[1]))

    async def _confirm(self, device_id: str, message: Confirm, details: dict[str, Any]) -> Response:
        record = await self.registry.renewal_certificate(message.serial)
        if record is None or record.device_id != device_id:
            raise RenewalRefused(RefusalCode.NOT_CURRENT_CERTIFICATE, f"{message.serial} is not a renewal of this "
                                 "device")
        details["fingerprint"] = record.fingerprint
        if not messages.verify(_certificate(record.pem).public_key(), message.signature, message.signed):
            raise RenewalRefused(RefusalCode.BAD_SIGNATURE, "the confirmation does not verify with the new "
                                 "certificate's key")
        done = await self.registry.activate_renewal(
            message.serial, device_id=device_id, actor=self.actor, via=ACTIVATED_BY_CONFIRM,
            max_age=self.settings.pending_ttl, request_id=details["request_id"])
        if not done.already:
            self.stats["activated"] += 1
            log.debug("activated renewal %s of %s (confirmed)", message.serial, device_id)
        return messages.activated(details["request_id"], message.serial)


def clock_margin(settings_skew: timedelta) -> timedelta:
    """How long request ids must be kept: a request older than the skew is refused as stale anyway."""
    return settings_skew * 2 + timedelta(minutes=1)
