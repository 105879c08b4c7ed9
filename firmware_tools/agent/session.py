"""One MQTT 3.1.1 session over TLS with one identity (paho-mqtt), and how a connect ended.

A connect ends with a CONNACK code, or with :data:`TLS_REFUSED` when the
broker refused the certificate as *revoked* during the TLS handshake (what a
CRL-reading broker such as Mosquitto does), or with ``None`` when the
connection failed or closed before any answer (network, a busy server).
Only the first two say something about the certificate.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_tools.agent.journal import Identity, StateDir

V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
TLS_REFUSED = -1
"""The broker sent a ``certificate revoked`` alert in the handshake (Mosquitto reading its CRL)."""


def refused_as_revoked(exc: ssl.SSLError) -> bool:
    """A handshake alert that says the broker holds this certificate revoked (not a failure of our own)."""
    return "ALERT_CERTIFICATE_REVOKED" in str(exc.reason or exc).upper() or "CERTIFICATE REVOKED" in str(exc).upper()


def describe(code: int | None) -> str:
    if code == TLS_REFUSED:
        return "certificate refused as revoked at the TLS handshake"
    if code is None:
        return "no answer (closed before CONNACK, or unreachable)"
    return f"CONNACK {code}"


class Session:
    """A paho-mqtt 3.1.1 session over TLS with one identity; messages arrive in a queue."""

    def __init__(self, state: StateDir, identity: Identity, host: str, port: int) -> None:
        self.state, self.identity = state, identity
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=state.device_id, protocol=mqtt.MQTTv311,
                                  clean_session=True, reconnect_on_failure=False)
        self.client.tls_set(ca_certs=str(state.path("ca.pem")), certfile=str(identity.fullchain),
                            keyfile=str(identity.key), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.host, self.port = host, port
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.answer: queue.Queue[int | None] = queue.Queue()
        self.closed = False
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self.answer.put(V5_TO_V311.get(reason.value,
                                                                                                 reason.value))
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, message: self.inbox.put(message)

    def _on_disconnect(self, *_args: Any) -> None:
        self.closed = True
        self.answer.put(None)

    def connect(self, timeout: float) -> int | None:
        """The CONNACK code (0: connected), :data:`TLS_REFUSED`, or None if the connection failed or closed first."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except ssl.SSLError as exc:
            return TLS_REFUSED if refused_as_revoked(exc) else None
        except OSError:
            return None
        self.client.loop_start()
        try:
            code = self.answer.get(timeout=timeout)
        except queue.Empty:
            code = None
        if code != 0:
            self.close()
        return code

    def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def next_message(self, timeout: float) -> mqtt.MQTTMessage | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
