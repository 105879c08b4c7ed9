"""The mTLS gate: iotauth terminates TLS itself and amqtt only ever sees admitted clients.

Why not amqtt's own TLS listener plus an auth plugin: amqtt's listener asks
for client certificates with ``CERT_OPTIONAL``, and amqtt changes sessions
*before* it authenticates -- a CONNECT with clean-session deletes the client
id's session, a persistent CONNECT re-uses the cached session object (so a
plugin reading ``session.ssl_object`` checks the *victim's* old TLS
connection), and take-over of a connected client happens even when
authentication then fails. No plugin can undo that, so nothing
unauthenticated may reach amqtt at all:

1. Accept TCP, run the TLS handshake with ``CERT_REQUIRED`` against the
   project CA (a client without a valid certificate never gets past TLS; the
   failure is audited with OpenSSL's reason).
2. Read the first packet with a size bound and a timeout; it must be a
   well-formed MQTT 3.1.1 CONNECT (:mod:`iotauth.broker.mqtt`).
3. :meth:`Guard.admit` decides from the certificate of *this* connection, the
   registry and the policy. On refusal the gate answers CONNACK 0x05 (0x03 when
   the registry is unavailable) and closes; amqtt never hears of it, so no
   session, subscription or connection of any other client can be touched.
4. On admission it sets :data:`~iotauth.broker.guard.ADMISSION` and hands amqtt
   (through its ``external`` listener) a stream that starts with a CONNECT
   *re-encoded* from the values it decided on, followed by the rest of the
   connection.

The gate keeps the transport, so a revocation closes the socket directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import websockets
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection

from iotauth.broker.binding import ADMISSION, Binding, Denial
from iotauth.broker.guard import Guard
from iotauth.broker.mqtt import (
    UNACCEPTABLE_PROTOCOL,
    Connect,
    connack,
    encode_connect,
    fixed_header,
    parse_connect,
)
from iotauth.errors import ConfigError, MalformedPacket, UnsupportedProtocol

log = logging.getLogger("iotauth.broker.gate")

Handoff = Callable[[ReaderAdapter, WriterAdapter], Awaitable[None]]
ReadExactly = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True)
class GateOptions:
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connect_bytes: int = 65_536
    write_timeout: float = 5.0
    max_pending: int = 1024  # connections still in TLS or CONNECT: an unauthenticated flood is bounded


def server_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context that *requires* a client certificate chaining to ``ca_file``."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the broker's TLS material ({cert_file}, {ca_file}): {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def handshake_reason(exc: BaseException) -> str:
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


async def read_connect(read: ReadExactly, limit: int) -> Connect:
    """Read and parse the first packet; it must be a CONNECT of at most ``limit`` bytes."""
    head = bytearray(await read(2))
    while (parsed := fixed_header(head)) is None:
        head += await read(1)
    size, remaining = parsed
    if remaining + size > limit:
        raise MalformedPacket(f"CONNECT of {remaining + size} bytes exceeds the {limit}-byte limit")
    return parse_connect(await read(remaining) if remaining else b"")


class ReplayReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """The canonical CONNECT first, then whatever the client sends next."""

    def __init__(self, prefix: bytes, inner: ReaderAdapter) -> None:
        self._prefix = prefix
        self._inner = inner

    async def read(self, n: int = -1) -> bytes:
        if not self._prefix:
            return bytes(await self._inner.read(n))
        if n < 0:
            data, self._prefix = self._prefix, b""
            data += await self._inner.read(n)
        else:
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(data) < n:
                data += await self._inner.read(n - len(data))
        if not self._prefix:
            self.read = self._inner.read  # type: ignore[method-assign]  # replayed: get out of the way
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address or "unknown")


class _PacketWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class _Gate:
    def __init__(self, guard: Guard, handoff: Handoff, context: ssl.SSLContext, options: GateOptions,
                 listener: str) -> None:
        self.guard = guard
        self._handoff = handoff
        self._context = context
        self.options = options
        self.listener = listener
        self.address: tuple[str, int] | None = None

    async def _admit(self, der: bytes | None, read: ReadExactly, peer: str, answer: Callable[[bytes], Awaitable[None]],
                     close: Callable[[], None]) -> tuple[Connect, Binding] | None:
        """Steps 2 and 3 of the module docstring; ``None`` when the connection was refused (and answered)."""
        if not der:
            self.guard.deny_handshake("tls-no-client-certificate", "no client certificate", peer, self.listener)
            return None
        try:
            async with asyncio.timeout(self.options.connect_timeout):  # no extra task, unlike wait_for
                connect = await read_connect(read, self.options.max_connect_bytes)
        except UnsupportedProtocol as exc:
            self.guard.deny_handshake("unsupported-protocol", str(exc), peer, self.listener)
            await answer(connack(UNACCEPTABLE_PROTOCOL))
            return None
        except MalformedPacket as exc:
            self.guard.deny_handshake("malformed-connect", str(exc), peer, self.listener)
            return None
        except TimeoutError:
            self.guard.deny_handshake("connect-timeout", "no CONNECT in time", peer, self.listener)
            return None
        except (asyncio.IncompleteReadError, ConnectionError, OSError, EOFError) as exc:
            log.debug("connection from %s ended before CONNECT: %s", peer, exc)
            return None
        decision = await self.guard.admit(der, connect, peer, self.listener, close)
        if isinstance(decision, Denial):
            await answer(connack(decision.return_code))
            return None
        return connect, decision

    def _answerer(self, writer: _PacketWriter) -> Callable[[bytes], Awaitable[None]]:
        """How a refusal's CONNACK is sent: best effort and bounded, since the connection is closed next anyway."""

        async def answer(packet: bytes) -> None:
            writer.write(packet)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), self.options.write_timeout)

        return answer

    async def _run_session(self, binding: Binding, connect: Connect, reader: ReaderAdapter,
                           writer: WriterAdapter) -> None:
        """Hand amqtt the connection, replaying the CONNECT re-encoded from the values the gate decided on."""
        token = ADMISSION.set(binding)
        try:
            await self._handoff(ReplayReader(encode_connect(connect), reader), writer)
        finally:
            ADMISSION.reset(token)
            self.guard.release(binding)
            log.debug("connection of %s from %s ended", binding.device_id, binding.admission.peer)


