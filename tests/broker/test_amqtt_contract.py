"""Every assumption :mod:`iotauth.broker.amqtt_host` makes about amqtt, checked against the installed amqtt.

One test per row of that module's table of internals (and for the few it relies on without
overriding them), each naming the internal and stating what it must do. They drive a real amqtt
``Broker`` in this test's event loop: its ``external`` listener is fed plain loopback TCP
connections (``external_connected`` with amqtt's own stream adapters), and a hand-built MQTT
client (:class:`~tests.fixtures.raw_mqtt.AsyncRawClient`) talks to it. Subclasses of amqtt's
``Broker`` stand in for the overrides, so each test shows what amqtt does around the hook, not
what iotauth does inside it (that is tested on the real host in ``tests/broker/test_amqtt_host.py``
and by the security tests, which run on both engines).

When an amqtt upgrade breaks one of these, the module docstring of ``amqtt_host`` says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from amqtt.adapters import BufferReader, ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import BrokerError, PluginLoadError
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from hypothesis import given, settings

from iotauth.broker.amqtt_host import PLUGIN_PATH, IotAuthBroker, IotAuthPlugin
from iotauth.broker.mqtt import Connect, encode_connect
from iotauth.broker.runtime import BrokerOptions
from iotauth.policy import Action as PolicyAction
from tests.broker.test_mqtt import connects
from tests.fixtures import amqtt_plugins
from tests.fixtures.amqtt_plugins import CALLS, PROBE
from tests.fixtures.raw_mqtt import SUBACK, AsyncRawClient, connect_packet, subscribe_packet

TIMEOUT = 10.0
PLUGINS = "tests.fixtures.amqtt_plugins"
ALLOW = {f"{PLUGINS}.Verdicts": {}}
RECORD = {f"{PLUGINS}.Recorder": {}}
_ids = itertools.count()


def client_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@dataclass
class Loopback:
    """An in-process amqtt broker whose ``default`` external listener is fed loopback TCP connections."""

    broker: Broker
    port: int
    connections: list[asyncio.Task[None]] = field(default_factory=list)

    async def client(self) -> AsyncRawClient:
        return await AsyncRawClient.open(self.port)

    async def connected(self, cid: str, clean: bool = True, **kwargs: Any) -> AsyncRawClient:
        client = await self.client()
        code, _ = await client.connect(cid, clean, **kwargs)
        assert code == 0
        return client

    def session(self, cid: str) -> Session:
        return self.broker._sessions[cid][0]


@contextlib.asynccontextmanager
async def loopback(cls: type[Broker] = Broker, plugins: dict[str, Any] | None = None,
                   listeners: dict[str, Any] | None = None) -> AsyncIterator[Loopback]:
    """Start ``cls`` with an external ``default`` listener; every connection gets its own :data:`PROBE` value."""
    broker = cls({"listeners": listeners or {"default": {"type": "external"}},
                  "plugins": ALLOW if plugins is None else plugins})
    await broker.start()
    numbers = itertools.count()
    state = Loopback(broker, 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        PROBE.set(f"connection-{next(numbers)}")  # this task's context, as the amqtt host sets ADMISSION
        task = asyncio.current_task()
        assert task is not None
        state.connections.append(task)
        await broker.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer), "default")

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    CALLS.clear()
    try:
        yield state
    finally:
        server.close()
        await broker.shutdown()
        await server.wait_closed()


async def eventually(predicate: Callable[[], Any], message: str = "condition") -> Any:
    async with asyncio.timeout(TIMEOUT):
        while not (value := predicate()):
            await asyncio.sleep(0.01)
    return value


# -- the surface: names and signatures ----------------------------------------------------

# Every amqtt callable amqtt_host overrides (O) or calls (C), with the parameters it relies on.
SIGNATURES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "_client_connected": ("O", ("self", "listener_name", "reader", "writer"), True),
    "external_connected": ("C", ("self", "reader", "writer", "listener_name"), True),
    "_topic_filtering": ("O", ("self", "session", "topic", "action"), True),
    "add_subscription": ("O", ("self", "subscription", "session"), True),
    "_del_subscription": ("O", ("self", "a_filter", "session"), False),
    "_del_all_subscriptions": ("O", ("self", "session"), True),
    "_publish_retained_messages_for_subscription": ("O", ("self", "subscription", "session"), True),
    "_publish_session_retained_messages": ("O", ("self", "session"), True),
    "_handle_disconnect": ("O", ("self", "client_session", "handler", "disconnect_waiter"), True),
    "_matches": ("C", ("self", "topic", "a_filter"), False),
    "_get_handler": ("C", ("self", "session"), False),
    "_cleanup_session": ("C", ("self", "client_id"), True),
    "start": ("O", ("self",), True),
    "shutdown": ("O", ("self",), True),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_every_internal_we_touch_exists_with_the_signature_we_use(name: str) -> None:
    """The method exists on ``amqtt.broker.Broker``, is (or is not) a coroutine, and takes these parameters.

    For an override (O), ``IotAuthBroker``'s method has the same parameters, so amqtt's calls reach it.
    """
    role, parameters, coroutine = SIGNATURES[name]
    ours = getattr(Broker, name)
    assert tuple(inspect.signature(ours).parameters) == parameters
    assert inspect.iscoroutinefunction(ours) is coroutine
    if role == "O":
        override = getattr(IotAuthBroker, name)
        assert override is not ours, f"IotAuthBroker no longer overrides {name}: remove it from the table"
        assert tuple(inspect.signature(override).parameters) == parameters
        assert inspect.iscoroutinefunction(override) is coroutine


def test_plugin_hooks_are_keyword_only_coroutines() -> None:
    """amqtt calls ``authenticate(session=...)`` and ``topic_filtering(session=, topic=, action=)`` by keyword."""
    auth = inspect.signature(BaseAuthPlugin.authenticate).parameters
    assert [n for n, p in auth.items() if p.kind is inspect.Parameter.KEYWORD_ONLY] == ["session"]
    assert inspect.iscoroutinefunction(BaseAuthPlugin.authenticate)
    topic = inspect.signature(BaseTopicPlugin.topic_filtering).parameters
    assert [n for n, p in topic.items() if p.kind is inspect.Parameter.KEYWORD_ONLY] == ["session", "topic", "action"]
    assert inspect.iscoroutinefunction(BaseTopicPlugin.topic_filtering)


def test_the_adapters_ask_for_exactly_the_methods_our_adapters_implement() -> None:
    """``ReplayReader``/``LinkWriter`` implement amqtt's adapter ABCs: no new abstract method appeared."""
    assert ReaderAdapter.__abstractmethods__ == {"read", "feed_eof"}
    assert WriterAdapter.__abstractmethods__ == {"write", "drain", "get_peer_info", "get_ssl_info", "close"}


