"""docs/upstream/keep-alive.patch: amqtt never disconnects a client that stops talking (MQTT-3.1.2-24).

Stock, against a broker run from a copy of the installed amqtt: a client with a keep-alive of 1 s that
then sends nothing stays connected indefinitely, and its will is never published -- so a device that lost
power is never reported gone, and a later CONNECT with its client id is a take-over instead of a new
connection. Patched: it is disconnected after 1.5 x its keep-alive, as if the network had failed, and
its will goes out; a client that keeps talking stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.fixtures.raw_mqtt import AsyncRawClient
from tests.fixtures.upstream import AmqttProcess

PATCH = "keep-alive"
KEEP_ALIVE = 1  # seconds: the broker must give up after 1.5 s of silence
SILENCE = 4.0  # what the stock broker is watched for: over twice the deadline


async def connected(port: int, client_id: str, **kwargs: object) -> AsyncRawClient:
    client = await AsyncRawClient.open(port)
    assert (await client.connect(client_id, **kwargs))[0] == 0  # type: ignore[arg-type]
    return client


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_a_silent_client_is_disconnected_and_its_will_published(
    amqtt_broker: Callable[..., AmqttProcess], patched: bool
) -> None:
    broker = amqtt_broker(PATCH if patched else None)
    watcher = await connected(broker.port, "watcher")
    assert await watcher.subscribe([("wills/#", 1)]) == [1]
    silent = await connected(broker.port, "silent", keep_alive=KEEP_ALIVE, will=("wills/silent", b"gone", 1, False))

    closed = await silent.closed(timeout=SILENCE)  # the client sends nothing at all meanwhile
    wills = [(m.topic, m.payload) for m in await watcher.messages()]
    if patched:
        assert closed and wills == [("wills/silent", b"gone")]
    else:  # the bug: still connected, no will
        assert not closed and wills == [], "has keep-alive been fixed upstream?"
        assert await silent.ping()  # and it really is still served
    await silent.close()
    await watcher.disconnect()


async def test_a_client_that_keeps_talking_stays_connected(amqtt_broker: Callable[..., AmqttProcess]) -> None:
    """Control for the patch: each packet restarts the deadline; PINGREQ every half keep-alive is enough."""
    broker = amqtt_broker(PATCH)
    talker = await connected(broker.port, "talker", keep_alive=KEEP_ALIVE)
    for _ in range(8):  # 4 s, well past 1.5 s
        await asyncio.sleep(KEEP_ALIVE / 2)
        assert await talker.ping()
    await talker.disconnect()
