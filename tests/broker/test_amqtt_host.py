"""The amqtt host's own parts: flow control in its adapters, refusals before amqtt's code, plugin failures, shutdown.

The security model on this host is tested by the shared attack tests (``test_connect``, ``test_sessions``,
``test_revocation`` run on both engines) and amqtt's side of each assumption by ``test_amqtt_contract``.
Here the broker runs in the test's event loop (``IotAuthBroker`` with the gate on loopback, real TLS,
real devices in threads), so the tests can look at what the host holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from amqtt.adapters import StreamReaderAdapter, WriterAdapter
from amqtt.errors import BrokerError

from iotauth.broker import amqtt_host
from iotauth.broker.amqtt_host import (
    ADMISSION,
    READ_LIMIT,
    AmqttHost,
    IotAuthBroker,
    LinkWriter,
    _Feed,
    broker_config,
)
from iotauth.broker.binding import Binding
from iotauth.broker.mqtt import Connect, encode_connect
from iotauth.broker.tls import Receiver
from iotauth.config import Home
from tests.fixtures.amqtt_plugins import CALLS
from tests.fixtures.broker import Device, Pki, connect
from tests.fixtures.raw_mqtt import RawClient, connect_packet

PLUGINS = "tests.fixtures.amqtt_plugins"


@contextlib.asynccontextmanager
async def running(home: Home, **plugins: dict[str, Any]) -> AsyncIterator[IotAuthBroker]:
    """An ``IotAuthBroker`` on the home, its gate on a loopback port; extra amqtt plugins beside iotauth's."""
    config = broker_config(home=str(home.root), bind="127.0.0.1:0", watch_config=0)
    config["plugins"].update(plugins)
    broker = IotAuthBroker(config)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.shutdown()


def port_of(broker: IotAuthBroker) -> int:
    return broker.addresses["mqtts"][1]


async def until(predicate: Any, timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.01)
    return value


class StubLink:
    """A gate link reduced to what the adapters use: a write limit that the test opens and closes."""

    peer = "127.0.0.1:50000"
    receiver: Receiver | None = None

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.open_for_writes = True
        self.paused = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writable(self) -> bool:
        return self.open_for_writes and not self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_limit(self, high: int) -> None:
        pass


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- flow control --------------------------------------------------------------------------


async def test_drain_waits_while_the_link_is_over_its_write_limit() -> None:
    """amqtt awaits ``drain()`` after every packet, as with a StreamWriter: a client that does not read makes
    amqtt wait (holding its own queue), instead of the broker piling bytes into the socket buffer."""
    link = StubLink()
    feed = _Feed(asyncio.StreamReader())
    writer = LinkWriter(link, feed)
    writer.write(b"packet")
    await asyncio.wait_for(writer.drain(), 1.0)  # writable: returns at once
    link.open_for_writes = False
    blocked = asyncio.ensure_future(writer.drain())
    await settle()
    assert not blocked.done(), "drain returned while the link was over its write limit"
    link.open_for_writes = True
    feed.resume_writing()  # what the TLS link calls when its transport drains
    await asyncio.wait_for(blocked, 1.0)

    link.open_for_writes = False
    blocked = asyncio.ensure_future(writer.drain())
    await settle()
    assert not blocked.done()
    feed.connection_lost(None)  # the client is gone: nothing to wait for
    await asyncio.wait_for(blocked, 1.0)
    await asyncio.wait_for(writer.drain(), 1.0)


class SlowBroker:
    """Stands in for amqtt in :class:`AmqttHost`: it takes the connection and never reads."""

    listener = "default"

    def __init__(self) -> None:
        self.guard = self
        self.released: list[Binding] = []

    async def external_connected(self, *_: object) -> None:
        await asyncio.Event().wait()

    def release(self, binding: Binding) -> None:
        self.released.append(binding)


async def test_a_client_that_sends_faster_than_amqtt_reads_is_paused() -> None:
    """The host's StreamReader pauses the link beyond twice READ_LIMIT unread bytes and resumes it as amqtt
    reads: a flooding client cannot fill the broker's memory through the amqtt host."""
    link, broker = StubLink(), SlowBroker()
    host = AmqttHost(broker)  # type: ignore[arg-type]
    feed = host.accept(link, None, Connect("flood", True, 30))  # type: ignore[arg-type]
    for _ in range(3):
        feed.data_received(b"\x30" * READ_LIMIT)
    assert link.paused, "the link was not paused with 3 x READ_LIMIT bytes unread"
    await feed.reader.readexactly(2 * READ_LIMIT)
    assert not link.paused
    await host.close(grace=0.1)  # amqtt never finishes: the host cancels it, releases the binding, closes the link
    assert not host.tasks and broker.released == [None] and link.closed


# -- refusals before amqtt's code ----------------------------------------------------------


class CaptureWriter(WriterAdapter):
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        pass

    def get_peer_info(self) -> tuple[str, int]:
        return "127.0.0.1", 50001

    def get_ssl_info(self) -> None:
        return None

    async def close(self) -> None:
        pass


