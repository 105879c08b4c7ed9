"""The serial link under the station: pyserial for the port, the asyncio loop for the waiting.

Why no threads: pyserial opens and configures the port (baud rate, 8N1, raw
mode, RTS/CTS, an exclusive lock so two stations cannot share a fixture) and
then the port's file descriptor is registered with the event loop
(``add_reader``), the way pyserial-asyncio does it. One loop thread then
serves every port of the station: sixteen ports cost sixteen file
descriptors, not sixteen blocked threads; a timeout is just a cancelled
wait, so a dead device can never leave a thread stuck in ``read()``.

Writes go straight to the descriptor with ``os.write`` and wait for
writability through the loop when the kernel buffer is full; pyserial's own
non-blocking ``write`` spins on EAGAIN instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Protocol

import serial

from iotauth.errors import LinkClosed, ProvisioningError

READ_SIZE = 4096


class Link(Protocol):
    """What a session needs from a byte pipe to one device."""

    @property
    def byte_time(self) -> float: ...

    async def send(self, data: bytes, max_wait: float) -> None: ...

    async def receive(self, max_wait: float) -> bytes: ...

    async def close(self) -> None: ...


class SerialLink:
    """One open serial port, read and written through the running event loop."""

    def __init__(self, port: str, device: serial.Serial) -> None:
        self.port = port
        self._serial = device
        self._fd = device.fileno()
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._ready = asyncio.Event()
        self._error: LinkClosed | None = None
        self._closed = False
        self._loop.add_reader(self._fd, self._on_readable)

    @classmethod
    async def open(cls, port: str, *, baudrate: int = 115200, rtscts: bool = False) -> SerialLink:
        """Open and lock ``port``; raise :class:`LinkClosed` if it is missing or taken."""

        def _open() -> serial.Serial:
            device = serial.Serial(port, baudrate=baudrate, timeout=0, write_timeout=0, rtscts=rtscts,
                                   exclusive=True)
            device.reset_input_buffer()
            return device

        try:
            device = await asyncio.to_thread(_open)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkClosed(f"cannot open {port}: {exc}") from exc
        return cls(port, device)

    @property
    def byte_time(self) -> float:
        """Seconds per byte on the wire at the configured baud rate (8N1: 10 bits)."""
        return 10.0 / float(self._serial.baudrate or 115200)

    def _on_readable(self) -> None:
        try:
            data = self._serial.read(READ_SIZE)
        except (serial.SerialException, OSError) as exc:
            self._fail(LinkClosed(f"device on {self.port} disconnected ({exc})"))
            return
        if data:
            self._buffer += data
            self._ready.set()

    def _fail(self, error: LinkClosed) -> None:
        if self._error is None:
            self._error = error
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        self._ready.set()

    async def receive(self, max_wait: float) -> bytes:
        """Bytes received so far, waiting up to ``max_wait`` seconds for some; ``b""`` if none came."""
        if not self._buffer and self._error is None:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(max_wait, 0.0)):
                    await self._ready.wait()
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        if self._error is not None:
            raise self._error
        return b""

    async def send(self, data: bytes, max_wait: float) -> None:
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        try:
            async with asyncio.timeout(max_wait):
                while view:
                    try:
                        written = os.write(self._fd, view)
                    except BlockingIOError:
                        await self._writable()
                        continue
                    view = view[written:]
        except TimeoutError:
            raise ProvisioningError(f"write to {self.port} timed out (flow control stuck?)") from None
        except OSError as exc:
            error = LinkClosed(f"device on {self.port} disconnected ({exc})")
            self._fail(error)
            raise error from exc

    async def _writable(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_writer(self._fd, ready)
        try:
            await waiter
        finally:
            self._loop.remove_writer(self._fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            self._serial.close()
