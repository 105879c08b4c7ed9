"""One client's MQTT session: subscriptions, QoS 1/2 flights, the offline queue. State only, no I/O.

A session outlives its network connection when the client asked for one
(CleanSession=0, MQTT 3.1.1 §3.1.2.4): its subscriptions stay in the broker's
tree, QoS 1/2 messages for it are queued, and every flight that was not
acknowledged is sent again, in order and with DUP set, when the client comes
back (MQTT-4.4.0-1). A clean session ends with its connection.

Everything here is bounded by :class:`~iotauth.limits.SessionLimits`:
in-flight messages in both directions, queued messages and bytes. A full queue
drops the newest message and counts it; the engine reports the count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from iotauth.limits import SessionLimits

if TYPE_CHECKING:
    from iotauth.broker.binding import Binding


@dataclass(slots=True, eq=False)
class Message:
    """An application message, shared (never copied) by every session it is delivered to."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    topic_field: bytes  # the topic, encoded once as an MQTT string for every copy sent

    @property
    def size(self) -> int:
        return len(self.topic_field) + len(self.payload)


@dataclass(slots=True, eq=False)
class Flight:
    """An outgoing QoS 1/2 message between PUBLISH and its final acknowledgement."""

    message: Message
    qos: int
    retain: bool
    released: bool = False  # QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP


class Outlet(Protocol):
    """What the engine needs from a session's live connection."""

    def send(self, data: bytes) -> None: ...

    def writable(self) -> bool: ...

    def taken_over(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(eq=False)
class Session:
    """See the module docstring. ``connection`` is the live connection, or ``None`` while offline."""

    client_id: str
    persistent: bool
    limits: SessionLimits
    binding: Binding | None = None
    connection: Outlet | None = None
    subscriptions: dict[str, int] = field(default_factory=dict)
    inflight: dict[int, Flight] = field(default_factory=dict)
    queue: deque[tuple[Message, int, bool]] = field(default_factory=deque)
    queued_bytes: int = 0
    incoming_qos2: set[int] = field(default_factory=set)
    dropped: int = 0
    _next_id: int = 0

    def __hash__(self) -> int:
        return id(self)

    def packet_id(self) -> int:
        """A packet id not in use by an outgoing flight (1..65535)."""
        candidate = self._next_id
        for _ in range(65_536):
            candidate = candidate % 65_535 + 1
            if candidate not in self.inflight:
                self._next_id = candidate
                return candidate
        raise RuntimeError("all 65535 packet ids are in flight")  # unreachable: max_inflight is far lower

    def can_fly(self) -> bool:
        return len(self.inflight) < self.limits.max_inflight

    def enqueue(self, message: Message, qos: int, retain: bool) -> bool:
        """Keep a QoS 1/2 message for later; ``False`` (and counted) when the queue is full."""
        size = message.size
        if len(self.queue) >= self.limits.max_queued or self.queued_bytes + size > self.limits.max_queued_bytes:
            self.dropped += 1
            return False
        self.queue.append((message, qos, retain))
        self.queued_bytes += size
        return True

    def dequeue(self) -> tuple[Message, int, bool]:
        entry = self.queue.popleft()
        self.queued_bytes -= entry[0].size
        return entry

    def discard_queue(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0
