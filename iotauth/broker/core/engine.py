"""iotauth's MQTT 3.1.1 engine: sessions, routing, retained messages and wills for admitted connections only.

The gate (:mod:`iotauth.broker.gate`) authenticates every connection and
decides on its CONNECT before this module hears of it; :meth:`Engine.connect`
is only ever called with a :class:`~iotauth.broker.guard.Binding`, the
authorization state of *that* connection. So a failed or spoofing CONNECT can
change no session here, by construction.

What the engine guarantees, and where:

* **Delivery** (:meth:`Engine.publish`): one walk of the subscription tree
  (:mod:`iotauth.broker.core.topics`), then, per matching session, the RECEIVE
  check of its own compiled policy and delivery at the lower of the publish
  and subscription QoS (MQTT 3.1.1 §3.8.4). No task, no plugin dispatch and
  no I/O per message beyond the writes themselves.
* **QoS 1/2 without loss**: flights stay in the session until acknowledged and
  are sent again, in order with DUP, when a persistent session reconnects
  (MQTT-4.4.0-1); queued messages follow as the in-flight window opens.
* **Sessions** (§3.1.2.4): a persistent session survives its connection; a
  clean one ends with it; a second connection with the same client id (only
  ever the same device) takes the session over and the first is closed
  (MQTT-3.1.4-2) with its will published.
* **Limits** (:class:`~iotauth.limits.SessionLimits`, per profile):
  subscriptions, filters per SUBSCRIBE, in-flight QoS 2, retained messages per
  device; the connection that breaks one is closed and the limit audited.
* **Revocation** (the guard's :class:`SessionHost` calls): :meth:`bound`,
  :meth:`forget`, :meth:`prune`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from iotauth.broker.core.session import Flight, Message, Outlet, Session
from iotauth.broker.core.topics import SubscriptionTree, TopicStore
from iotauth.broker.mqtt import Connect, PacketType, encode_ack, encode_publish, topic_field
from iotauth.limits import SessionLimits
from iotauth.policy import Action

if TYPE_CHECKING:
    from iotauth.broker.binding import Binding

log = logging.getLogger("iotauth.broker")


class Warden(Protocol):
    """What the engine needs from the guard: attach/release bindings and audit what it refuses."""

    def attach(self, binding: Binding, session: object, client_id: str | None, will_topic: str | None) -> bool: ...

    def release(self, binding: Binding) -> None: ...

    def topic_denied(self, binding: Binding, action: str, topic: str) -> None: ...

    def limit_exceeded(self, binding: Binding, limit: str, detail: str) -> None: ...


@dataclass
class EngineStats:
    """Counters read by metrics and benchmarks (plain ints: no cost on the message path beyond the increment)."""

    messages_in: int = 0
    messages_out: int = 0
    publish_denied: int = 0
    subscribe_denied: int = 0
    receive_denied: int = 0
    dropped: int = 0
    limit_disconnects: int = 0


@dataclass(slots=True, eq=False)
class Retained:
    message: Message
    owner: str


class Engine:
    """See the module docstring."""

    def __init__(self, warden: Warden, limits_for: Callable[[str], SessionLimits]) -> None:
        self.warden = warden
        self.limits_for = limits_for
        self.sessions: dict[str, Session] = {}
        self.tree: SubscriptionTree[Session] = SubscriptionTree()
        self.retained: TopicStore[Retained] = TopicStore()
        self.retained_by: dict[str, int] = {}
        self.stats = EngineStats()

    # -- connecting ------------------------------------------------------------------------

    def open_session(self, binding: Binding, connect: Connect) -> tuple[Session, bool]:
        """Find, resume or create the session for an admitted CONNECT; close a connection it takes over.

        Returns the session and the CONNACK session-present flag.
        """
        client_id = connect.client_id
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            existing.connection.taken_over()  # MQTT-3.1.4-2; a clean session ends here
            existing = self.sessions.get(client_id)
        if existing is not None and (connect.clean_session or not existing.persistent):
            self._discard(existing)
            existing = None
        limits = self.limits_for(binding.admission.profile)
        if existing is None:
            session = Session(client_id, not connect.clean_session, limits)
            self.sessions[client_id] = session
            present = False
        else:
            session, present = existing, True
            session.limits = limits
            previous = session.binding
            if previous is not None and previous is not binding:
                previous.cancel_timer()
        session.binding = binding
        return session, present

    def resume(self, session: Session) -> None:
        """After CONNACK: re-check what a resumed session inherited, then resend its flights in order."""
        binding = session.binding
        connection = session.connection
        if binding is None or connection is None:
            return
        dropped = self.prune([binding])
        if dropped:
            log.info("%s resumed a session: dropped %d subscriptions its policy no longer allows",
                     session.client_id, dropped)
        if session.dropped:  # the queue overflowed while it was away: say so once, with the count
            self.warden.limit_exceeded(binding, "max_queued", f"{session.dropped} messages dropped while offline")
            session.dropped = 0
        for packet_id, flight in list(session.inflight.items()):
            if flight.released:
                connection.send(encode_ack(PacketType.PUBREL, packet_id))
            elif self._receivable(session, flight.message.topic):
                message = flight.message
                connection.send(encode_publish(message.topic_field, message.payload, flight.qos, flight.retain,
                                               dup=True, packet_id=packet_id))
            else:
                del session.inflight[packet_id]
        self.pump(session)

    def disconnected(self, session: Session, connection: Outlet) -> None:
        """The connection is gone: a clean session ends; a persistent one goes offline and keeps its state."""
        if session.connection is not connection:
            return
        session.connection = None
        if not session.persistent and self.sessions.get(session.client_id) is session:
            self._discard(session)

    def abandon(self, session: Session) -> None:
        """A session opened for a connection that was then refused: a clean one goes at once."""
        if session.connection is None and not session.persistent:
            self._discard(session)

    def _discard(self, session: Session) -> None:
        for topic_filter in session.subscriptions:
            self.tree.remove(topic_filter, session)
        session.subscriptions.clear()
        session.inflight.clear()
        session.discard_queue()
        session.incoming_qos2.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    # -- routing ---------------------------------------------------------------------------

    def message(self, topic: str, payload: bytes, qos: int, retain: bool) -> Message:
        return Message(topic, payload, qos, retain, topic_field(topic))

    def publish(self, message: Message) -> None:
        """Deliver to every matching session whose policy allows RECEIVE, at min(publish, subscription) QoS."""
        self.stats.messages_in += 1
        for session, granted in self.tree.match(message.topic).items():
            if not self._receivable(session, message.topic):
                continue
            qos = granted if granted < message.qos else message.qos
            self.deliver(session, message, qos, False)

    def retain(self, message: Message, owner: Binding) -> bool:
        """Store or clear the retained message of a topic; ``False`` when the owner is at its limit."""
        topic = message.topic
        current = self.retained.get(topic)
        if not message.payload:  # a zero-byte retained message clears the topic (MQTT-3.3.1-10)
            if current is not None:
                self.retained.pop(topic)
                self._count_retained(current.owner, -1)
            return True
        device = owner.device_id
        if current is None or current.owner != device:
            if self.retained_by.get(device, 0) >= owner_limits(self, owner).max_retained:
                return False
            self._count_retained(device, 1)
            if current is not None:
                self._count_retained(current.owner, -1)
        self.retained.put(topic, Retained(Message(topic, message.payload, message.qos, True, message.topic_field),
                                          device))
        return True

    def _count_retained(self, device: str, delta: int) -> None:
        count = self.retained_by.get(device, 0) + delta
        if count > 0:
            self.retained_by[device] = count
        else:
            self.retained_by.pop(device, None)

    def deliver(self, session: Session, message: Message, qos: int, retain: bool) -> None:
        connection = session.connection
        if qos == 0:
            if connection is not None and connection.writable():
                connection.send(encode_publish(message.topic_field, message.payload, 0, retain))
                self.stats.messages_out += 1
            else:
                session.dropped += 1
                self.stats.dropped += 1
            return
        if connection is not None and session.can_fly() and not session.queue and connection.writable():
            self._fly(session, connection, message, qos, retain)
        elif not session.enqueue(message, qos, retain):
            self.stats.dropped += 1

    def _fly(self, session: Session, connection: Outlet, message: Message, qos: int, retain: bool) -> None:
        packet_id = session.packet_id()
        session.inflight[packet_id] = Flight(message, qos, retain)
        connection.send(encode_publish(message.topic_field, message.payload, qos, retain, packet_id=packet_id))
        self.stats.messages_out += 1

    def pump(self, session: Session) -> None:
        """Move queued messages into flight while the window and the socket allow."""
        connection = session.connection
        while session.queue and connection is not None and session.can_fly() and connection.writable():
            message, qos, retain = session.dequeue()
            if self._receivable(session, message.topic):
                self._fly(session, connection, message, qos, retain)

    def _receivable(self, session: Session, topic: str) -> bool:
        binding = session.binding
        if binding is None or binding.revoked is not None:
            return False
        if binding.policy.allows_receive(topic):
            return True
        self.stats.receive_denied += 1
        self.warden.topic_denied(binding, Action.RECEIVE.value, topic)
        return False

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> None:
        session.subscriptions[topic_filter] = qos
        self.tree.add(topic_filter, session, qos)
        for retained in list(self.retained.select(topic_filter)):
            message = retained.message
            if self._receivable(session, message.topic):
                self.deliver(session, message, min(qos, message.qos), True)

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        if session.subscriptions.pop(topic_filter, None) is not None:
            self.tree.remove(topic_filter, session)

    # -- SessionHost (for the guard) -------------------------------------------------------

    def bound(self, device_id: str | None = None) -> Iterator[Binding]:
        if device_id is not None:
            session = self.sessions.get(device_id)
            sessions = [session] if session is not None else []
        else:
            sessions = list(self.sessions.values())
        for session in sessions:
            if session.binding is not None:
                yield session.binding

    async def forget(self, device_id: str, fingerprint: str | None) -> None:
        session = self.sessions.get(device_id)
        if session is None:
            return
        binding = session.binding
        if fingerprint is not None and (binding is None or binding.admission.fingerprint != fingerprint):
            return
        if binding is not None:
            binding.cancel_timer()
        if session.connection is not None:
            session.connection.abort()
            session.connection = None
        self._discard(session)
        log.info("forgot the session of %s (subscriptions and queued messages deleted)", device_id)

    def prune(self, bindings: Collection[Binding]) -> int:
        dropped = 0
        for binding in bindings:
            session = self.sessions.get(binding.device_id)
            if session is None or session.binding is not binding:
                continue
            for topic_filter in list(session.subscriptions):
                if not binding.allows(Action.SUBSCRIBE, topic_filter):
                    self.unsubscribe(session, topic_filter)
                    dropped += 1
        return dropped


def owner_limits(engine: Engine, owner: Binding) -> SessionLimits:
    session = engine.sessions.get(owner.device_id)
    return session.limits if session is not None else engine.limits_for(owner.admission.profile)


__all__ = ["Engine", "EngineStats", "Retained", "Warden"]