async def test_an_admission_revoked_before_amqtt_runs_changes_no_session(broker_home: Home, pki: Pki) -> None:
    """amqtt deletes a client id's session *before* it authenticates a clean-session CONNECT; a connection whose
    certificate was revoked between admission and amqtt (here: one of the device's two certificates) must not
    reach that code and delete the session the device's other certificate holds."""
    old, new = await asyncio.to_thread(pki.issue, "host-rotating"), await asyncio.to_thread(pki.issue, "host-rotating")
    async with running(broker_home) as broker:
        device = await asyncio.to_thread(lambda: Device(port_of(broker), new, clean_session=False).connect())
        await asyncio.to_thread(device.subscribe, "devices/host-rotating/commands/#")
        await asyncio.to_thread(device.close)
        [current] = await until(lambda: list(broker.bound("host-rotating")))
        await until(lambda: not current.connected)

        admission = dataclasses.replace(current.admission, fingerprint=old.fingerprint, serial=old.serial,
                                        clean_session=True)
        late = Binding(admission, current.policy, current.generation, lambda: None)
        late.revoke("certificate-revoked")
        reader = asyncio.StreamReader()
        reader.feed_data(encode_connect(Connect("host-rotating", True, 30)))
        reader.feed_eof()
        writer = CaptureWriter()
        context = ADMISSION.set(late)
        try:
            await broker.external_connected(StreamReaderAdapter(reader), writer, broker.listener)
        finally:
            ADMISSION.reset(context)
        assert writer.written == b"", "amqtt answered a connection revoked before it ran"
        assert broker._sessions["host-rotating"][0] is current.session, "the other certificate's session was deleted"
        resumed = await asyncio.to_thread(lambda: Device(port_of(broker), new, clean_session=False).connect())
        assert resumed.session_present
        await asyncio.to_thread(resumed.close)


async def test_a_failing_operator_plugin_denies_only_its_own_check(broker_home: Home, pki: Pki) -> None:
    """An operator's topic plugin that raises denies that check (logged), as ``None`` would; it does not abort
    the delivery of the message to every other subscriber (which amqtt's own dispatch would)."""
    creds = [await asyncio.to_thread(pki.issue, name, profile) for name, profile in (
        ("host-buggy", "ingest"), ("host-fine", "ingest"), ("host-sensor", "default"))]
    plugin = {f"{PLUGINS}.FailsFor": {"client_id": "host-buggy"}}
    async with running(broker_home, **plugin) as broker:
        port = port_of(broker)
        buggy, fine, sensor = [await asyncio.to_thread(connect, port, c) for c in creds]
        try:
            assert await asyncio.to_thread(buggy.subscribe, "devices/+/state") == [1]  # first in amqtt's list
            assert await asyncio.to_thread(fine.subscribe, "devices/+/state") == [1]
            await asyncio.to_thread(sensor.publish, "devices/host-sensor/state", b"up")
            got = await asyncio.to_thread(fine.receive)
            assert (got.topic, got.payload) == ("devices/host-sensor/state", b"up")
            assert await asyncio.to_thread(buggy.receive_all, 0.5) == []
        finally:
            for device in (buggy, fine, sensor):
                await asyncio.to_thread(device.close)


# -- shutdown ------------------------------------------------------------------------------


async def test_shutdown_lets_no_connection_outlive_the_broker(broker_home: Home, pki: Pki,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``shutdown()`` every connection amqtt ran has ended -- also one stuck in an operator's plugin, which
    amqtt's own shutdown does not know about: none touches the guard or the registry after they closed."""
    monkeypatch.setattr(amqtt_host, "CLOSE_GRACE", 0.3)
    creds = [await asyncio.to_thread(pki.issue, f"host-shutdown-{n}") for n in range(3)]
    stuck = await asyncio.to_thread(pki.issue, "host-shutdown-stuck")
    CALLS.clear()
    async with running(broker_home, **{f"{PLUGINS}.HangsFor": {"client_id": "host-shutdown-stuck"}}) as broker:
        devices = [await asyncio.to_thread(connect, port_of(broker), c) for c in creds]
        raw = await asyncio.to_thread(RawClient, port_of(broker), stuck)
        await asyncio.to_thread(raw.send, connect_packet("host-shutdown-stuck"))
        await until(lambda: ("hanging", "host-shutdown-stuck") in CALLS)
        assert broker.host is not None
        tasks = set(broker.host.tasks)
        assert len(tasks) == 4
    assert all(task.done() for task in tasks), "connection tasks still running after shutdown"
    for device in devices:
        await asyncio.to_thread(device.close)
    raw.close()


async def test_an_external_listener_without_bind_is_refused_at_construction() -> None:
    """amqtt 0.12 would not serve it (every connection would fail later); say so at once."""
    config = broker_config(home="/nonexistent")
    config["listeners"]["default"]["bind"] = None
    with pytest.raises(BrokerError, match="bind: null"):
        IotAuthBroker(config)