def test_amqtt_actions_are_iotauths_policy_actions() -> None:
    """``_topic_filtering`` passes ``action.value`` to the policy, which denies any action it does not know."""
    assert {action.value for action in Action} == {action.value for action in PolicyAction}
    assert all(PolicyAction(action.value) for action in Action)


@settings(max_examples=300, deadline=None)
@given(connect=connects())
def test_amqtt_parses_exactly_what_the_gate_decided(connect: Connect) -> None:
    """No parser differential: amqtt reads the same client id, session flag and will from the re-encoded CONNECT.

    The host hands amqtt the CONNECT :func:`encode_connect` wrote from the gate's decision (``ReplayReader``).
    """
    parsed = asyncio.run(ConnectPacket.from_stream(BufferReader(encode_connect(connect))))
    assert parsed.client_id == connect.client_id
    assert parsed.clean_session_flag == connect.clean_session
    assert parsed.keep_alive == connect.keep_alive
    assert parsed.will_flag == (connect.will is not None)
    if connect.will is not None:
        assert (parsed.will_topic, parsed.will_message, parsed.will_qos, parsed.will_retain_flag) == (
            connect.will.topic, connect.will.message, connect.will.qos, connect.will.retain)
    assert parsed.username == connect.username


# -- configuration and plugins --------------------------------------------------------------


