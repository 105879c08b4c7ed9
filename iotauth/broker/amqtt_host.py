"""amqtt behind a wall: the one module that touches amqtt, for operators who run iotauth inside amqtt.

``iotauth broker`` runs iotauth's own engine (:mod:`iotauth.broker.core`).
This module keeps amqtt available as a *host* behind the same gate and guard,
for deployments that configure amqtt themselves and add their own amqtt
plugins (see ``examples/amqtt_config.yaml``)::

    config = {
        "listeners": {"default": {"type": "external"}},
        "plugins": {"iotauth.broker.IotAuthPlugin": {"home": "/var/lib/iotauth", "bind": "0.0.0.0:8883"}},
    }
    broker = iotauth.broker.IotAuthBroker(config)   # not amqtt.broker.Broker

The gate authenticates every connection before amqtt sees a byte of it; the
guard keeps each admitted connection honest (revocation, expiry, reload).
Identity, policy and revocation therefore hold here exactly as in the native
engine. What amqtt itself does after admission -- keep-alive, QoS redelivery,
limits after authentication -- is amqtt's, with its known gaps (see
``docs/upstream/``): choose the native engine where those matter.

This module is kept in one piece on purpose: it *is* the wall, and every touch
of amqtt's internals must live in exactly one place. Everything below depends
on amqtt 0.12's internals. Each one is pinned by
``tests/broker/test_amqtt_contract.py``, so an amqtt upgrade fails there, in
one place. The internals, and why each is used:

=====================================  =====================================================
``Broker._client_connected``           refuse any connection the gate did not admit
``Broker.external_connected``          hand an admitted connection to amqtt
``Broker._topic_filtering``            ask the session's compiled policy, without a task per packet
``Broker.plugins_manager._topic_plugins``  AND the verdicts of the operator's other topic plugins
``Broker.add_subscription``            track each session's own filters (re-checked on resume/reload)
``Broker._del_subscription``, ``_del_all_subscriptions``, ``_subscriptions``  drop withdrawn filters
``Broker._publish_retained_messages_for_subscription``  serve only the session's own filters; RECEIVE per message
``Broker._retained_messages``, ``_matches``, ``_get_handler``  (used by the method above)
``Broker._publish_session_retained_messages``  first call after CONNACK: re-check a resumed session
``Broker._handle_disconnect``          drop a will the policy or a revocation does not allow
``Broker._sessions``, ``_cleanup_session``  find and forget a device's session on revocation
``Broker.listeners_config``            refuse any listener type but ``external``
``Session.attributes``, ``client_id``, ``will_flag``, ``will_topic``, ``parent``, ``retained_messages``
=====================================  =====================================================

Upgrade checklist (run it for every amqtt release before widening the pin):

1. Read the diff of ``amqtt/broker.py`` and ``amqtt/session.py`` for every name in the table.
2. Run ``pytest tests/broker/test_amqtt_contract.py``: each test states one assumption.
3. Run the security tests against this host (``pytest tests/broker -k amqtt``).
4. Check whether an upstream fix in ``docs/upstream/`` landed; if so, drop the override it replaces.
5. Only then widen ``amqtt>=0.12.1,<0.13`` in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from collections.abc import Callable, Collection, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerType
from amqtt.errors import BrokerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

from iotauth.broker.binding import Binding
from iotauth.broker.gate import Gate, Link
from iotauth.broker.guard import Guard
from iotauth.broker.mqtt import Connect, encode_connect
from iotauth.broker.runtime import BrokerOptions, Runtime, open_runtime
from iotauth.broker.server import Started, raise_file_limit, run
from iotauth.config import parse_bind
from iotauth.errors import ConfigError
from iotauth.policy import Action as PolicyAction
from iotauth.registry import EventKind, Registry

log = logging.getLogger("iotauth.broker")
BINDING_KEY = "iotauth.binding"
FILTERS_KEY = "iotauth.filters"
PLUGIN_PATH = "iotauth.broker.IotAuthPlugin"


ADMISSION: ContextVar[Binding | None] = ContextVar("iotauth_admission", default=None)
"""Set by the amqtt host for the task that hands an admitted connection to amqtt.

