"""The mTLS gate: iotauth terminates TLS itself and a host only ever sees admitted clients.

Why a gate: amqtt's listener asks for client certificates with
``CERT_OPTIONAL``, and amqtt changes sessions *before* it authenticates (a
clean-session CONNECT deletes the client id's session, a persistent CONNECT
re-uses the cached session and its old TLS state, take-over happens even when
authentication then fails). No plugin can undo that, so nothing
unauthenticated reaches a host at all -- neither iotauth's own engine nor
amqtt behind its wall (:mod:`iotauth.broker.amqtt_host`):

1. Accept TCP. :class:`~iotauth.broker.throttle.Throttle` decides, before any
   TLS work, whether this source may hold one more unauthenticated
   connection (per address, per network, a fair share of the total, a
   failure budget), must wait unread for its source's turn, or is closed at once.
2. Run the TLS handshake (:mod:`iotauth.broker.tls`) with ``CERT_REQUIRED``,
   trusting only the *issuing* CA, so a leaf signed directly by the root
   fails here. Failures are audited with OpenSSL's reason.
3. As soon as the handshake ends, check the certificate: chain, identity,
   registry status (:meth:`Guard.precheck`). A certificate that is unknown,
   revoked, suspended or pending is refused and audited right away: it gets
   CONNACK 0x05 (0x03 if the registry is unreadable) and is closed without
   waiting for its CONNECT.
4. Read the first packet with a size bound; it must be a well-formed MQTT
   3.1.1 CONNECT (:mod:`iotauth.broker.mqtt`). An MQTT 5 CONNECT is answered
   in MQTT 5's own form (reason 0x84): iotauth's broker speaks 3.1.1.
5. :meth:`Guard.admit` binds the client id to the certificate's device id and
   registers the connection. On refusal the client gets its CONNACK code and
   is closed; no host hears of it.
6. On admission the host gets the link and a CONNECT *re-encoded* from the
   values the gate decided on.

MQTT over secure WebSockets (``wss``) takes the same path: the WebSocket
framing (the ``websockets`` library's sans-I/O protocol) runs on top of the
same TLS link, so the same limits and checks apply to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import ssl
from pathlib import Path
from typing import Protocol

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from iotauth.broker.admission import Precheck
from iotauth.broker.binding import Binding, Denial
from iotauth.broker.guard import Guard
from iotauth.broker.mqtt import (
    CONNECT_TYPE,
    MQTT5_UNSUPPORTED_VERSION,
    UNACCEPTABLE_PROTOCOL,
    Connect,
    connack,
    fixed_header,
    parse_connect,
)
from iotauth.broker.throttle import Pending, Phase, Refusal, Throttle
from iotauth.broker.tls import Flusher, Receiver, TlsLink, peer_address
from iotauth.errors import ConfigError, MalformedPacket, UnsupportedProtocol
from iotauth.limits import IntakeLimits

log = logging.getLogger("iotauth.broker.gate")
REAP_INTERVAL = 0.1


class Link(Protocol):
    """A byte stream to one client (TLS, or WebSocket over TLS)."""

    peer: str
    receiver: Receiver | None

    def write(self, data: bytes) -> None: ...

    def writable(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_limit(self, high: int) -> None: ...


class Host(Protocol):
    """The MQTT side behind the gate: iotauth's engine, or amqtt behind its wall."""

    def accept(self, link: Link, binding: Binding, connect: Connect) -> Receiver | None:
        """Take over an admitted connection (answer CONNACK); ``None`` if it was refused after all."""
        ...