async def test_plugin_config_is_the_plugins_config_dataclass_built_strictly() -> None:
    """amqtt builds ``IotAuthPlugin.Config`` from the plugin's table (dacite, strict) into ``context.config``;
    ``plugins_manager.plugins`` holds the instances. ``IotAuthPlugin.options`` reads exactly that."""
    broker = Broker({"listeners": {"default": {"type": "external"}},
                     "plugins": {PLUGIN_PATH: {"home": "/srv/iotauth", "bind": "127.0.0.1:0", "poll_interval": 1}}})
    [plugin] = broker.plugins_manager.plugins
    assert isinstance(plugin, IotAuthPlugin)
    assert isinstance(plugin.context.config, IotAuthPlugin.Config)
    assert plugin.options == BrokerOptions(home="/srv/iotauth", bind="127.0.0.1:0", poll_interval=1)
    with pytest.raises(PluginLoadError):
        Broker({"listeners": {"default": {"type": "external"}}, "plugins": {PLUGIN_PATH: {"hme": "/typo"}}})


async def test_listeners_config_gives_each_listeners_type_and_an_external_one_is_served() -> None:
    """``listeners_config`` maps names to configs whose ``.type`` is a ``ListenerType`` (the host refuses all but
    ``external``); an external listener with a ``bind`` (the default) is served by ``external_connected``, one
    without is not (amqtt 0.12 registers only listeners with a ``bind``, so the host refuses that config)."""
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}, "gate": {"type": "external"}},
                     "plugins": ALLOW})
    assert {name: config.type for name, config in broker.listeners_config.items()} == {
        "default": ListenerType.TCP, "gate": ListenerType.EXTERNAL}
    async with loopback(listeners={"default": {"type": "external"}}) as served:
        assert served.broker.listeners_config["default"].bind is not None
        await (await served.connected(client_id("served"))).disconnect()
    unbound = Broker({"listeners": {"default": {"type": "external", "bind": None}}, "plugins": ALLOW})
    await unbound.start()
    try:
        reader = asyncio.StreamReader()
        reader.feed_eof()
        with pytest.raises(BrokerError, match="Invalid listener name"):
            await unbound.external_connected(StreamReaderAdapter(reader), _NullWriter(), "default")
    finally:
        await unbound.shutdown()


class _NullWriter(WriterAdapter):
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def get_peer_info(self) -> tuple[str, int] | None:
        return None

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        pass


async def test_an_auth_plugin_answering_none_abstains_and_a_topic_plugin_answering_none_denies() -> None:
    """amqtt's asymmetry, which is why iotauth's plugin answers ``False``, never ``None``, when in doubt:
    authentication ignores ``None`` (and refuses when no plugin gave a boolean); topic checks AND every
    plugin's answer, so ``None`` denies."""
    async with loopback(plugins={f"{PLUGINS}.Verdicts": {"auth": None, "topic": None}}) as alone:
        client = await alone.client()
        assert (await client.connect(client_id("abstain")))[0] == 5
        await client.close()
    abstaining = {f"{PLUGINS}.Verdicts": {"auth": None, "topic": None}, **RECORD}
    async with loopback(plugins=abstaining) as both:
        client = await both.connected(client_id("abstain"))
        assert await client.subscribe([("any/topic", 1)]) == [0x80]
        await client.disconnect()


async def test_topic_plugins_are_listed_in_config_order_and_amqtt_asks_every_one() -> None:
    """``plugins_manager._topic_plugins`` lists the topic plugin instances (the host asks the *other* ones
    itself); amqtt's own ``_topic_filtering`` dispatches to each of them."""
    async with loopback(plugins={**ALLOW, **RECORD}) as served:
        plugins = served.broker.plugins_manager._topic_plugins
        assert [type(p) for p in plugins] == [amqtt_plugins.Verdicts, amqtt_plugins.Recorder]
        assert plugins == served.broker.plugins_manager.plugins
        client = await served.connected(client_id("dispatch"))
        assert await client.subscribe([("dispatch/#", 1)]) == [1]
        assert ("dispatch/#", Action.SUBSCRIBE) in [call[2:] for call in CALLS if call[0] == "topic_filtering"]
        await client.disconnect()


# -- one connection's way in ---------------------------------------------------------------


class DoorSpy(Broker):
    """Records what reaches ``_client_connected``; with ``refuse`` set, closes it without calling amqtt."""

    refuse = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, ReaderAdapter, WriterAdapter]] = []

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        self.seen.append((listener_name, reader, writer))
        if self.refuse:
            await writer.close()
            return
        await super()._client_connected(listener_name, reader, writer)


class DoorClosed(DoorSpy):
    refuse = True