amqtt runs plugin calls in tasks created from that task, which copy the
context, so the auth plugin sees the binding of *this* connection and nothing
else; a connection that did not come through the gate has none and is refused.
"""


def binding_of(session: Session | None) -> Binding | None:
    if session is None:
        return None
    value = session.attributes.get(BINDING_KEY)
    return value if isinstance(value, Binding) else None


def _filters(session: Session) -> set[str]:
    filters = session.attributes.get(FILTERS_KEY)
    if not isinstance(filters, set):
        filters = session.attributes[FILTERS_KEY] = set()
    return filters  # type: ignore[no-any-return]


# -- the plugin, in amqtt's own configuration style -----------------------------------------


class IotAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Authentication and topic authorization for :class:`IotAuthBroker` (decides nothing itself).

    :meth:`authenticate` attaches the gate's admission for *this* connection (from
    :data:`ADMISSION`) to the session; :meth:`topic_filtering`
    asks that binding's compiled policy. Both answer ``False``, never ``None``,
    when in doubt: amqtt ignores ``None`` from an auth plugin. Under a stock
    ``amqtt.broker.Broker`` there is no gate, so every connection is refused.
    """

    @dataclass
    class Config:
        """Options under the plugin's key in an amqtt config; see :class:`~iotauth.broker.runtime.BrokerOptions`."""

        home: str | None = None
        registry: str | None = None
        bind: str | None = "0.0.0.0:8883"
        ws_bind: str | None = None
        fail_open: bool = False
        poll_interval: float | int = 0.05
        registry_timeout: float | int = 2.0
        registry_grace: float | int = 10.0
        sweep_interval: float | int = 30.0
        watch_config: float | int = 1.0
        durable_accept: bool = False

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.guard: Guard | None = None
        self._warned = False

    @property
    def options(self) -> BrokerOptions:
        config = self.context.config
        if not isinstance(config, IotAuthPlugin.Config):  # loaded some other way: refuse to guess
            raise ConfigError("IotAuthPlugin must be configured through amqtt's 'plugins' table")
        return BrokerOptions(**asdict(config))

    async def authenticate(self, *, session: Session) -> bool | None:
        binding = ADMISSION.get()
        if binding is None or self.guard is None:
            if not self._warned:
                self._warned = True
                log.error("refusing a connection that did not come through the iotauth gate: "
                          "run iotauth.broker.IotAuthBroker, not amqtt.broker.Broker")
            return False
        will_topic = session.will_topic if session.will_flag else None
        if not self.guard.attach(binding, session, session.client_id, will_topic):
            return False
        previous = binding_of(session)  # a resumed persistent session: its old binding is done
        if previous is not None and previous is not binding:
            previous.cancel_timer()
        session.attributes[BINDING_KEY] = binding
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        binding = binding_of(session)
        if binding is None or topic is None or action is None:
            return False
        if binding.allows(action.value, topic):
            return True
        if self.guard is not None:
            self.guard.topic_denied(binding, action.value, topic)
        return False


