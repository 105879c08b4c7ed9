"""One admitted connection speaking MQTT 3.1.1 to the engine: packets in, acknowledgements out, keep-alive.

A connection reads only whole packets (:class:`~iotauth.broker.mqtt.FrameReader`,
bounded by the profile's ``max_packet_size``) and closes itself on the first
protocol violation (§4.8): a malformed packet, a second CONNECT
(MQTT-3.1.0-2), a packet only a server may send. Its bytes after a bad packet
are never read.

Keep-alive (MQTT-3.1.2-24): a client that sends nothing for 1.5 x its
keep-alive is disconnected and its will is published. The check costs one
timer per keep-alive period per connection, not one per packet: the timer
re-arms itself from the time of the last packet when it fires early.

Denied PUBLISHes are acknowledged like any other (MQTT 3.1.1 has no negative
acknowledgement) and delivered to no one; the guard audits them. ``$`` topics
are simply never allowed by any policy, so a device's ``$SYS/...`` publish is
such a denial (MQTT-3.3.5-2 allows this).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from iotauth.broker.core.engine import Engine
from iotauth.broker.core.session import Session
from iotauth.broker.mqtt import (
    PINGRESP,
    SUBSCRIBE_FAILURE,
    Connect,
    FrameReader,
    PacketType,
    Publish,
    Will,
    check_empty,
    connack,
    encode_ack,
    parse_packet_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    suback,
)
from iotauth.errors import LimitExceeded, MalformedPacket
from iotauth.policy import Action, filter_problem

if TYPE_CHECKING:
    from iotauth.broker.binding import Binding

log = logging.getLogger("iotauth.broker")


class Link(Protocol):
    """A byte stream to one client, already authenticated (TLS or secure WebSocket)."""

    peer: str

    def write(self, data: bytes) -> None: ...

    def writable(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class MqttConnection:
    """See the module docstring. Created by :func:`start` once the gate has admitted a CONNECT."""

    __slots__ = ("_deadline", "_ended", "_handlers", "_reader", "_timer", "binding", "clean_exit", "closed",
                 "engine", "keep_alive", "last_seen", "link", "session", "will")

    def __init__(self, engine: Engine, link: Link, binding: Binding, session: Session, connect: Connect) -> None:
        self.engine = engine
        self.link = link
        self.binding = binding
        self.session = session
        self.will: Will | None = connect.will
        self.keep_alive = connect.keep_alive
        self._reader = FrameReader(session.limits.max_packet_size)
        self.closed = False
        self.clean_exit = False
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        self.last_seen = asyncio.get_running_loop().time()
        self._deadline = 1.5 * self.keep_alive
        self._handlers: dict[int, Callable[[int, bytes], None]] = {
            PacketType.PUBLISH: self._on_publish,
            PacketType.PUBACK: self._on_puback,
            PacketType.PUBREC: self._on_pubrec,
            PacketType.PUBREL: self._on_pubrel,
            PacketType.PUBCOMP: self._on_pubcomp,
            PacketType.SUBSCRIBE: self._on_subscribe,
            PacketType.UNSUBSCRIBE: self._on_unsubscribe,
            PacketType.PINGREQ: self._on_pingreq,
            PacketType.DISCONNECT: self._on_disconnect,
        }

    # -- link callbacks --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_seen = asyncio.get_running_loop().time()
        try:
            for first, body in self._reader.feed(data):
                handler = self._handlers.get(first >> 4)
                if handler is None:
                    raise MalformedPacket(f"packet type {first >> 4} is not allowed from a client")
                handler(first & 0x0F, body)
                if self.closed:
                    return
        except MalformedPacket as exc:
            self._violation("protocol-violation", str(exc))
        except LimitExceeded as exc:
            self._over_limit(exc.limit, str(exc))

    def connection_lost(self, exc: BaseException | None) -> None:
        """The link is gone, for whatever reason: end the session's connection (once)."""
        if self._ended:
            return
        self._ended = True
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        binding = self.binding
        if not self.clean_exit and binding.revoked is None:
            self._publish_will()
        self.engine.disconnected(self.session, self)
        self.engine.warden.release(binding)
        log.debug("connection of %s from %s ended", binding.device_id, binding.admission.peer)

    def resume_writing(self) -> None:
        if not self.closed:
            self.engine.pump(self.session)

    # -- used by the engine ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.link.write(data)

    def writable(self) -> bool:
        return not self.closed and self.link.writable()

    def taken_over(self) -> None:
        """Another connection of the same client id arrived: this one ends now, its will published."""
        if not self.closed:
            log.info("%s connected again from elsewhere: closing its previous connection (%s)",
                     self.binding.device_id, self.binding.admission.peer)
            self.close()
            self.connection_lost(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.link.close()

    def abort(self) -> None:
        self.clean_exit = True  # no will: the guard or the engine ended it on purpose
        self.closed = True
        self.link.abort()

    # -- keep-alive ------------------------------------------------------------------------

    def arm_keep_alive(self) -> None:
        if self.keep_alive > 0 and not self.closed:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self.last_seen + self._deadline, self._check_keep_alive)

    def _check_keep_alive(self) -> None:
        self._timer = None
        if self.closed:
            return
        if asyncio.get_running_loop().time() >= self.last_seen + self._deadline:
            log.info("%s sent nothing for %.1f s (1.5 x keep-alive %d s): disconnecting",
                     self.binding.device_id, self._deadline, self.keep_alive)
            self.close()
            self.connection_lost(None)
            return
        self.arm_keep_alive()

    # -- packets ---------------------------------------------------------------------------

    def _on_publish(self, flags: int, body: bytes) -> None:
        packet = parse_publish(flags, body)
        qos = packet.qos
        session = self.session
        if qos == 2:
            if packet.packet_id in session.incoming_qos2:  # a resend: delivered already (method B, §4.3.3)
                self.send(encode_ack(PacketType.PUBREC, packet.packet_id))
                return
            if len(session.incoming_qos2) >= session.limits.max_inflight:
                raise LimitExceeded("max_inflight", len(session.incoming_qos2) + 1, session.limits.max_inflight,
                                    "QoS 2 messages not released with PUBREL")
        self._route(packet)
        if self.closed:
            return
        if qos == 1:
            self.send(encode_ack(PacketType.PUBACK, packet.packet_id))
        elif qos == 2:
            session.incoming_qos2.add(packet.packet_id)
            self.send(encode_ack(PacketType.PUBREC, packet.packet_id))

    def _route(self, packet: Publish) -> None:
        binding = self.binding
        engine = self.engine
        if binding.revoked is not None or not binding.policy.allows_publish(packet.topic):
            engine.stats.publish_denied += 1
            engine.warden.topic_denied(binding, Action.PUBLISH.value, packet.topic)
            return
        message = engine.message(packet.topic, packet.payload, packet.qos, packet.retain)
        if packet.retain and not engine.retain(message, binding):
            self._over_limit("max_retained", f"more than {self.session.limits.max_retained} retained messages")
            return
        engine.publish(message)

    def _on_puback(self, flags: int, body: bytes) -> None:
        packet_id = parse_packet_id(PacketType.PUBACK, flags, body)
        flight = self.session.inflight.get(packet_id)
        if flight is not None and flight.qos == 1:
            del self.session.inflight[packet_id]
            self.engine.pump(self.session)

    def _on_pubrec(self, flags: int, body: bytes) -> None:
        packet_id = parse_packet_id(PacketType.PUBREC, flags, body)
        flight = self.session.inflight.get(packet_id)
        if flight is not None and flight.qos == 2:
            flight.released = True
        self.send(encode_ack(PacketType.PUBREL, packet_id))

    def _on_pubrel(self, flags: int, body: bytes) -> None:
        packet_id = parse_packet_id(PacketType.PUBREL, flags, body)
        self.session.incoming_qos2.discard(packet_id)
        self.send(encode_ack(PacketType.PUBCOMP, packet_id))

    def _on_pubcomp(self, flags: int, body: bytes) -> None:
        packet_id = parse_packet_id(PacketType.PUBCOMP, flags, body)
        flight = self.session.inflight.get(packet_id)
        if flight is not None and flight.released:
            del self.session.inflight[packet_id]
            self.engine.pump(self.session)

    def _on_subscribe(self, flags: int, body: bytes) -> None:
        packet = parse_subscribe(flags, body)
        session, limits = self.session, self.session.limits
        if len(packet.requests) > limits.max_filters_per_subscribe:
            raise LimitExceeded("max_filters_per_subscribe", len(packet.requests), limits.max_filters_per_subscribe)
        binding, engine = self.binding, self.engine
        codes: list[int] = []
        granted: dict[str, int] = {}
        for topic_filter, qos in packet.requests:
            problem = filter_problem(topic_filter)
            if problem is not None:
                raise MalformedPacket(f"SUBSCRIBE filter: {problem}")  # MQTT-4.7.1-1..3: not a denial, a violation
            if binding.revoked is not None or not binding.policy.allows_subscribe(topic_filter):
                engine.stats.subscribe_denied += 1
                engine.warden.topic_denied(binding, Action.SUBSCRIBE.value, topic_filter)
                codes.append(SUBSCRIBE_FAILURE)
            else:
                granted[topic_filter] = qos
                codes.append(qos)
        total = len(session.subscriptions) + sum(1 for f in granted if f not in session.subscriptions)
        if total > limits.max_subscriptions:
            raise LimitExceeded("max_subscriptions", total, limits.max_subscriptions)
        self.send(suback(packet.packet_id, codes))
        for topic_filter, qos in granted.items():  # retained messages follow the SUBACK
            engine.subscribe(session, topic_filter, qos)

    def _on_unsubscribe(self, flags: int, body: bytes) -> None:
        packet = parse_unsubscribe(flags, body)
        for topic_filter in packet.filters:
            self.engine.unsubscribe(self.session, topic_filter)
        self.send(encode_ack(PacketType.UNSUBACK, packet.packet_id))

    def _on_pingreq(self, flags: int, body: bytes) -> None:
        check_empty(PacketType.PINGREQ, flags, body)
        self.send(PINGRESP)

    def _on_disconnect(self, flags: int, body: bytes) -> None:
        check_empty(PacketType.DISCONNECT, flags, body)
        self.clean_exit = True  # MQTT-3.14.4-3: the will is discarded
        self.will = None
        self.close()

    # -- endings ---------------------------------------------------------------------------

    def _publish_will(self) -> None:
        will, self.will = self.will, None
        if will is None:
            return
        binding = self.binding
        if binding.revoked is not None or not binding.policy.allows_publish(will.topic):
            self.engine.warden.topic_denied(binding, Action.PUBLISH.value, will.topic)
            return
        engine = self.engine
        message = engine.message(will.topic, will.message, will.qos, will.retain)
        if will.retain and not engine.retain(message, binding):
            engine.warden.limit_exceeded(binding, "max_retained", "the will could not be retained")
        engine.publish(message)

    def _violation(self, reason: str, detail: str) -> None:
        log.info("%s from %s: %s (%s): disconnecting", self.binding.device_id, self.binding.admission.peer,
                 reason, detail)
        self.engine.warden.limit_exceeded(self.binding, reason, detail)
        self.close()

    def _over_limit(self, limit: str, detail: str) -> None:
        self.engine.stats.limit_disconnects += 1
        log.warning("%s from %s broke the limit %s (%s): disconnecting", self.binding.device_id,
                    self.binding.admission.peer, limit, detail)
        self.engine.warden.limit_exceeded(self.binding, limit, detail)
        self.close()


def start(engine: Engine, link: Link, binding: Binding, connect: Connect) -> MqttConnection | None:
    """Open (or resume) the session of an admitted CONNECT, answer CONNACK 0 and resend unfinished flights.

    ``None`` if the guard refused to attach the binding (it was revoked in the meantime).
    """
    session, present = engine.open_session(binding, connect)
    will_topic = connect.will.topic if connect.will is not None else None
    if not engine.warden.attach(binding, session, connect.client_id, will_topic):
        engine.abandon(session)
        return None
    connection = MqttConnection(engine, link, binding, session, connect)
    session.connection = connection
    link.write(connack(0, present))
    connection.arm_keep_alive()
    engine.resume(session)
    return connection
