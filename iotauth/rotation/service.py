"""``iotauth renewer``: the renewal service, an ordinary MQTT client of whichever broker the devices use.

It holds the CA key (opened through :func:`iotauth.castore.load_ca`, so a key
on a PKCS#11 token works as for ``iotauth issue``); the broker never signs
anything. What it runs:

* **Its own identity.** A certificate for ``[rotation] renewer_id`` under the
  ``renewer`` profile, kept in ``<home>/renewer/`` (key 0600). It issues one
  at the first start, and a new one (revoking the old, superseded) whenever
  its own renewal window has opened, so it never expires in service.
* **Requests.** It subscribes to ``devices/+/rotation/request`` at QoS 1 on a
  persistent session (requests published while it is down wait at the
  broker) and acknowledges each only after answering it. Messages are decided
  concurrently by :class:`~iotauth.rotation.renewer.Renewer`; the registry
  groups their writes into few transactions.
* **Operators' orders.** It follows the registry's change feed from a cursor
  kept in the registry (``renewer:orders``): each ``rotation.requested`` is
  published *retained* on ``devices/<id>/commands/rotate`` (a device that is
  offline gets it when it subscribes), and cleared once a renewal of that
  device was activated. At every start it republishes the open orders (a
  broker keeps retained messages in memory).
* **Housekeeping.** Stale pending certificates are revoked by the shared
  sweep (:mod:`iotauth.registry.expiry`); request ids older than the clock
  window are forgotten; refusals are written to the audit log every second.

paho-mqtt runs its network loop in a thread; messages cross into asyncio with
``call_soon_threadsafe`` and answers go back through paho's thread-safe
publish. One renewer per home: a second one with the same identity would
take over the first one's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from paho.mqtt.enums import CallbackAPIVersion

from iotauth.authority import Authority, open_authority
from iotauth.certs import cert_time, fingerprint, now_utc, pem
from iotauth.config import RENEWER_PROFILE, Home, registry_location
from iotauth.errors import IotAuthError, PkiError
from iotauth.files import replace_secret, write_public
from iotauth.metrics import exporting
from iotauth.pki.keys import generate_private_key, load_private_key, private_key_pem
from iotauth.registry import CertificateStatus, Registry, RevocationReason, open_registry
from iotauth.registry.events import ROTATION_ORDERS, renewal_activated
from iotauth.registry.expiry import expire_pending_forever
from iotauth.registry.journal import EventJournal
from iotauth.rotation import messages
from iotauth.rotation.metrics import renewer_metrics
from iotauth.rotation.renewer import RefusalAudit, Renewer, clock_margin, window_opens

log = logging.getLogger("iotauth.rotation")

CURSOR = "renewer:orders"
V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
FATAL_REFUSALS = 5
RESUBSCRIBE_AFTER = 2.0  # seconds before a refused subscription to the requests is tried again


def renewer_actor() -> str:
    return f"renewer@{socket.gethostname()}"[:128]


@dataclass(frozen=True)
class RenewerOptions:
    """How to run the renewer (``iotauth renewer``'s flags).

    Attributes:
        broker: ``HOST:PORT`` of the MQTT-over-TLS broker; default ``[broker] host`` and ``port``.
        cafile: the trust anchors for the broker's server certificate; default the home's ``ca/chain.pem``.
        workers: messages decided at once.
        poll_interval: seconds between change-feed polls (SQLite; PostgreSQL is woken by NOTIFY).
    """

    home: Home
    registry: str | None = None
    broker: tuple[str, int] | None = None
    cafile: Path | None = None
    workers: int = 256
    poll_interval: float = 0.2
    keepalive: int = 30
    metrics_bind: str | None = None
    """``[HOST:]PORT`` of the Prometheus exporter (``PORT`` alone: loopback), or None."""
    crash_at: str | None = None
    """Testing: die with SIGKILL at this step of the first message that reaches it (see :data:`CRASH_POINTS`)."""


CRASH_POINTS = ("received", "issued", "activated", "answered")
"""``received``: before deciding; ``issued``/``activated``: after the registry committed, before answering;
``answered``: after answering, before acknowledging the request to the broker."""


@dataclass(frozen=True)
class Identity:
    device_id: str
    cert: Path
    key: Path
    serial: str


@dataclass(frozen=True)
class Started:
    identity: Identity
    broker: tuple[str, int]
    metrics: tuple[str, int] | None = None

    def as_dict(self) -> dict[str, object]:
        started: dict[str, object] = {"renewer": self.identity.device_id, "serial": self.identity.serial,
                                      "broker": f"{self.broker[0]}:{self.broker[1]}"}
        if self.metrics is not None:
            started["metrics"] = f"{self.metrics[0]}:{self.metrics[1]}"
        return started


# -- the renewer's own certificate -----------------------------------------------------------


async def ensure_identity(authority: Authority, home: Home, actor: str) -> Identity:
    """The renewer's certificate and key in ``<home>/renewer/``: kept while good, else issued anew.

    A new certificate is issued when there is none, when the files do not
    match, when the registry no longer has it active, or once its renewal
    window (the ``renewer`` profile's ``renew_after``) has opened; the
    renewer's other active certificates are then revoked (superseded).
    """
    settings = authority.settings
    renewer_id = settings.rotation.renewer_id
    directory = home.root / "renewer"
    key_path, cert_path = directory / "renewer.key", directory / "renewer.crt"
    kept = _load_identity(key_path, cert_path)
    profile = settings.profile(RENEWER_PROFILE)
    if kept is not None:
        credential = await authority.registry.find_credential(fingerprint(kept))
        opens = window_opens(credential.certificate, profile.renew_after) if credential else None
        now = cert_time(now_utc())
        if (credential is not None and credential.usable and credential.device.device_id == renewer_id
                and now < credential.certificate.not_after and (opens is None or now < opens)):
            return Identity(renewer_id, cert_path, key_path, credential.certificate.serial)
    key = generate_private_key("p256")
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    issued = await authority.issue(csr, renewer_id, RENEWER_PROFILE, activate=True, actor=actor)
    replace_secret(key_path, private_key_pem(key, None))
    write_public(cert_path, issued.pem + b"".join(pem(c) for c in issued.chain[:1]))
    for record in await authority.registry.certificates_of(renewer_id):
        if record.status is CertificateStatus.ACTIVE and record.serial != issued.record.serial:
            await authority.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED, actor=actor)
    log.info("issued the renewer's own certificate %s (%s, profile %s)", issued.record.serial, renewer_id,
             RENEWER_PROFILE)
    return Identity(renewer_id, cert_path, key_path, issued.record.serial)


def _load_identity(key_path: Path, cert_path: Path) -> x509.Certificate | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = load_private_key(key_path.read_bytes(), None, "the renewer's key")
    except (OSError, ValueError, PkiError):
        return None
    return cert if cert.public_key() == key.public_key() else None


# -- MQTT ------------------------------------------------------------------------------------


Deliver = Callable[[str, bytes, int, int], None]


@dataclass
class LinkCounts:
    """The renewer's MQTT connection, for ``--metrics-bind`` (written by paho's thread, read when scraped)."""

    up: bool = False
    subscribed: bool = False  # the broker granted devices/+/rotation/request
    connects: int = 0
    disconnects: int = 0
    refused: int = 0  # CONNACKs refusing the renewer
    subscriptions_refused: int = 0


class MqttLink:
    """paho-mqtt in its own thread, bridged to an asyncio loop (see the module docstring)."""

    def __init__(self, identity: Identity, broker: tuple[str, int], cafile: Path, keepalive: int,
                 loop: asyncio.AbstractEventLoop, deliver: Deliver, counts: LinkCounts | None = None) -> None:
        self.broker = broker
        self.keepalive = keepalive
        self.connected = asyncio.Event()
        """Set while connected *and* the broker granted the subscription to the requests."""
        self.refusals = 0
        self.last_refusal: str | None = None
        self.subscription_refusals = 0
        self.resubscribe_after = RESUBSCRIBE_AFTER
        self.counts = counts or LinkCounts()
        self._loop = loop
        self._deliver = deliver
        self._lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identity.device_id, protocol=paho.MQTTv311,
                             clean_session=False, manual_ack=True)
        client.tls_set(ca_certs=str(cafile), certfile=str(identity.cert), keyfile=str(identity.key),
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def start(self) -> None:
        self.client.connect_async(self.broker[0], self.broker[1], keepalive=self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def ack(self, mid: int, qos: int) -> None:
        if qos:
            self.client.ack(mid, qos)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        code = V5_TO_V311.get(reason.value, reason.value) if hasattr(reason, "value") else int(reason)
        if code != 0:
            self.refusals += 1
            self.counts.refused += 1
            self.last_refusal = f"CONNACK {code} ({reason})"
            log.error("the broker at %s:%d refused the renewer: %s", *self.broker, self.last_refusal)
            return
        self.refusals = 0
        self.counts.connects += 1
        self.counts.up = True
        log.info("connected to %s:%d; subscribing to %s", *self.broker, messages.REQUEST_FILTER)
        client.subscribe(messages.REQUEST_FILTER, qos=1)

    def _on_subscribe(self, client: paho.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        """Ready only once the broker *granted* the subscription: a refused one would read nothing, silently.

        A managed Mosquitto refuses it when the renewer connects before the
        follower gave its new identity a client and role (it then kicks the
        renewer into its rights, and the reconnect subscribes again); any broker
        refuses it when the ``renewer`` profile lacks the rights. Either way the
        renewer says so and tries again every ``resubscribe_after`` seconds.
        """
        if reasons and not any(getattr(r, "is_failure", False) for r in reasons):
            self.subscription_refusals = 0
            self.counts.subscribed = True
            log.info("reading %s", messages.REQUEST_FILTER)
            self._loop.call_soon_threadsafe(self.connected.set)
            return
        self.subscription_refusals += 1
        self.counts.subscriptions_refused += 1
        self.counts.subscribed = False
        self.last_refusal = f"the subscription to {messages.REQUEST_FILTER} was refused"
        log.error("the broker at %s:%d refused the renewer's subscription to %s (does the %r profile allow it?); "
                  "retrying in %g s", *self.broker, messages.REQUEST_FILTER, RENEWER_PROFILE, self.resubscribe_after)
        retry = threading.Timer(self.resubscribe_after, self._resubscribe, (client,))
        retry.daemon = True
        retry.start()

    @staticmethod
    def _resubscribe(client: paho.Client) -> None:
        if client.is_connected():
            client.subscribe(messages.REQUEST_FILTER, qos=1)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("disconnected from %s:%d (%s); reconnecting", *self.broker, reason)
        if self.counts.up:
            self.counts.disconnects += 1
        self.counts.up = self.counts.subscribed = False
        self._loop.call_soon_threadsafe(self.connected.clear)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(self._deliver, message.topic, bytes(message.payload), message.mid,
                                        message.qos)


# -- the service -----------------------------------------------------------------------------


class RenewerService:
    """Everything ``iotauth renewer`` runs (see the module docstring)."""

    def __init__(self, options: RenewerOptions, authority: Authority, identity: Identity, actor: str) -> None:
        settings = authority.settings
        self.options = options
        self.authority = authority
        self.registry: Registry = authority.registry
        self.identity = identity
        self.actor = actor
        self.broker = options.broker or (settings.broker_host, settings.broker_port)
        self.audit = RefusalAudit(EventJournal(self.registry, actor, "the renewer's audit journal"))
        self.renewer = Renewer(authority, self.audit, actor=actor)
        self.queue: asyncio.Queue[tuple[str, bytes, int, int]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.link_counts = LinkCounts()  # kept across reconnects with a new certificate
        self.link = self._link()
        self.orders_published = 0
        self.orders_cleared = 0
        self.open_orders: set[str] = set()
        """Devices with an operator's order open, as the change feed tells (for ``--metrics-bind``)."""

    def _link(self) -> MqttLink:
        cafile = self.options.cafile or self.options.home.chain_file
        return MqttLink(self.identity, self.broker, cafile, self.options.keepalive, asyncio.get_running_loop(),
                        self._deliver, self.link_counts)

    def _deliver(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        self.queue.put_nowait((topic, payload, mid, qos))

    async def start(self, connect_timeout: float = 30.0) -> None:
        """Connect (raising if the broker will not have the renewer) and start every task."""
        self.link.start()
        await self._wait_connected(connect_timeout)
        loop = asyncio.get_running_loop()
        settings = self.authority.settings
        self._tasks = [loop.create_task(self._worker(), name=f"iotauth-renewer-{n}")
                       for n in range(self.options.workers)]
        self._tasks += [
            loop.create_task(self._follow_orders(), name="iotauth-renewer-orders"),
            loop.create_task(self._housekeeping(), name="iotauth-renewer-housekeeping"),
            loop.create_task(expire_pending_forever(self.registry, settings.pending_ttl, actor=self.actor),
                             name="iotauth-renewer-expiry"),
        ]

    async def _wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109 - a start-up deadline, not an I/O await
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.link.connected.is_set():
            if self.link.refusals >= FATAL_REFUSALS:
                raise IotAuthError(f"the broker at {self.broker[0]}:{self.broker[1]} keeps refusing the renewer "
                                   f"({self.link.last_refusal}); is its certificate ({self.identity.serial}) known "
                                   "to this broker's registry?")
            if asyncio.get_running_loop().time() > deadline:
                why = f" ({self.link.last_refusal})" if self.link.last_refusal else ""
                raise IotAuthError(f"cannot connect to the broker at {self.broker[0]}:{self.broker[1]} within "
                                   f"{timeout:g} s{why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.link.connected.wait(), 0.2)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(IotAuthError):
            await self.audit.flush(everything=True)
        await asyncio.get_running_loop().run_in_executor(None, self.link.stop)

    async def _worker(self) -> None:
        while True:
            topic, payload, mid, qos = await self.queue.get()
            self._crash("received")
            try:
                answer = await self.renewer.handle(topic, payload)
                if answer is not None:
                    self._crash(answer.response.status.value)
                    self.link.publish(answer.topic, answer.response.encode())
            except Exception:  # one message must never stop the service
                log.exception("could not answer a message on %r", topic[:120])
            if self.options.crash_at == "answered":
                await asyncio.sleep(0.3)  # paho's thread puts the answer on the wire
                self._crash("answered")
            self.link.ack(mid, qos)

    def _crash(self, point: str) -> None:
        if point == self.options.crash_at:
            log.error("--crash-at %s: dying with SIGKILL", point)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _follow_orders(self) -> None:
        """Publish operators' orders (retained) and clear them once the device's renewal is active."""
        cursor = await self.registry.follower_cursor(CURSOR)
        for order in await self.registry.open_orders():
            self.open_orders.add(order.device_id)
            self._publish_order(order.device_id, messages.RotateOrder(order.serial, order.requested_at).encode())
        if cursor is None:
            cursor = await self.registry.last_event_id()
            await self.registry.save_follower_cursor(CURSOR, cursor)
        async for batch in self.registry.follow(cursor, self.options.poll_interval):
            sent: list[paho.MQTTMessageInfo] = []
            for event in batch:
                if event.device_id is None:
                    continue
                if event.kind in ROTATION_ORDERS and isinstance(event.data.get("serial"), str):
                    command = messages.RotateOrder(str(event.data["serial"]), event.ts)
                    self.open_orders.add(event.device_id)
                    sent.append(self._publish_order(event.device_id, command.encode()))
                elif renewal_activated(event.kind, event.data) and event.data.get("order"):
                    self.open_orders.discard(event.device_id)
                    self.orders_cleared += 1
                    sent.append(self._publish_order(event.device_id, b""))  # an empty retained message clears it
            await _published(sent)
            await self.registry.save_follower_cursor(CURSOR, batch[-1].id)

    def _publish_order(self, device_id: str, payload: bytes) -> paho.MQTTMessageInfo:
        if payload:
            self.orders_published += 1
        return self.link.publish(messages.command_topic(device_id), payload, retain=True)

    async def _housekeeping(self) -> None:
        skew = self.authority.settings.rotation.max_clock_skew
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                await self.audit.flush()
                if ticks % 300 == 0:
                    await self.registry.prune_rotation_requests(now_utc() - clock_margin(skew))
                if ticks % 60 == 0:
                    log.info("renewals: %s; orders published: %d", self.renewer.stats, self.orders_published)
            except IotAuthError as exc:
                log.warning("renewer housekeeping: %s", exc)


async def _published(sent: list[paho.MQTTMessageInfo], timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Wait until the broker acknowledged every message (QoS 1), polling paho's flags."""
    deadline = asyncio.get_running_loop().time() + timeout
    while any(not info.is_published() for info in sent):
        if asyncio.get_running_loop().time() > deadline:
            raise IotAuthError("the broker did not acknowledge the rotation orders in time; retrying")
        await asyncio.sleep(0.05)


async def serve(options: RenewerOptions, on_started: Callable[[Started], None] | None = None) -> None:
    """Run the renewer until SIGINT/SIGTERM."""
    home = options.home
    home.require_initialised()
    actor = renewer_actor()
    async with await open_registry(registry_location(home, options.registry)) as registry:
        authority = await open_authority(home, registry)
        identity = await ensure_identity(authority, home, actor)
        service = RenewerService(options, authority, identity, actor)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            async with exporting(options.metrics_bind, renewer_metrics(service)) as exporter:
                await service.start()
                if on_started is not None:
                    on_started(Started(identity, service.broker, exporter.address if exporter else None))
                log.warning("iotauth renewer %s running against %s:%d", identity.device_id, *service.broker)
                await _until_stopped(stop, service, authority, home, actor)
        finally:
            await service.close()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


async def _until_stopped(stop: asyncio.Event, service: RenewerService, authority: Authority, home: Home,
                         actor: str) -> None:
    """Wait for a stop signal; every 6 hours renew the renewer's own certificate if its window has opened."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timedelta(hours=6).total_seconds())
            return
        try:
            identity = await ensure_identity(authority, home, actor)
        except IotAuthError as exc:
            log.error("cannot renew the renewer's own certificate: %s", exc)
            continue
        if identity.serial != service.identity.serial:
            log.info("reconnecting with the renewer's new certificate %s", identity.serial)
            await asyncio.get_running_loop().run_in_executor(None, service.link.stop)
            service.identity = identity
            service.link = service._link()
            service.link.start()


__all__ = ["Identity", "RenewerOptions", "RenewerService", "Started", "ensure_identity", "serve"]