# -- the gate's host ------------------------------------------------------------------------


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
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class LinkWriter(WriterAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's writer interface over a gate link."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def write(self, data: bytes) -> None:
        self._link.write(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def get_peer_info(self) -> tuple[str, int] | None:
        """amqtt refuses a connection without peer information (it only logs it)."""
        host, _, port = self._link.peer.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else 0

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return None  # identity comes from the gate's binding, never from amqtt's view of TLS

    async def close(self) -> None:
        self._link.close()


class _Feed:
    """The link's receiver once amqtt owns the connection: bytes into a StreamReader amqtt reads."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.reader.feed_eof()

    def resume_writing(self) -> None:
        pass


class AmqttHost:
    """The gate's :class:`~iotauth.broker.gate.Host` for :class:`IotAuthBroker`."""

    def __init__(self, broker: IotAuthBroker) -> None:
        self.broker = broker
        self.tasks: set[asyncio.Task[None]] = set()

    def accept(self, link: Link, binding: Binding, connect: Connect) -> _Feed:
        reader = asyncio.StreamReader(limit=1 << 20)
        feed = _Feed(reader)
        context = contextvars.copy_context()
        context.run(ADMISSION.set, binding)  # amqtt's plugin calls run in tasks copied from this context
        stream = ReplayReader(encode_connect(connect), StreamReaderAdapter(reader))
        task = asyncio.get_running_loop().create_task(self._run(stream, LinkWriter(link), link, binding),
                                                      context=context)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return feed

    async def _run(self, reader: ReaderAdapter, writer: WriterAdapter, link: Link, binding: Binding) -> None:
        try:
            await self.broker.external_connected(reader, writer, self.broker.listener)
        except Exception:
            log.exception("amqtt failed on the connection of %s", binding.device_id)
        finally:
            self.broker.guard.release(binding)
            link.close()
            log.debug("connection of %s from %s ended", binding.device_id, binding.admission.peer)


# -- the broker -----------------------------------------------------------------------------


class IotAuthBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """An amqtt ``Broker`` whose only way in is iotauth's mTLS gate. See the module docstring.

    Args:
        config: an amqtt config (dict or ``BrokerConfig``) that loads :class:`IotAuthPlugin`
            and has only ``external`` listeners.
        registry: an already open registry to use (and not close).
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
        self.listener = names[0]
        self._registry = registry
        self.gate: Gate | None = None
        self.runtime: Runtime | None = None

    @property
    def guard(self) -> Guard:
        if self.runtime is None:
            raise BrokerError("the broker is not started")
        return self.runtime.guard

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return dict(self.gate.addresses) if self.gate is not None else {}

    async def start(self) -> None:
        raise_file_limit()
        options = self._plugin.options
        runtime = self.runtime = await open_runtime(options, self._registry)
        self._plugin.guard = runtime.guard
        try:
            await super().start()
        except BaseException:
            await runtime.close()
            self.runtime = None
            raise
        try:
            await runtime.guard.start(self)
            gate = self.gate = Gate(runtime.guard, AmqttHost(self), runtime.context, runtime.intake_limits)
            for listener, bind, default_port in (("mqtts", options.bind, 8883), ("wss", options.ws_bind, 8884)):
                if bind:
                    host, port = parse_bind(bind, default_port)
                    await gate.listen(listener, host, port)
        except BaseException:
            await self.shutdown()
            raise
        runtime.guard.audit.event(EventKind.BROKER_STARTED, None, {"host": "amqtt", "listeners": {
            name: f"{host}:{port}" for name, (host, port) in self.addresses.items()}})

    def reload(self) -> bool:
        return self.runtime.reload() if self.runtime is not None else False

    async def shutdown(self) -> None:
        if self.gate is not None:
            await self.gate.close()
            self.gate = None
        runtime = self.runtime
        if runtime is not None:
            runtime.guard.audit.event(EventKind.BROKER_STOPPED, None, {})
        await super().shutdown()
        if runtime is not None:
            await runtime.close()
        self.runtime = None
        self._plugin.guard = None

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
        allowed = binding.allows(action.value, topic)
        if not allowed:
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
            client_session.will_flag = False  # also when revoked: a kicked client gets no last word
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


async def serve(config: BrokerConfig | dict[str, Any], on_started: Callable[[Started], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run an :class:`IotAuthBroker` from an amqtt config until SIGINT/SIGTERM; SIGHUP reloads the policies."""
    await run(IotAuthBroker(config), on_started, stop)


async def serve_options(options: BrokerOptions, on_started: Callable[[Started], None] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """``iotauth broker --engine amqtt``: an :class:`IotAuthBroker` built from the native broker's options."""
    await run(IotAuthBroker(broker_config(**asdict(options))), on_started, stop)


def broker_config(**options: Any) -> dict[str, Any]:
    """An amqtt config: one external listener and the iotauth plugin (options as in :class:`IotAuthPlugin.Config`)."""
    return {"listeners": {"default": {"type": "external"}}, "plugins": {PLUGIN_PATH: options}}


__all__ = ["ADMISSION", "BINDING_KEY", "AmqttHost", "IotAuthBroker", "IotAuthPlugin", "binding_of", "broker_config",
           "serve", "serve_options"]
