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
engine (the security tests run on both: ``iotauth broker --engine amqtt``).
What amqtt itself does after admission -- keep-alive, QoS redelivery, limits
after authentication -- is amqtt's, with its known gaps; the fixes that
belong in amqtt are in ``docs/upstream/``. Choose the native engine where
those matter.

This module is kept in one piece on purpose: it *is* the wall, and every touch
of amqtt's internals must live in exactly one place. Everything below depends
on amqtt 0.12.1. Each internal, what amqtt must do with it (-> why the host
uses it); every item is pinned by a test in ``tests/broker/test_amqtt_contract.py``,
which also checks each signature, so an amqtt upgrade fails there:

* ``Broker.external_connected(reader, writer, name)`` runs a connection's whole
  life, then returns -> :class:`AmqttHost` hands an admitted connection over and
  releases its binding when it ends.
* ``Broker._client_connected(name, reader, writer)`` is the one door; nothing of
  amqtt runs if it does not call up -> refuse a connection the gate did not
  admit, or whose admission was revoked before amqtt ran (amqtt changes
  sessions before it authenticates).
* ``Broker._topic_filtering(session, topic, action)`` decides every SUBSCRIBE,
  PUBLISH and delivery -> ask the session's compiled policy, without a task
  per packet; ``Action`` values are iotauth's policy actions.
* ``plugins_manager._topic_plugins`` / ``.plugins`` list the plugin instances in
  config order -> AND the verdicts of the operator's other topic plugins.
* A topic plugin's ``None`` denies; an auth plugin's ``None`` abstains (no
  boolean at all refuses) -> iotauth's plugin answers ``False`` when in doubt.
* Auth plugins run in tasks copied from the connection's task and receive the
  Session amqtt keeps (on a persistent resume, the cached one) -> :data:`ADMISSION`
  gives the plugin *this* connection's binding, attached to the kept session.
* A plugin's ``Config`` dataclass is built strictly into ``context.config``
  -> :attr:`IotAuthPlugin.options`.
* ``Broker.add_subscription((filter, qos), session)`` runs per filter and its
  codes make the SUBACK -> track each session's own filters.
* ``_del_subscription`` (leaves an empty list in ``_subscriptions``) and
  ``_del_all_subscriptions`` remove filters -> keep that record right;
  ``prune`` deletes what the policy no longer covers.
* ``_publish_retained_messages_for_subscription((filter, qos), session)`` runs
  per granted filter -- and on every CONNACK for *every* client's filters, with
  no RECEIVE check -> the override serves only the session's own filters and
  checks RECEIVE per message (upstream: ``docs/upstream/retained-acl.patch``),
  using ``_retained_messages`` (topic -> ``.topic``/``.data``/``.qos``),
  ``_matches`` and ``_get_handler(session).mqtt_publish``.
* ``_publish_session_retained_messages(session)`` is the first call after
  CONNACK 0, before any packet is handled -> re-check a resumed session's
  filters and offline queue (``Session.retained_messages``) against today's policy.
* ``_handle_disconnect`` reads ``Session.will_flag`` when a connection ends
  -> drop a will that the policy or a revocation does not allow.
* ``_sessions`` (client id -> (Session, handler)) and ``_cleanup_session``
  (closes, forgets) -> :meth:`IotAuthBroker.bound` / :meth:`~IotAuthBroker.forget`.
* ``listeners_config[name].type`` / ``.bind`` -> only ``external`` listeners,
  each with a ``bind`` (amqtt serves no other).
* ``Session.attributes``, ``client_id``, ``will_flag``, ``will_topic``, ``parent``
  -> the binding and the filters live on the session, which a persistent
  resume re-uses (``parent`` 1).
* ``ReaderAdapter``/``WriterAdapter`` ask for no more than ``ReplayReader`` and
  :class:`LinkWriter` implement, and ``ConnectPacket`` reads the CONNECT that
  :func:`~iotauth.broker.mqtt.encode_connect` wrote exactly as the gate decided it.

Upgrade checklist (run it for every amqtt release before widening the pin):

