"""TLS over a plain TCP transport with OpenSSL memory BIOs: small per connection, cheap per message.

Why not asyncio's own TLS (``start_tls``/``SSLProtocol``): it gives every
connection a 256 KiB read buffer whatever the traffic (``max_size`` in
``asyncio/sslproto.py``) -- most of the 355 KiB an idle device cost -- and
runs a Python state machine around every record. Here a connection holds an
``SSLObject`` and two memory BIOs; what it reads is decrypted in one loop per
``data_received`` and handed on whole, and what the broker writes to it in one
event-loop iteration (an acknowledgement, ten fan-out deliveries) becomes one
TLS write and one ``send``: :class:`Flusher` collects the writes and flushes
every dirty link once, at the next iteration.

The link knows nothing about MQTT: before authentication its receiver is the
gate's pending connection, afterwards the host's (the engine's
:class:`~iotauth.broker.core.connection.MqttConnection`, or the amqtt adapter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("iotauth.broker.gate")
READ_CHUNK = 16_384  # the largest TLS record's plaintext


class Receiver(Protocol):
    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: BaseException | None) -> None: ...

    def resume_writing(self) -> None: ...


class Flusher:
    """Writes collected in one event-loop iteration, flushed together at the start of the next."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[TlsLink] = []
        self._scheduled = False

    def mark(self, link: TlsLink) -> None:
        self._dirty.append(link)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            link.flush()


class TlsLink(asyncio.Protocol):
    """One TCP connection with TLS done in memory. See the module docstring."""

    __slots__ = ("_context", "_handshaken", "_incoming", "_links", "_on_handshake", "_on_open", "_outgoing",
                 "_paused", "_pending_bytes", "_ssl", "_wbuf", "closed", "flusher", "peer", "receiver", "transport")

    def __init__(self, context: ssl.SSLContext, flusher: Flusher, links: set[TlsLink],
                 on_open: Callable[[TlsLink], Receiver | None],
                 on_handshake: Callable[[TlsLink, bytes | None, BaseException | None], None]) -> None:
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None  # made when the client says something: waiting costs no TLS state
        self.flusher = flusher
        self._links = links
        self._on_open = on_open
        self._on_handshake = on_handshake
        self._handshaken = False
        self._paused = False
        self._wbuf: list[bytes] = []
        self._pending_bytes = 0
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.receiver: Receiver | None = None
        self.peer = "unknown"

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.transport = stream
        self.peer = format_peer(transport.get_extra_info("peername"))
        self.receiver = self._on_open(self)
        if self.receiver is None:
            self.closed = True
            stream.abort()
        else:
            self._links.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._incoming.write(data)
        if not self._handshaken:
            self._handshake()
            if not self._handshaken or self.closed:
                return
        self._read()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._links.discard(self)
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.receiver is not None:
            self.receiver.resume_writing()

    # -- TLS -------------------------------------------------------------------------------

    def _handshake(self) -> None:
        if self._ssl is None:
            self._ssl = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._send_outgoing()
            return
        except (ssl.SSLError, OSError) as exc:
            self._send_outgoing()  # the alert, so the client learns why
            self.closed = True
            self._on_handshake(self, None, exc)
            self._close_transport()
            return
        self._handshaken = True
        self._send_outgoing()
        der = self._ssl.getpeercert(binary_form=True)
        self._on_handshake(self, der, None)

    def _read(self) -> None:
        chunks: list[bytes] = []
        failure: BaseException | None = None
        assert self._ssl is not None
        read = self._ssl.read
        while True:
            try:
                chunk = read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                failure = EOFError("TLS close_notify")
                break
            except (ssl.SSLError, OSError) as exc:
                failure = exc
                break
            if not chunk:
                break
            chunks.append(chunk)
        if self._outgoing.pending:
            self._send_outgoing()  # TLS 1.3 post-handshake messages (key update answers)
        if chunks and self.receiver is not None:
            self.receiver.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if failure is not None and not self.closed:
            log.debug("TLS from %s ended: %s", self.peer, failure)
            self.close()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._wbuf:
            self.flusher.mark(self)
        self._wbuf.append(data)
        self._pending_bytes += len(data)

    def writable(self) -> bool:
        return not self._paused and not self.closed

    def flush(self) -> None:
        if not self._wbuf or self.closed:
            self._wbuf.clear()
            self._pending_bytes = 0
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf.clear()
        self._pending_bytes = 0
        if self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS write to %s failed: %s", self.peer, exc)
            self.abort()
            return
        self._send_outgoing()

    def _send_outgoing(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    # -- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush what was written, say close_notify, and close."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self._handshaken and self._ssl is not None:
            with contextlib.suppress(ssl.SSLError, OSError):  # SSLWantReadError: ours is written, theirs not awaited
                self._ssl.unwrap()
            self._send_outgoing()
        self._close_transport()

    def abort(self) -> None:
        self.closed = True
        self._wbuf.clear()
        if self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def set_write_limit(self, high: int) -> None:
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high=high)


def format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address or "unknown")


def peer_address(address: object) -> str:
    """The bare IP of a peer address tuple (what admission control keys on)."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address or "unknown")


__all__ = ["Flusher", "Receiver", "TlsLink", "format_peer", "peer_address"]