class TlsGate(_Gate):
    """MQTT over TLS (``mqtts``, usually port 8883)."""

    def __init__(self, guard: Guard, handoff: Handoff, context: ssl.SSLContext, options: GateOptions,
                 listener: str = "mqtts") -> None:
        super().__init__(guard, handoff, context, options, listener)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pending = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True, backlog=1024)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer.get_extra_info("peername"))
        self._writers.add(writer)
        try:
            await self._serve(reader, writer, peer)
        except Exception:  # a bug must cost one connection, never the listener
            log.exception("connection from %s failed", peer)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        if self._pending >= self.options.max_pending:
            self.guard.deny_handshake("too-many-pending", f"{self._pending} connections not yet admitted", peer,
                                      self.listener)
            return
        self._pending += 1
        try:
            admitted = await self._authenticate(reader, writer, peer)
        finally:
            self._pending -= 1
        if admitted is None:
            return
        connect, binding = admitted
        await self._run_session(binding, connect, StreamReaderAdapter(reader), StreamWriterAdapter(writer))

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            peer: str) -> tuple[Connect, Binding] | None:
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=self.options.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, EOFError) as exc:
            self.guard.deny_handshake(handshake_reason(exc), str(exc)[:200], peer, self.listener)
            return None
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return await self._admit(der, reader.readexactly, peer, self._answerer(writer), writer.transport.abort)


class WebSocketGate(_Gate):
    """MQTT over secure WebSockets (``wss``, subprotocol ``mqtt``), same admission as :class:`TlsGate`.

    The TLS handshake is run by the WebSocket server; handshake failures there
    are logged by asyncio, not audited (the CONNECT-level decisions are).
    """

    def __init__(self, guard: Guard, handoff: Handoff, context: ssl.SSLContext, options: GateOptions,
                 listener: str = "wss") -> None:
        super().__init__(guard, handoff, context, options, listener)
        self._server: WsServer | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await websockets.serve(
            self._accept, host, port, ssl=self._context, subprotocols=[websockets.Subprotocol("mqtt")],
            open_timeout=self.options.handshake_timeout, compression=None,
            max_size=max(self.options.max_connect_bytes, 1 << 20),
        )
        sockname = next(iter(self._server.sockets)).getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, connection: ServerConnection) -> None:
        peer = _peer(connection.remote_address)
        try:
            ssl_object = connection.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            reader, writer = WebSocketsReader(connection), WebSocketsWriter(connection)

            async def read(count: int) -> bytes:
                data: bytes = await reader.read(count)
                if len(data) < count:
                    raise EOFError("connection closed")
                return data

            admitted = await self._admit(der, read, peer, self._answerer(writer), connection.transport.abort)
            if admitted is None:
                return
            connect, binding = admitted
            await self._run_session(binding, connect, reader, writer)
        except Exception:
            log.exception("websocket connection from %s failed", peer)
        finally:
            connection.transport.abort()
