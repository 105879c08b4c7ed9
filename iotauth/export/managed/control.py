"""The follower's connection to Mosquitto's dynamic-security control topic.

An asyncio facade over a paho-mqtt client (paho runs its network loop, and
reconnects, in its own thread; every callback hops to the event loop). What
the measurements behind it (Mosquitto 2.0.11) decided:

* Commands go as **one JSON message** per batch to ``$CONTROL/dynamic-security/v1``
  and one message comes back on ``.../response`` to *every* subscriber of it, so
  each command carries a ``correlationData`` string (``<batch>:<index>``) and
  answers are matched by it. A non-string correlationData aborts the rest of a
  batch: ours are always strings.
* Commands are published at **QoS 0**: paho re-sends QoS 1 messages after a
  reconnect, and a batch that ran twice answered "already exists" everywhere.
  With QoS 0 a lost connection simply fails the call (:class:`MosquittoUnavailable`);
  the follower then reconciles, which is idempotent.
* **Keepalive 60 s**: the broker answers no PINGREQ while it runs a control
  message (about 65 ms per saving command with 10,000 devices), and a short
  keepalive dropped the connection in the middle of a batch.
* The password is handed to paho once and never logged; the username
  (``iotauth:follower``) is outside the device-id alphabet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotauth.errors import MosquittoControlError, MosquittoUnavailable
from iotauth.export.managed.state import ADMIN_USERNAME, CONTROL_TOPIC, RESPONSE_TOPIC, Command

log = logging.getLogger("iotauth.mosquitto")

KEEPALIVE = 60
NOT_AUTHORISED = frozenset({4, 5, 134, 135})  # bad user name or password / not authorised (3.1.1 and 5 codes)


@dataclass
class _Pending:
    expect: int
    future: asyncio.Future[list[dict[str, Any]]]
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)


class DynsecControl:
    """Send dynamic-security commands to one Mosquitto and await their answers.

    Attributes:
        connects: successful connections so far; a change means Mosquitto
            restarted or the connection broke (the follower then reconciles).
        refusals: consecutive CONNACKs refusing the admin's credentials; Mosquitto
            then runs without iotauth's state (a lost or replaced state file).
        changed: set whenever the connection state changes (the follower waits on it).
    """

    def __init__(self, host: str, port: int, password: str, *, keepalive: int = KEEPALIVE) -> None:
        self.host, self.port = host, port
        self._password = password
        self._keepalive = keepalive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._pending: dict[str, _Pending] = {}
        self._ready = False
        self._subscribe_mid: int | None = None
        self.connects = 0
        self.refusals = 0
        self.last_refusal: str | None = None
        self.commands = 0  # commands sent (metrics)
        self.changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Connected, and subscribed to the answers."""
        return self._ready

    def start(self) -> None:
        """Connect in the background (paho retries until Mosquitto is there, and after every loss)."""
        self._loop = asyncio.get_running_loop()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{ADMIN_USERNAME}:{os.getpid()}",
                             protocol=paho.MQTTv311, clean_session=True)
        client.username_pw_set(ADMIN_USERNAME, self._password)
        client.reconnect_delay_set(0.1, 2)  # type: ignore[arg-type]  # paho annotates int; seconds work
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.connect_async(self.host, self.port, self._keepalive)
        client.loop_start()
        self._client = client

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._fail_all("the follower is stopping")

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bounded wait is the point
        """Until connected and subscribed (True), or ``timeout`` seconds (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def send(self, commands: Sequence[Command], timeout: float | None = None) -> list[dict[str, Any]]:  # noqa: ASYNC109
        """Send ``commands`` as one control message; their answers, in order (failed ones carry ``error``).

        Raises:
            MosquittoUnavailable: not connected, the connection broke, or no answer in time
                (the commands may or may not have run: reconcile).
        """
        if not commands:
            return []
        client = self._client
        if client is None or not self._ready:
            raise MosquittoUnavailable("not connected to Mosquitto's control listener")
        batch = uuid.uuid4().hex
        payload = {"commands": [{**c, "correlationData": f"{batch}:{i}"} for i, c in enumerate(commands)]}
        pending = _Pending(len(commands), asyncio.get_running_loop().create_future())
        self._pending[batch] = pending
        try:
            info = client.publish(CONTROL_TOPIC, json.dumps(payload, separators=(",", ":")), qos=0)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise MosquittoUnavailable(f"could not send to Mosquitto: {paho.error_string(info.rc)}")
            self.commands += len(commands)
            limit = timeout if timeout is not None else 30.0 + 0.25 * len(commands)
            try:
                return await asyncio.wait_for(asyncio.shield(pending.future), limit)
            except TimeoutError:
                raise MosquittoUnavailable(
                    f"Mosquitto answered {len(pending.answers)} of {len(commands)} commands within {limit:.0f} s"
                ) from None
        finally:
            self._pending.pop(batch, None)

    async def run(self, commands: Sequence[Command], *, batch: int = 50, tolerate: Sequence[str] = ()) -> int:
        """Send ``commands`` in messages of at most ``batch``; raise on any error not in ``tolerate``.

        Returns how many commands failed with a tolerated error (the state was
        already as wanted: "already exists", "not found" after a retry).
        """
        tolerated = 0
        for start in range(0, len(commands), batch):
            chunk = commands[start : start + batch]
            for command, answer in zip(chunk, await self.send(chunk), strict=True):
                problem = answer.get("error")
                if problem is None:
                    continue
                if any(t in str(problem) for t in tolerate):
                    tolerated += 1
                    continue
                raise MosquittoControlError(f"Mosquitto refused {command['command']} "
                                            f"{command.get('username') or command.get('rolename') or ''}: {problem}")
        return tolerated

    async def query(self, commands: Sequence[Command]) -> list[dict[str, Any] | None]:
        """Read-only commands (getClient, listRoles...): each answer's ``data``, None where it failed."""
        found: list[dict[str, Any] | None] = []
        for start in range(0, len(commands), 200):
            for answer in await self.send(commands[start : start + 200]):
                data = answer.get("data")
                found.append(data if "error" not in answer and isinstance(data, dict) else None)
        return found

    # -- paho's thread ------------------------------------------------------------------------

    def _call(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        code = int(reason.value) if hasattr(reason, "value") else int(reason)
        if code != 0:
            self._call(self._refused, str(reason), code)
            return
        result, mid = client.subscribe(RESPONSE_TOPIC, qos=0)
        self._call(self._subscribing, mid if result == paho.MQTT_ERR_SUCCESS else None)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        granted = all(not getattr(r, "is_failure", False) for r in reasons)
        self._call(self._subscribed, mid, granted)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._call(self._lost, str(reason))

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        self._call(self._answers, bytes(message.payload))

    # -- the event loop's side ----------------------------------------------------------------

    def _refused(self, reason: str, code: int) -> None:
        self._ready = False
        if code in NOT_AUTHORISED:
            self.refusals += 1
        self.last_refusal = reason
        self.changed.set()

    def _subscribing(self, mid: int | None) -> None:
        self._subscribe_mid = mid

    def _subscribed(self, mid: int, granted: bool) -> None:
        if mid != self._subscribe_mid:
            return
        if not granted:  # the admin role lost its rights: treat like a refusal
            log.error("Mosquitto refused the follower's subscription to %s", RESPONSE_TOPIC)
            self._refused("subscription refused", 5)
            return
        self._ready = True
        self.refusals = 0
        self.last_refusal = None
        self.connects += 1
        self.changed.set()

    def _lost(self, reason: str) -> None:
        was_ready, self._ready = self._ready, False
        if was_ready:
            log.warning("lost the connection to Mosquitto's control listener (%s)", reason)
        self._fail_all(f"connection to Mosquitto lost ({reason})")
        self.changed.set()

    def _fail_all(self, why: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(MosquittoUnavailable(why))

    def _answers(self, payload: bytes) -> None:
        try:
            document = json.loads(payload)
        except ValueError:
            return
        responses = document.get("responses") if isinstance(document, dict) else None
        if not isinstance(responses, list):
            return
        for answer in responses:
            if not isinstance(answer, dict):
                continue
            batch, _, index = str(answer.get("correlationData", "")).rpartition(":")
            pending = self._pending.get(batch)
            if pending is None or not index.isdigit() or int(index) >= pending.expect:
                continue
            pending.answers[int(index)] = answer
            if len(pending.answers) == pending.expect and not pending.future.done():
                pending.future.set_result([pending.answers[i] for i in range(pending.expect)])