async def test_external_connected_runs_the_whole_connection_through_client_connected() -> None:
    """``external_connected(reader, writer, name)`` calls ``_client_connected(name, reader, writer)`` with the
    very adapters, and returns only when the client has gone (the host then releases the binding)."""
    async with loopback(DoorSpy) as served:
        cid = client_id("door")
        client = await served.connected(cid)
        [(listener, reader, writer)] = served.broker.seen
        assert listener == "default"
        assert isinstance(reader, StreamReaderAdapter) and isinstance(writer, StreamWriterAdapter)
        assert not served.connections[0].done()
        await client.disconnect()
        await eventually(served.connections[0].done, "external_connected returned")


async def test_a_connection_refused_in_client_connected_never_reaches_amqtt() -> None:
    """The host's refusal of a connection the gate did not admit: nothing of amqtt runs (no CONNECT is read,
    no plugin is asked, no session is made) when ``_client_connected`` does not call up."""
    async with loopback(DoorClosed, plugins=RECORD) as served:
        client = await served.client()
        await client.send(connect_packet(client_id("refused")))
        assert await client.read() is None  # closed, no CONNACK
        assert len(served.broker.seen) == 1
        assert served.broker._sessions == {} and CALLS == []
        await client.close()


async def test_authenticate_gets_the_kept_session_in_a_task_of_the_connections_context() -> None:
    """Auth plugins run in tasks copied from the task that called ``external_connected`` (so the host's
    ``ADMISSION`` context variable reaches iotauth's plugin, per connection), and receive the Session object
    amqtt keeps in ``_sessions`` -- on a persistent resume, the cached one."""
    async with loopback(plugins=RECORD) as served:
        cid = client_id("auth")
        first = await served.connected(cid, clean=False)
        other = await served.connected(client_id("auth-other"))
        auths = [call for call in CALLS if call[0] == "authenticate"]
        assert [call[2] for call in auths] == ["connection-0", "connection-1"]
        session = served.session(cid)
        assert auths[0][1] is session
        await first.disconnect()
        await eventually(lambda: session.transitions.state == "disconnected")
        resumed = await served.connected(cid, clean=False)
        auths = [call for call in CALLS if call[0] == "authenticate"]
        assert auths[-1][1] is session and auths[-1][2] == "connection-2"
        await resumed.disconnect()
        await other.disconnect()


# -- sessions ------------------------------------------------------------------------------


async def test_session_fields_and_attributes_and_the_resume_flag() -> None:
    """``Session.client_id``, ``will_flag`` and ``will_topic`` carry the CONNECT's values; ``attributes`` is a
    dict on the Session object, which a persistent resume re-uses (``parent`` 1: session present) and a clean
    CONNECT replaces (``parent`` 0); ``retained_messages`` is the asyncio queue of its offline messages."""
    async with loopback() as served:
        cid = client_id("fields")
        client = await served.connected(cid, clean=False, will=("wills/fields", b"bye", 1, False))
        session = served.session(cid)
        assert (session.client_id, session.will_flag, session.will_topic, session.parent) == (
            cid, True, "wills/fields", 0)
        assert isinstance(session.attributes, dict) and isinstance(session.retained_messages, asyncio.Queue)
        session.attributes["iotauth.test"] = "kept"
        await client.disconnect()
        await eventually(lambda: session.transitions.state == "disconnected")
        client = await served.client()
        assert await client.connect(cid, clean=False) == (0, True)
        assert served.session(cid) is session
        assert (session.parent, session.will_flag, session.attributes["iotauth.test"]) == (1, False, "kept")
        await client.disconnect()
        await eventually(lambda: session.transitions.state == "disconnected")
        client = await served.client()
        assert await client.connect(cid, clean=True) == (0, False)
        fresh = served.session(cid)
        assert fresh is not session and fresh.parent == 0 and "iotauth.test" not in fresh.attributes
        await client.disconnect()