1. Read the diff of ``amqtt/broker.py``, ``amqtt/session.py``, ``amqtt/plugins/manager.py``,
   ``amqtt/mqtt/protocol/*`` and ``amqtt/adapters.py`` for every name in the table.
2. Run ``pytest tests/broker/test_amqtt_contract.py``: each failure names one assumption, and the
   row above says which override depends on it. Change the override, never the test's assumption,
   unless amqtt's new behaviour is safe for that row.
3. Run the security tests on this host: ``pytest tests/broker -k amqtt`` (and ``tests/examples``).
4. Run ``pytest tests/upstream``. A fix that landed upstream makes its "stock amqtt shows the bug"
   test fail: drop the override it made unnecessary (the table says which), drop the patch and its
   write-up from ``docs/upstream/``, and update the gaps named in ``iotauth broker --help``.
   A patch that no longer applies must be re-made against the new release.
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
from typing import TYPE_CHECKING, Any

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
from iotauth.broker.server import Started, listening, open_gate, open_metrics, raise_file_limit, run
from iotauth.errors import ConfigError
from iotauth.policy import Action as PolicyAction
from iotauth.registry import EventKind, Registry

if TYPE_CHECKING:  # loaded only with --metrics-bind (prometheus_client, uvicorn)
    from iotauth.broker.metrics import BrokerMetrics

log = logging.getLogger("iotauth.broker")
BINDING_KEY = "iotauth.binding"
FILTERS_KEY = "iotauth.filters"
PLUGIN_PATH = "iotauth.broker.IotAuthPlugin"
READ_LIMIT = 64 * 1024  # bytes a connection may have unread before its link is paused: twice this
CLOSE_GRACE = 5.0  # seconds amqtt gets to wind down its connections at shutdown


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
        metrics_bind: str | None = None

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
    """amqtt's writer interface over a gate link, with the flow control amqtt expects of ``drain``.

    amqtt writes each packet and then awaits ``drain()``, as with asyncio's
    ``StreamWriter``: while the link's transport is above its write limit
    (the client reads slower than the broker writes), ``drain`` waits for it
    to come back down -- or for the connection to end -- so that amqtt, not
    the socket buffer, holds what a slow client has not taken yet.
    """

    def __init__(self, link: Link, feed: _Feed) -> None:
        self._link = link
        self._feed = feed

    def write(self, data: bytes) -> None:
        self._link.write(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)  # the link flushes what was written at the start of the next iteration
        feed = self._feed
        while not feed.lost and not self._link.writable():
            feed.drained.clear()
            await feed.drained.wait()

    def get_peer_info(self) -> tuple[str, int] | None:
        """amqtt refuses a connection without peer information (it only logs it)."""
        host, _, port = self._link.peer.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else 0

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return None  # identity comes from the gate's binding, never from amqtt's view of TLS

    async def close(self) -> None:
        self._feed.end()
        self._link.close()


class _Feed:
    """The link's receiver once amqtt owns the connection: bytes into the StreamReader amqtt reads.

    The StreamReader pauses the link while more than :data:`READ_LIMIT` x 2
    bytes wait unread (amqtt handles one packet at a time, so a fast client
    cannot fill the broker's memory), and resumes it as amqtt reads on.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.lost = False
        self.drained = asyncio.Event()  # set whenever the link can take writes again, or is gone

    def data_received(self, data: bytes) -> None:
        if not self.lost:
            self.reader.feed_data(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.end()

    def end(self) -> None:
        if not self.lost:
            self.lost = True
            self.reader.feed_eof()
        self.drained.set()

    def resume_writing(self) -> None:
        self.drained.set()


class AmqttHost:
    """The gate's :class:`~iotauth.broker.gate.Host` for :class:`IotAuthBroker`."""

    def __init__(self, broker: IotAuthBroker) -> None:
        self.broker = broker
        self.tasks: set[asyncio.Task[None]] = set()

    def accept(self, link: Link, binding: Binding, connect: Connect) -> _Feed:
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        reader.set_transport(link)  # type: ignore[arg-type]  # it only calls pause_reading/resume_reading
        feed = _Feed(reader)
        context = contextvars.copy_context()
        context.run(ADMISSION.set, binding)  # amqtt's plugin calls run in tasks copied from this context
        stream = ReplayReader(encode_connect(connect), StreamReaderAdapter(reader))
        task = asyncio.get_running_loop().create_task(self._run(stream, LinkWriter(link, feed), link, binding),
                                                      context=context)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return feed

    async def close(self, grace: float | None = None) -> None:
        """Wait for the connections amqtt is still winding down (their links are closed); cancel stragglers.

        So that no connection task outlives the broker and touches the guard or the registry after they close
        (one stuck in an operator's plugin, or handed over just as the broker stopped).
        """
        pending = set(self.tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=CLOSE_GRACE if grace is None else grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

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
            listener = self.listeners_config[name]
            if listener.type != ListenerType.EXTERNAL:
                raise BrokerError(
                    f"listener {name!r} is {listener.type.value}: connections there would bypass "
                    "the mTLS gate; IotAuthBroker accepts only 'external' listeners (set the plugin's bind/ws_bind)"
                )
            if listener.bind is None:  # amqtt 0.12 serves an external listener only if it has a bind (unused)
                raise BrokerError(f"listener {name!r} has 'bind: null': amqtt would not serve it; remove that line "
                                  "(the plugin's bind/ws_bind say where iotauth listens)")
        self.listener = names[0]
        self._registry = registry
        self.gate: Gate | None = None
        self.host: AmqttHost | None = None
        self.runtime: Runtime | None = None
        self.metrics: BrokerMetrics | None = None

    @property
    def guard(self) -> Guard:
        if self.runtime is None:
            raise BrokerError("the broker is not started")
        return self.runtime.guard

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return listening(self.gate, self.metrics)

    async def start(self) -> None:
        options = self._plugin.options
        runtime = self.runtime = await open_runtime(options, self._registry)
        raise_file_limit()
        self._plugin.guard = runtime.guard
        try:
            await super().start()
        except BaseException:
            await runtime.close()
            self.runtime = None
            raise
        try:
            await runtime.guard.start(self)
            self.host = AmqttHost(self)
            self.gate = await open_gate(runtime, self.host, options, engine="amqtt")
            # amqtt keeps no message counters: the gate's and the guard's only
            self.metrics = await open_metrics(runtime, self.gate, options, None, "amqtt")
        except BaseException:
            await self.shutdown()
            raise

    def reload(self) -> bool:
        return self.runtime.reload() if self.runtime is not None else False

    async def shutdown(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        if self.gate is not None:
            await self.gate.close()
            self.gate = None
        runtime = self.runtime
        if runtime is not None:
            runtime.guard.audit.event(EventKind.BROKER_STOPPED, None, {})
        await super().shutdown()
        if self.host is not None:
            await self.host.close()  # the links are closed: let amqtt finish each connection before the guard goes
            self.host = None
        if runtime is not None:
            await runtime.close()
        self.runtime = None
        self._plugin.guard = None

    # -- only admitted connections ---------------------------------------------------------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        admission = ADMISSION.get()
        if admission is None or admission.revoked is not None:
            # Not admitted by the gate, or revoked since: amqtt changes sessions before it authenticates
            # (docs/upstream/authenticate-first.patch), so such a connection must not reach its code at all.
            if admission is None:
                log.error("refused a connection on listener %r that did not come through the iotauth gate",
                          listener_name)
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
            # None denies, as in amqtt; so does a plugin that fails (amqtt would abort the whole delivery).
            verdicts = await asyncio.gather(*(
                p.topic_filtering(session=session, topic=topic, action=action) for p in self._other_topic_plugins
            ), return_exceptions=True)
            allowed = True
            for plugin, verdict in zip(self._other_topic_plugins, verdicts, strict=True):
                if isinstance(verdict, BaseException):
                    log.error("topic plugin %s failed on %s %r: %r (denied)", type(plugin).__name__,
                              action.value, topic, verdict)
                    allowed = False
                elif not verdict:
                    allowed = False
            return allowed
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
            done, _ = await asyncio.wait(tasks)
            for task in done:  # a client that never acknowledges: amqtt's own timeout, not an error of ours
                if not task.cancelled() and task.exception() is not None:
                    log.debug("retained message to %s not delivered: %r", binding.device_id, task.exception())

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
