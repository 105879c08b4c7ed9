"""``IotAuthBroker``: amqtt's broker, fed only by the mTLS gate and hardened where amqtt is unsafe.

What the subclass changes, and why:

* **Only the gate gets in.** Every amqtt listener must be ``external``; the
  gate (:mod:`iotauth.broker.gate`) terminates TLS and hands admitted
  connections over. :meth:`_client_connected` refuses any connection without
  the gate's admission *before* amqtt's session handling runs, because that
  handling deletes, reuses and takes over sessions before authentication.
* **Topic checks without a task per packet.** amqtt's topic-plugin path
  creates a task and a ``gather`` for every PUBLISH and every delivery;
  :meth:`_topic_filtering` asks the session's compiled policy directly (and
  then any other configured topic plugins). No I/O, no database.
* **Retained messages.** amqtt sends a connecting client the retained
  messages matching *every* client's subscription filters, and never asks the
  topic plugins about retained messages at all -- a cross-identity leak.
  :meth:`_publish_retained_messages_for_subscription` only serves the
  session's own filters and checks RECEIVE per message.
* **Resumed sessions.** When a persistent session resumes, its inherited
  subscriptions are re-checked against the current policy and its queued
  messages against RECEIVE (:meth:`_publish_session_retained_messages`, the
  first hook after CONNACK).
* **Wills.** A will whose topic the policy does not allow is dropped, and a
  client disconnected for revocation or expiry gets no last word.
* **Live revocation.** It implements :class:`~iotauth.broker.guard.SessionHost`
  so the guard can forget sessions of revoked devices and drop subscriptions
  that a policy reload withdrew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerType
from amqtt.errors import BrokerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session

from iotauth.broker.binding import ADMISSION, Binding
from iotauth.broker.gate import TlsGate, WebSocketGate
from iotauth.broker.guard import Guard
from iotauth.broker.plugin import BINDING_KEY, IotAuthPlugin, Runtime, binding_of
from iotauth.config import parse_bind
from iotauth.errors import ConfigError
from iotauth.policy import Action as PolicyAction
from iotauth.registry import EventKind, Registry

log = logging.getLogger("iotauth.broker")
FILTERS_KEY = "iotauth.filters"
PLUGIN_PATH = "iotauth.broker.IotAuthPlugin"


def _filters(session: Session) -> set[str]:
    filters = session.attributes.get(FILTERS_KEY)
    if not isinstance(filters, set):
        filters = session.attributes[FILTERS_KEY] = set()
    return filters  # type: ignore[no-any-return]


class IotAuthBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """An amqtt ``Broker`` whose only way in is iotauth's mTLS gate. See the module docstring.

    Args:
        config: an amqtt config (dict or ``BrokerConfig``) that loads
            :class:`~iotauth.broker.plugin.IotAuthPlugin` and has only ``external``
            listeners; :func:`broker_config` builds one.
        registry: an already open registry to use (and not close); by default the
            plugin opens its own from its ``home``/``registry`` options.
    """

    def __init__(self, config: BrokerConfig | dict[str, Any], *, registry: Registry | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, loop)
        plugins = [p for p in self.plugins_manager.plugins if isinstance(p, IotAuthPlugin)]
        if len(plugins) != 1:
            raise BrokerError(f"IotAuthBroker needs exactly one {PLUGIN_PATH} in the config's 'plugins'")
        self._plugin = plugins[0]
        self._other_topic_plugins = [
            p for p in self.plugins_manager._topic_plugins if not isinstance(p, IotAuthPlugin)
        ]
        names = list(self.listeners_config)
        for name in names:
            if self.listeners_config[name].type != ListenerType.EXTERNAL:
                raise BrokerError(
                    f"listener {name!r} is {self.listeners_config[name].type.value}: connections there would bypass "
                    "the mTLS gate; IotAuthBroker accepts only 'external' listeners (set the plugin's bind/ws_bind)"
                )
        self._listener = names[0]
        self._registry = registry
        self._gates: list[TlsGate | WebSocketGate] = []
        self.runtime: Runtime | None = None

    @property
    def guard(self) -> Guard:
        if self.runtime is None:
            raise BrokerError("the broker is not started")
        return self.runtime.guard

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Where each gate listens (``mqtts``/``wss`` -> (host, port)); ports are real even when 0 was asked."""
        return {gate.listener: gate.address for gate in self._gates if gate.address is not None}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        runtime = self.runtime = await self._plugin.open(self._registry)
        try:
            await super().start()
        except BaseException:
            await self._plugin.close()
            raise
        try:
            await runtime.guard.start(self)
            options = self._plugin.options
            if options.bind:
                await self._open_gate(TlsGate, options.bind, 8883, runtime)
            if options.ws_bind:
                await self._open_gate(WebSocketGate, options.ws_bind, 8884, runtime)
        except BaseException:
            await self.shutdown()
            raise
        runtime.guard.audit.event(EventKind.BROKER_STARTED, None, {"listeners": {
            name: f"{host}:{port}" for name, (host, port) in self.addresses.items()}})

    async def _open_gate(self, kind: type[TlsGate] | type[WebSocketGate], bind: str, default_port: int,
                         runtime: Runtime) -> None:
        host, port = parse_bind(bind, default_port)
        gate = kind(runtime.guard, self._handoff, runtime.context, runtime.gate_options)
        try:
            address = await gate.start(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {bind}: {exc.strerror or exc}") from exc
        self._gates.append(gate)
        log.info("listening (%s) on %s:%d", gate.listener, *address)

    async def shutdown(self) -> None:
        for gate in self._gates:
            await gate.close()
        self._gates = []
        if self.runtime is not None:
            self.runtime.guard.audit.event(EventKind.BROKER_STOPPED, None, {})
        await super().shutdown()  # closes the plugins, and with them the guard and the registry
        self.runtime = None

    async def _handoff(self, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        await self.external_connected(reader, writer, self._listener)

    # -- only admitted connections ---------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        if ADMISSION.get() is None:
            log.error("refused a connection on listener %r that did not come through the iotauth gate", listener_name)
            with contextlib.suppress(Exception):
                await writer.close()
            return
        await super()._client_connected(listener_name, reader, writer)

    # -- authorization fast path -----------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        binding = session.attributes.get(BINDING_KEY)
        if binding.__class__ is not Binding:
            return False
        policy = binding.policy
        if action is Action.PUBLISH:
            allowed = policy.allows_publish(topic)
        elif action is Action.RECEIVE:
            allowed = policy.allows_receive(topic)
        else:
            allowed = policy.allows(action, topic)
        if not allowed or binding.revoked is not None:
            if self.runtime is not None:
                self.runtime.guard.topic_denied(binding, action.value, topic)
            return False
        if self._other_topic_plugins:
            # amqtt's own dispatch would run every topic plugin, iotauth's included: ask only the others.
            verdicts = await asyncio.gather(*(
                p.topic_filtering(session=session, topic=topic, action=action) for p in self._other_topic_plugins
            ))
            return all(verdicts)
        return True

    # -- subscriptions, tracked per session so they can be re-checked ----------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code: int = await super().add_subscription(subscription, session)
        if code != 0x80:
            _filters(session).add(subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        _filters(session).discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        await super()._del_all_subscriptions(session)
        _filters(session).clear()

    # -- retained and queued messages ------------------------------------------------------

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        binding = binding_of(session)
        if binding is None or topic_filter not in _filters(session):
            return  # amqtt passes every client's filters here on connect: only the session's own count
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not binding.allows(PolicyAction.RECEIVE, topic):
                if self.runtime is not None:
                    self.runtime.guard.topic_denied(binding, PolicyAction.RECEIVE.value, topic)
                continue
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
            ))
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """amqtt's first call after CONNACK 0: re-check what a resumed session inherited."""
        binding = binding_of(session)
        if binding is None:
            return
        if session.parent:
            dropped = self.prune([binding])
            if dropped:
                log.info("%s resumed a session: dropped %d subscriptions its policy no longer allows",
                         binding.device_id, dropped)
        kept: list[ApplicationMessage] = []
        while not session.retained_messages.empty():
            message = session.retained_messages.get_nowait()
            if binding.allows(PolicyAction.RECEIVE, message.topic):
                kept.append(message)
            elif self.runtime is not None:
                self.runtime.guard.topic_denied(binding, PolicyAction.RECEIVE.value, message.topic)
        for message in kept:
            session.retained_messages.put_nowait(message)
        await super()._publish_session_retained_messages(session)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        binding = binding_of(client_session)
        if client_session.will_flag and (
            binding is None or not binding.allows(PolicyAction.PUBLISH, client_session.will_topic or "")
        ):
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    # -- SessionHost (for the guard) -------------------------------------------------------

    def bound(self, device_id: str | None = None) -> Iterator[Binding]:
        if device_id is not None:
            entry = self._sessions.get(device_id)
            sessions = [entry[0]] if entry is not None else []
        else:
            sessions = [session for session, _ in self._sessions.values()]
        for session in sessions:
            binding = binding_of(session)
            if binding is not None:
                yield binding

    async def forget(self, device_id: str, fingerprint: str | None) -> None:
        entry = self._sessions.get(device_id)
        if entry is None:
            return
        session = entry[0]
        binding = binding_of(session)
        if fingerprint is not None and (binding is None or binding.admission.fingerprint != fingerprint):
            return
        session.will_flag = False
        if binding is not None:
            binding.cancel_timer()
        await self._cleanup_session(device_id)
        log.info("forgot the session of %s (subscriptions and queued messages deleted)", device_id)

    def prune(self, bindings: Collection[Binding]) -> int:
        dropped = 0
        for binding in bindings:
            session = binding.session
            if not isinstance(session, Session):
                continue
            for topic_filter in list(_filters(session)):
                if binding.allows(PolicyAction.SUBSCRIBE, topic_filter):
                    continue
                dropped += self._del_subscription(topic_filter, session)
                if not self._subscriptions.get(topic_filter, True):
                    del self._subscriptions[topic_filter]
        return dropped


def broker_config(
    *,
    home: str | None = None,
    registry: str | None = None,
    bind: str | None = "0.0.0.0:8883",
    ws_bind: str | None = None,
    fail_open: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """The amqtt config ``iotauth broker`` runs: one external listener and the iotauth plugin."""
    plugin = {"home": home, "registry": registry, "bind": bind, "ws_bind": ws_bind, "fail_open": fail_open, **options}
    return {"listeners": {"default": {"type": "external"}}, "plugins": {PLUGIN_PATH: plugin}}


@dataclass(frozen=True)
class Started:
    """What :func:`serve` reports once the listeners are up."""

    addresses: dict[str, tuple[str, int]]


async def serve(config: dict[str, Any], on_started: Callable[[Started], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run an :class:`IotAuthBroker` until SIGINT/SIGTERM (or ``stop``); SIGHUP reloads the policies."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    broker = IotAuthBroker(config)
    await broker.start()
    handled: list[signal.Signals] = []
    try:
        for signum, action in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set),
                               (signal.SIGHUP, lambda: broker.guard.reload())):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, action)
                handled.append(signum)
        if on_started is not None:
            on_started(Started(broker.addresses))
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await broker.shutdown()
        log.info("stopped")


__all__ = ["BINDING_KEY", "IotAuthBroker", "Started", "broker_config", "serve"]