async def test_sessions_map_client_ids_and_cleanup_session_ends_one_without_its_will() -> None:
    """``_sessions`` maps client id -> (Session, BrokerProtocolHandler), for connected and offline persistent
    sessions; ``_cleanup_session(id)`` closes the live connection and forgets the session, its subscriptions and
    its queue -- and with ``will_flag`` cleared first, no will is published (the host's ``forget``)."""
    async with loopback() as served:
        watcher = await served.connected(client_id("watcher"))
        assert await watcher.subscribe([("wills/#", 0)]) == [0]
        cid = client_id("forgotten")
        victim = await served.connected(cid, clean=False, will=("wills/forgotten", b"last word", 0, False))
        assert await victim.subscribe([("forgotten/#", 1)]) == [1]
        session, handler = served.broker._sessions[cid]
        assert isinstance(session, Session) and isinstance(handler, BrokerProtocolHandler)
        session.will_flag = False
        await served.broker._cleanup_session(cid)
        assert await victim.closed()
        assert cid not in served.broker._sessions
        assert all(s is not session for subs in served.broker._subscriptions.values() for s, _ in subs)
        assert await watcher.messages(0.5) == []
        offline = client_id("offline")
        gone = await served.connected(offline, clean=False)
        await gone.disconnect()
        await eventually(lambda: served.session(offline).transitions.state == "disconnected")
        assert offline in served.broker._sessions  # offline persistent sessions are listed too
        await watcher.disconnect()


# -- subscriptions -------------------------------------------------------------------------


class SubscriptionSpy(Broker):
    """Records the subscription hooks; refuses filters with an ``x`` level in ``add_subscription``."""

    calls: list[tuple[str, Any, Session]]

    def _record(self, name: str, argument: Any, session: Session) -> None:
        self.calls = [*getattr(self, "calls", []), (name, argument, session)]

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        self._record("add", subscription, session)
        if "x" in subscription[0].split("/"):
            return 0x80
        return await super().add_subscription(subscription, session)  # type: ignore[no-any-return]

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        self._record("del", (a_filter, deleted), session)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._record("del_all", None, session)
        await super()._del_all_subscriptions(session)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        self._record("retained", subscription, session)
        await super()._publish_retained_messages_for_subscription(subscription, session)


async def test_add_subscription_is_asked_per_filter_and_its_codes_make_the_suback() -> None:
    """SUBSCRIBE calls ``add_subscription((filter, qos), session)`` once per filter, in order, and the SUBACK
    carries what it returned (``0x80`` refuses); ``_subscriptions`` maps filter -> [(Session, qos)]."""
    async with loopback(SubscriptionSpy) as served:
        cid = client_id("subs")
        client = await served.connected(cid)
        assert await client.subscribe([("s/1", 1), ("s/x", 1), ("s/2", 2)]) == [1, 0x80, 2]
        session = served.session(cid)
        assert [(c[1], c[2]) for c in served.broker.calls if c[0] == "add"] == [
            (("s/1", 1), session), (("s/x", 1), session), (("s/2", 2), session)]
        assert served.broker._subscriptions["s/1"] == [(session, 1)]
        assert "s/x" not in served.broker._subscriptions
        await client.disconnect()


async def test_unsubscribe_and_a_clean_reconnect_go_through_del_subscription_and_del_all_subscriptions() -> None:
    """UNSUBSCRIBE calls ``_del_subscription(filter, session)`` (1 if it was there) and leaves an empty list in
    ``_subscriptions`` (the host's ``prune`` deletes it); a clean CONNECT over a persistent session calls
    ``_del_all_subscriptions(session)`` on the old one."""
    async with loopback(SubscriptionSpy) as served:
        cid = client_id("unsub")
        client = await served.connected(cid, clean=False)
        assert await client.subscribe([("u/1", 1), ("u/2", 1)]) == [1, 1]
        session = served.session(cid)
        await client.unsubscribe(["u/1"])
        assert ("del", ("u/1", 1), session) in served.broker.calls
        assert served.broker._subscriptions["u/1"] == []
        await client.disconnect()
        await eventually(lambda: session.transitions.state == "disconnected")
        client = await served.connected(cid, clean=True)
        assert ("del_all", None, session) in served.broker.calls
        assert all(s is not session for subs in served.broker._subscriptions.values() for s, _ in subs)
        await client.disconnect()


