"""Requests and replies over one link: sequence numbers, timeouts, retransmits, backoff.

The rules (PROTOCOL.md, "Reliability"):

* every new request gets a new sequence number; the device caches its last
  reply by (seq, CRC), so a **retransmit** (same bytes, same seq) is answered
  from the cache and never executed twice;
* the host retransmits when no valid reply arrives in time, or at once when
  the reply arrives garbled or the device reports an unreadable frame;
* an ERROR reply is final for that seq: a retryable one (BUSY, FLASH_WRITE)
  is retried as a *new* request with a new seq, after a backoff;
* replies with another seq are stale (an answer to an earlier retransmit) and
  are ignored.

Every wait is bounded, so a request ends in a reply or a
:class:`~iotauth.errors.ProvisioningError` after ``attempts`` tries.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import TypeVar

from iotauth.errors import DeviceRefused, FrameError, ProtocolError, ProvisioningError
from iotauth.provisioning.codec import MAX_ENCODED, SEQ_UNSOLICITED, Deframer, Frame
from iotauth.provisioning.messages import Error, ErrorCode, Message, MsgType, parse_message, response_type
from iotauth.provisioning.transport import Link

R = TypeVar("R", bound=Message)
_testing = False


def set_testing(on: bool = True) -> None:
    """Make backoff sleeps instant (tests); timeouts still apply."""
    global _testing
    _testing = on


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for a device and how often to try again.

    Attributes:
        attempts: tries per request (the first send plus retransmits/retries).
        timeout: seconds to wait for a reply, on top of the reply's wire time.
        keygen_timeout: extra seconds a GENERATE_KEY may take on the device.
        backoff: first pause between tries; multiplied by ``backoff_factor``
            each time, capped at ``backoff_max``.
    """

    attempts: int = 4
    timeout: float = 1.0
    keygen_timeout: float = 10.0
    backoff: float = 0.05
    backoff_factor: float = 2.0
    backoff_max: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout <= 0 or self.keygen_timeout < 0 or self.backoff < 0:
            raise ProvisioningError("retry policy needs attempts >= 1, timeout > 0 and non-negative pauses")

    def pause(self, attempt: int) -> float:
        """Backoff before try ``attempt + 1`` (0 in testing mode)."""
        if _testing:
            return 0.0
        return min(self.backoff * self.backoff_factor ** max(attempt - 1, 0), self.backoff_max)

    def try_timeout(self, byte_time: float, extra: float = 0.0) -> float:
        """How long one try waits for its reply: the base timeout plus a maximal frame each way on this link."""
        return self.timeout + extra + 2 * MAX_ENCODED * byte_time

    def request_budget(self, byte_time: float, extra: float = 0.0) -> float:
        """The longest one request can take, every try and pause included."""
        return self.attempts * self.try_timeout(byte_time, extra) + (self.attempts - 1) * self.backoff_max


SILENT_HINT = "check --baud and the cable"
"""Said when every try of a request timed out: a device that never answers at all is most often one
listening at another baud rate (its replies, if any, never form a frame) or not connected."""


def printable(text: str, limit: int = 64) -> str:
    """Device-supplied text made safe for terminals, logs and reports."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit]


class Session:
    """A request/reply conversation with one device."""

    def __init__(self, link: Link, policy: RetryPolicy) -> None:
        self.link = link
        self.policy = policy
        self._deframer = Deframer()
        self._seq = secrets.randbelow(0xFFFE) + 1
        self.bytes_sent = 0
        self.bytes_received = 0

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFF + 1  # 1..65535; 0 is for unsolicited device messages
        return self._seq

    async def start(self) -> None:
        """Flush anything half-received on the device side with a lone delimiter."""
        await self._send(b"\x00")

    async def request(self, message: Message, expect: type[R], *, extra_timeout: float = 0.0) -> R:
        """Send ``message`` and return the device's reply of type ``expect``.

        Raises:
            DeviceRefused: the device answered ERROR (after retrying retryable ones).
            ProvisioningError: no valid reply after every attempt.
        """
        seq = self._next_seq()
        wire = message.encode(seq)
        wanted = response_type(message.TYPE)
        timeout = self.policy.try_timeout(self.link.byte_time, extra_timeout)
        problem = "no reply"
        silent = 0
        for attempt in range(1, self.policy.attempts + 1):
            await self._send(wire)
            reply = await self._await_reply(seq, wanted, timeout)
            if isinstance(reply, _Unreadable):
                problem = f"device could not read the request ({reply.error.code_name})"
                continue  # damaged on the way (unsolicited, seq 0): retransmit the same bytes
            if isinstance(reply, Error):
                # With this request's seq, even BAD_FRAME/OVERSIZE is final: the device read the request and
                # refused it (a payload above its max_payload); sending the same bytes again can only loop.
                if not reply.retryable or reply.code in (ErrorCode.BAD_FRAME, ErrorCode.OVERSIZE):
                    raise DeviceRefused(message.TYPE.name, reply.code, reply.code_name, reply.arg,
                                         printable(reply.text, 120))
                problem = f"device busy ({reply.code_name})"
                await asyncio.sleep(self.policy.pause(attempt))
                seq = self._next_seq()
                wire = message.encode(seq)
                continue
            if isinstance(reply, expect):
                return reply
            if reply is None:
                problem = f"no reply within {timeout:.1f}s"
                silent += 1
                await asyncio.sleep(self.policy.pause(attempt))
            else:
                problem = f"garbled reply ({reply}; wrong baud rate or line noise?)"
        hint = f" ({SILENT_HINT})" if silent == self.policy.attempts and silent > 1 else ""
        raise ProvisioningError(f"{message.TYPE.name}: {problem} after {self.policy.attempts} attempts{hint}")

    async def _send(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        await self.link.send(data, self.policy.timeout + len(data) * self.link.byte_time * 2)

    async def _await_reply(self, seq: int, wanted: MsgType, max_wait: float) -> Message | _Unreadable | str | None:
        """The reply to ``seq``; a short description if a garbled frame arrived instead; None on timeout."""
        deadline = time.monotonic() + max_wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            data = await self.link.receive(remaining)
            self.bytes_received += len(data)
            for event in self._deframer.feed(data):
                outcome = self._match(event, seq, wanted)
                if outcome is not None:
                    return outcome

    def _match(self, event: Frame | FrameError, seq: int, wanted: MsgType) -> Message | _Unreadable | str | None:
        if isinstance(event, FrameError):
            return event.code
        if event.seq not in (seq, SEQ_UNSOLICITED):
            return None  # stale: the answer to an earlier try
        try:
            reply = parse_message(event)
        except ProtocolError as exc:
            return exc.code
        if event.seq == SEQ_UNSOLICITED:
            if isinstance(reply, Error) and reply.code in (ErrorCode.BAD_FRAME, ErrorCode.OVERSIZE):
                return _Unreadable(reply)
            return None
        if reply.TYPE not in (wanted, MsgType.ERROR):
            return f"unexpected {reply.TYPE.name}"
        return reply


@dataclass(frozen=True)
class _Unreadable:
    """An unsolicited (seq 0) BAD_FRAME or OVERSIZE: the device could not read a frame, so retransmit."""

    error: Error