def server_context(cert_file: Path, key_file: Path, issuing_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ server context that *requires* a client certificate issued by an issuing CA.

    Only the issuing CAs in ``issuing_pem`` are trusted (``VERIFY_X509_PARTIAL_CHAIN``
    makes them anchors), so a leaf signed directly by the root fails the
    handshake. After a rollover there are several: the current one and each
    previous one still valid (:func:`iotauth.castore.trusted_issuing_pem`).
    """
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cadata=issuing_pem.decode("ascii"))
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot load the broker's TLS material ({cert_file}, issuing CAs): {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def handshake_reason(exc: BaseException | None) -> str:
    """A short, stable audit reason for a failed TLS handshake."""
    if isinstance(exc, TimeoutError):
        return "tls-timeout"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return "tls-" + _slug(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "tls-no-client-certificate"
        if reason:
            return "tls-" + _slug(reason)
    return "tls-handshake-failed"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


class Gate:
    """Listeners for ``mqtts`` and ``wss`` in front of one host. See the module docstring."""

    def __init__(self, guard: Guard, host: Host, context: ssl.SSLContext, limits: IntakeLimits,
                 write_limit: int = 1 << 20) -> None:
        self.guard = guard
        self.host = host
        self.context = context
        self.limits = limits
        self.throttle = Throttle(limits)
        self.write_limit = write_limit
        self.addresses: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        self._links: set[TlsLink] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._flusher: Flusher | None = None

    async def listen(self, listener: str, host: str, port: int) -> tuple[str, int]:
        """Listen for ``mqtts`` (MQTT over TLS) or ``wss`` (MQTT over secure WebSockets) on ``host:port``."""
        loop = asyncio.get_running_loop()
        if self._flusher is None:
            self._flusher = Flusher(loop)
            self._reaper = loop.create_task(self._reap(), name="iotauth-gate-reaper")
        flusher = self._flusher
        websocket = listener == "wss"

        def protocol() -> TlsLink:
            return TlsLink(self.context, flusher, self._links, lambda link: self._open(link, listener, websocket),
                           lambda link, der, exc: self._handshaken(link, der, exc, listener))

        try:
            server = await loop.create_server(protocol, host, port, reuse_address=True, backlog=4096)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        self.addresses[listener] = (str(sockname[0]), int(sockname[1]))
        return self.addresses[listener]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for link in list(self._links):
            link.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        self._servers = []
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    @property
    def pending(self) -> int:
        return self.throttle.pending

    # -- per connection --------------------------------------------------------------------

    def _open(self, link: TlsLink, listener: str, websocket: bool) -> Receiver | None:
        transport = link.transport
        address = peer_address(transport.get_extra_info("peername") if transport is not None else None)
        pending = PendingConnection(self, link, listener)
        entry = self.throttle.arrive(address, pending.evict, link.resume_reading)
        if isinstance(entry, Refusal):
            self.guard.deny_handshake(entry.value, "closed by admission control", link.peer, listener)
            return None
        pending.entry = entry
        if entry.phase is Phase.QUEUED:
            link.pause_reading()  # no TLS work until this source has a free slot
        if websocket:
            pending.link = WebSocketLink(link, pending)
            return pending.link
        return pending

    def _handshaken(self, link: TlsLink, der: bytes | None, exc: BaseException | None, listener: str) -> None:
        receiver = link.receiver
        pending = receiver.pending if isinstance(receiver, WebSocketLink) else receiver
        if isinstance(pending, PendingConnection):
            pending.handshake_done(der, exc)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                self.throttle.reap()
            except Exception:  # a bug must not stop the deadlines
                log.exception("admission control reaper failed")


class PendingConnection:
    """A connection between accept and admission: the receiver of its link until a host takes over."""

    __slots__ = ("_buffer", "_connect", "_connect_ready", "_der", "_pre", "_task", "entry", "gate", "link",
                 "listener", "tls")

    def __init__(self, gate: Gate, tls: TlsLink, listener: str) -> None:
        self.gate = gate
        self.tls = tls
        self.link: Link = tls
        self.entry: Pending | None = None
        self._pre: Precheck | None = None
        self.listener = listener
        self._buffer = b""
        self._connect: Connect | None = None
        self._connect_ready: asyncio.Future[Connect] | None = None
        self._der: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    # -- from the TLS link -----------------------------------------------------------------

    def handshake_done(self, der: bytes | None, exc: BaseException | None) -> None:
        guard = self.gate.guard
        if exc is not None or not der:
            self._leave()
            reason = handshake_reason(exc) if exc is not None else "tls-no-client-certificate"
            detail = str(exc)[:200] if exc is not None else "no client certificate"
            guard.deny_handshake(reason, detail, self.tls.peer, self.listener)
            self.tls.abort()
            return
        self._der = der
        if self.entry is not None:
            self.gate.throttle.advance(self.entry)
        self._task = asyncio.get_running_loop().create_task(self._decide(der))

    def data_received(self, data: bytes) -> None:
        if self._connect is not None:
            self._buffer += data
            if len(self._buffer) > self.gate.limits.max_connect_bytes:
                self.link.pause_reading()  # pipelined packets wait for the decision, bounded
            return
        buffer = self._buffer + data
        try:
            if buffer[0] != CONNECT_TYPE:
                raise MalformedPacket(f"first packet is not CONNECT (byte 0x{buffer[0]:02x})")
            header = fixed_header(buffer)
            if header is None:
                self._buffer = buffer
                return
            size, remaining = header
            total = size + remaining
            if total > self.gate.limits.max_connect_bytes:
                raise MalformedPacket(f"CONNECT of {total} bytes exceeds the "
                                      f"{self.gate.limits.max_connect_bytes}-byte limit")
            if len(buffer) < total:
                self._buffer = buffer
                return
            connect = parse_connect(buffer[size:total])
        except UnsupportedProtocol as exc:
            self._refuse_connect("unsupported-protocol", str(exc),
                                 MQTT5_UNSUPPORTED_VERSION if exc.level == 5 else connack(UNACCEPTABLE_PROTOCOL))
            return
        except MalformedPacket as exc:
            self._refuse_connect("malformed-connect", str(exc), None)
            return
        self._connect = connect
        self._buffer = buffer[total:]
        if self._connect_ready is not None and not self._connect_ready.done():
            self._connect_ready.set_result(connect)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.entry is not None and not self.entry.done and self._der is None:
            # The client gave up before its certificate was known: counted per source, like any refusal.
            self.gate.guard.deny_handshake("closed-before-handshake", str(exc or "connection closed")[:200],
                                           self.tls.peer, self.listener)
        self._leave()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def resume_writing(self) -> None:
        pass

    def evict(self, reason: Refusal) -> None:
        """Admission control closes this connection (a deadline passed, or a fair-share eviction)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        guard, pre = self.gate.guard, self._pre
        if pre is not None:
            guard.deny_connect(reason.value, "closed by admission control", pre.identity.fingerprint, self.tls.peer,
                               self.listener, device_id=pre.identity.device_id)
        else:
            guard.deny_handshake(reason.value, "closed by admission control", self.tls.peer, self.listener)
        self.link.abort()

    # -- deciding --------------------------------------------------------------------------

    async def _decide(self, der: bytes) -> None:
        guard = self.gate.guard
        pre = await guard.precheck(der, self.tls.peer, self.listener)
        if isinstance(pre, Denial):
            # Refused from the certificate alone: it never waits for a CONNECT. The CONNACK is the first
            # packet this server sends (MQTT-3.2.0-1) and tells the client why, whether or not its CONNECT
            # has arrived yet; then the connection closes.
            self._leave()
            self.link.write(connack(pre.return_code))
            self.link.close()
            return
        self._pre = pre
        connect = self._connect
        if connect is None:
            self._connect_ready = asyncio.get_running_loop().create_future()
            connect = await self._connect_ready
        decision = await guard.admit(pre, connect, self.tls.peer, self.listener, self.link.abort)
        if isinstance(decision, Denial):
            self._leave()
            self.link.write(connack(decision.return_code))
            self.link.close()
            return
        self._hand_over(pre, decision, connect)

    def _hand_over(self, pre: Precheck, binding: Binding, connect: Connect) -> None:
        gate = self.gate
        if self.entry is not None:
            gate.throttle.leave(self.entry, admitted=True)
        if self.tls.closed:
            gate.guard.release(binding)
            return
        receiver = gate.host.accept(self.link, binding, connect)
        if receiver is None:
            self.link.close()
            return
        self.link.set_write_limit(gate.write_limit)
        self.link.receiver = receiver
        leftover, self._buffer = self._buffer, b""
        if leftover:
            receiver.data_received(leftover)
        self.link.resume_reading()

    def _refuse_connect(self, reason: str, detail: str, answer: bytes | None) -> None:
        self._leave()
        if self._task is not None:
            self._task.cancel()
        fingerprint = hashlib.sha256(self._der).hexdigest() if self._der else None
        pre = self._pre
        self.gate.guard.deny_connect(reason, detail, fingerprint, self.tls.peer, self.listener,
                                     device_id=pre.identity.device_id if pre is not None else None)
        if answer is not None:
            self.link.write(answer)
            self.link.close()
        else:
            self.link.abort()

    def _leave(self) -> None:
        if self.entry is not None:
            self.gate.throttle.leave(self.entry, admitted=False)


class WebSocketLink:
    """MQTT over WebSockets (subprotocol ``mqtt``) on top of a :class:`TlsLink`, with websockets' sans-I/O protocol.

    It is the TLS link's receiver (frames in) and, for everything above it, the
    link (MQTT bytes out as binary frames).
    """

    def __init__(self, tls: TlsLink, pending: PendingConnection) -> None:
        self.tls = tls
        self.pending = pending
        self.receiver: Receiver | None = pending
        self.peer = tls.peer
        self._protocol = ServerProtocol(subprotocols=[Subprotocol("mqtt")], max_size=1 << 20)
        self._open = False

    def data_received(self, data: bytes) -> None:
        protocol = self._protocol
        protocol.receive_data(data)
        payload: list[bytes] = []
        for event in protocol.events_received():
            if isinstance(event, Request):
                self._upgrade(event)
            elif isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.CONT):
                payload.append(bytes(event.data))
        self._send()
        if protocol.close_expected() or protocol.state.name == "CLOSED":
            self.tls.close()
        if payload and self.receiver is not None:
            self.receiver.data_received(b"".join(payload))

    def _upgrade(self, request: Request) -> None:
        response: Response = self._protocol.accept(request)
        if response.status_code == 101 and self._protocol.subprotocol != "mqtt":
            response = self._protocol.reject(400, "the WebSocket subprotocol must be 'mqtt'\n")
        self._protocol.send_response(response)
        self._open = response.status_code == 101
        if not self._open:
            self.tls.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connection_lost(exc)

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.resume_writing()

    def write(self, data: bytes) -> None:
        if self._open:
            self._protocol.send_binary(data)
            self._send()

    def _send(self) -> None:
        for chunk in self._protocol.data_to_send():
            if chunk:
                self.tls.write(chunk)

    def writable(self) -> bool:
        return self.tls.writable()

    def close(self) -> None:
        if self._open:
            with contextlib.suppress(Exception):
                self._protocol.send_close()
                self._send()
        self.tls.close()

    def abort(self) -> None:
        self.tls.abort()

    def pause_reading(self) -> None:
        self.tls.pause_reading()

    def resume_reading(self) -> None:
        self.tls.resume_reading()

    def set_write_limit(self, high: int) -> None:
        self.tls.set_write_limit(high)

__all__ = ["Gate", "Host", "Link", "PendingConnection", "handshake_reason", "server_context"]