async def test_retained_replay_runs_per_granted_filter_and_on_connect_for_every_clients_filters() -> None:
    """``_publish_retained_messages_for_subscription((filter, qos), session)`` runs after the SUBACK for each
    granted filter -- and, after every CONNACK 0, for *every client's* filters at QoS 0, so stock amqtt sends a
    newcomer the retained messages matching other clients' filters (docs/upstream/retained-acl.patch). The host's
    override serves only the session's own filters, and checks RECEIVE per message."""
    async with loopback(SubscriptionSpy) as served:
        owner = await served.connected(client_id("owner"))
        await owner.publish("private/location", b"secret", qos=1, retain=True)
        wide = await served.connected(cid := client_id("wide"))
        assert await wide.subscribe([("private/#", 1), ("private/x", 1)]) == [1, 0x80]
        assert [c[1] for c in served.broker.calls if c[0] == "retained" and c[2] is served.session(cid)] == [
            ("private/#", 1)]
        assert [(m.topic, m.payload, m.retain) for m in await wide.messages()] == [
            ("private/location", b"secret", True)]
        newcomer = await served.connected(newcomer_id := client_id("newcomer"))
        replayed = [c[1] for c in served.broker.calls if c[0] == "retained" and c[2] is served.session(newcomer_id)]
        assert ("private/#", 0) in replayed
        leaked = await newcomer.messages()
        assert [m.topic for m in leaked] == ["private/location"], "amqtt no longer replays others' filters"
        for client in (owner, wide, newcomer):
            await client.disconnect()


async def test_retained_messages_table_matching_and_handler_publish() -> None:
    """``_retained_messages`` maps topic -> message with ``.topic/.data/.qos`` (an empty retained PUBLISH deletes
    it); ``_matches(topic, filter)`` is MQTT matching with the ``$`` rule; ``_get_handler(session)`` is the
    session's handler, whose ``mqtt_publish(topic, data, qos, retain=True)`` reaches the client."""
    async with loopback() as served:
        cid = client_id("retain")
        client = await served.connected(cid)
        await client.publish("t/a", b"kept", qos=1, retain=True)
        await eventually(lambda: "t/a" in served.broker._retained_messages)
        kept = served.broker._retained_messages["t/a"]
        assert (kept.topic, kept.data, kept.qos) == ("t/a", b"kept", 1)
        await client.publish("t/a", b"", qos=1, retain=True)
        await eventually(lambda: "t/a" not in served.broker._retained_messages)
        matches = served.broker._matches
        cases = [("a/b", "a/+", True), ("a/b", "a/#", True), ("a", "a/#", True), ("a/b/c", "a/+", False),
                 ("a/b", "a/b", True), ("a/b", "a/c", False), ("$SYS/x", "#", False), ("$SYS/x", "+/x", False),
                 ("$SYS/x", "$SYS/#", True), ("a/b", "#", True)]
        assert [(t, f, matches(t, f)) for t, f, _ in cases] == cases
        handler = served.broker._get_handler(served.session(cid))
        assert handler is served.broker._sessions[cid][1]
        await handler.mqtt_publish("t/direct", b"d", 0, retain=True)
        assert [(m.topic, m.payload, m.retain) for m in await client.messages()] == [("t/direct", b"d", True)]
        await client.disconnect()


# -- after CONNACK -------------------------------------------------------------------------


class ResumeSpy(Broker):
    """Holds ``_publish_session_retained_messages`` until the test opens ``gate``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.resumed: list[tuple[Session, int]] = []

    async def _publish_session_retained_messages(self, session: Session) -> None:
        self.resumed.append((session, session.retained_messages.qsize()))
        await self.gate.wait()
        await super()._publish_session_retained_messages(session)


async def test_publish_session_retained_messages_runs_after_connack_before_any_packet_is_handled() -> None:
    """``_publish_session_retained_messages(session)`` is the first call after CONNACK 0 (never after a refusal),
    and nothing the client sends is acted on until it returns -- so the host can re-check a resumed session's
    subscriptions and queue there. ``session.retained_messages`` holds what was queued offline (QoS > 0)."""
    async with loopback(ResumeSpy) as served:
        served.broker.gate.set()
        cid = client_id("resume")
        client = await served.connected(cid, clean=False)
        assert await client.subscribe([("resume/#", 1)]) == [1]
        await client.disconnect()
        session = served.session(cid)
        await eventually(lambda: session.transitions.state == "disconnected")
        publisher = await served.connected(client_id("publisher"))
        await publisher.publish("resume/queued", b"while offline", qos=1)
        await eventually(lambda: session.retained_messages.qsize() == 1)
        queued = session.retained_messages._queue[0]  # peek: the host drains and refills this queue
        assert (queued.topic, queued.data, queued.qos) == ("resume/queued", b"while offline", 1)

        served.broker.gate.clear()
        client = await served.client()
        assert await client.connect(cid, clean=False) == (0, True)  # CONNACK while the hook is held
        assert served.broker.resumed[-1] == (session, 1)
        await client.send(subscribe_packet(2, [("late/x", 1)]))
        with pytest.raises(TimeoutError):
            await client.read(0.5)  # held: no SUBACK, and the queued message waits too
        served.broker.gate.set()
        assert list((await client.expect(SUBACK)).body[2:]) == [1]
        assert [(m.topic, m.payload) for m in await client.messages()] == [("resume/queued", b"while offline")]
        await client.disconnect()
        await publisher.disconnect()


async def test_publish_session_retained_messages_is_not_called_after_a_refused_connect() -> None:
    """A CONNECT refused by authentication gets CONNACK 5 and no ``_publish_session_retained_messages``."""
    async with loopback(ResumeSpy, plugins={f"{PLUGINS}.Verdicts": {"auth": False}}) as served:
        served.broker.gate.set()
        client = await served.client()
        assert (await client.connect(client_id("refused")))[0] == 5
        await client.close()
        await asyncio.sleep(0.2)
        assert served.broker.resumed == []


class WillSpy(Broker):
    """Clears ``will_flag`` in ``_handle_disconnect`` for client ids starting with ``muted-``, like the host does for
    a will its policy or a revocation does not allow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended: list[tuple[Session, bool]] = []

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        self.ended.append((client_session, disconnect_waiter.done()))
        if client_session.client_id.startswith("muted-"):
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


async def test_handle_disconnect_reads_will_flag_when_the_connection_ends() -> None:
    """``_handle_disconnect(session, handler, waiter)`` runs when a connection ends and decides on the will from
    ``session.will_flag`` as it is then: cleared there, no will goes out. A DISCONNECT never sends the will."""
    async with loopback(WillSpy) as served:
        watcher = await served.connected(client_id("watcher"))
        assert await watcher.subscribe([("wills/#", 0)]) == [0]
        loud = await served.connected(loud_id := client_id("will-loud"), will=("wills/loud", b"gone", 0, False))
        muted = await served.connected(client_id("muted"), will=("wills/muted", b"gone", 0, False))
        polite = await served.connected(client_id("will-polite"), will=("wills/polite", b"gone", 0, False))
        await loud.close()  # no DISCONNECT: as if the network failed
        await muted.close()
        await polite.disconnect()
        await eventually(lambda: len(served.broker.ended) == 3)
        assert [m.topic for m in await watcher.messages(0.7)] == ["wills/loud"]
        assert all(done for _, done in served.broker.ended)
        assert any(s.client_id == loud_id for s, _ in served.broker.ended)
        await watcher.disconnect()


class TopicSpy(Broker):
    """Decides every topic check itself: denies topics with a ``denied-<action>`` level for that action."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks: list[tuple[str, str, Action]] = []

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        self.checks.append((session.client_id, topic, action))
        return f"denied-{action.value}" not in topic.split("/")


async def test_topic_filtering_decides_every_subscribe_publish_and_delivery() -> None:
    """``_topic_filtering(session, topic, action)`` is asked for every SUBSCRIBE filter, every PUBLISH and every
    delivery (RECEIVE) with the session concerned, and a ``False`` refuses each -- the host's fast path."""
    async with loopback(TopicSpy, plugins=ALLOW) as served:
        receiver = await served.connected(receiver_id := client_id("receiver"))
        assert await receiver.subscribe([("t/#", 0), ("t/denied-subscribe/#", 0)]) == [0, 0x80]
        sender = await served.connected(sender_id := client_id("sender"))
        for topic in ("t/open", "t/denied-publish", "t/denied-receive"):
            await sender.publish(topic, b"x", qos=1)
        assert [m.topic for m in await receiver.messages()] == ["t/open"]
        checks = served.broker.checks
        assert (receiver_id, "t/denied-subscribe/#", Action.SUBSCRIBE) in checks
        assert (sender_id, "t/denied-publish", Action.PUBLISH) in checks
        assert (receiver_id, "t/denied-receive", Action.RECEIVE) in checks
        assert (receiver_id, "t/denied-publish", Action.RECEIVE) not in checks  # a denied PUBLISH goes nowhere
        await receiver.disconnect()
        await sender.disconnect()

