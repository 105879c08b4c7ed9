"""docs/upstream/retained-acl.patch: amqtt replays retained messages without the topic ACL, and for any filter.

Stock, against a broker run from a copy of the installed amqtt:

* on SUBSCRIBE, retained messages are sent without the RECEIVE check that every live message gets, so a
  client allowed a wide filter but not the topics under it reads them anyway (here with a small per-user
  RECEIVE rule, ``tests.fixtures.amqtt_plugins.ReceiveOwnTopics``);
* on every CONNACK, amqtt replays the retained messages matching *every client's* filters to the new
  client, which subscribed to nothing -- here with amqtt's own ``TopicAccessControlListPlugin``, whose
  subscribe ACL the newcomer never even passed.

Patched: retained messages go only to the client's own filters, each checked like a live message.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.fixtures.raw_mqtt import AsyncRawClient
from tests.fixtures.upstream import AmqttProcess

PATCH = "retained-acl"
ANONYMOUS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {}}


async def connected(port: int, client_id: str, clean: bool = True) -> AsyncRawClient:
    client = await AsyncRawClient.open(port)
    code, _ = await client.connect(client_id, clean, username=client_id)
    assert code == 0
    return client


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_retained_replay_checks_receive_like_a_live_message(
    amqtt_broker: Callable[..., AmqttProcess], patched: bool
) -> None:
    plugins = {**ANONYMOUS, "tests.fixtures.amqtt_plugins.ReceiveOwnTopics": {}}
    broker = amqtt_broker(PATCH if patched else None, plugins)
    alice = await connected(broker.port, "alice")
    await alice.publish("users/alice/location", b"alice's secret", qos=1, retain=True)
    mallory = await connected(broker.port, "mallory")
    await mallory.publish("users/mallory/location", b"mallory's own", qos=1, retain=True)

    assert await mallory.subscribe([("users/+/location", 1)]) == [1]  # a wide filter is allowed
    replayed = sorted(m.payload for m in await mallory.messages())
    await alice.publish("users/alice/location", b"live", qos=1)  # control: live messages are checked
    live = [m.payload for m in await mallory.messages()]
    assert live == []
    if patched:
        assert replayed == [b"mallory's own"]
    else:  # the bug: the retained message skipped the RECEIVE check the live one got
        assert replayed == [b"alice's secret", b"mallory's own"], "has the bug been fixed upstream?"
    await alice.disconnect()
    await mallory.disconnect()


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_a_new_client_gets_no_retained_message_for_other_clients_filters(
    amqtt_broker: Callable[..., AmqttProcess], patched: bool
) -> None:
    acl = {"amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
        "acl": {"admin": ["users/#"], "bob": ["users/bob/#"]}}}
    broker = amqtt_broker(PATCH if patched else None, {**ANONYMOUS, **acl})
    admin = await connected(broker.port, "admin")
    assert await admin.subscribe([("users/#", 1)]) == [1]
    alice = await connected(broker.port, "alice")
    await alice.publish("users/alice/location", b"alice's secret", qos=1, retain=True)
    bob = await connected(broker.port, "bob", clean=False)
    assert await bob.subscribe([("users/alice/#", 1)]) == [0x80]  # the ACL: bob may not subscribe there
    newcomer = [m.payload for m in await bob.messages()]
    if patched:
        assert newcomer == []
    else:  # the bug: on CONNACK bob was sent what matched admin's filter
        assert newcomer == [b"alice's secret"], "has the bug been fixed upstream?"

    # What the replay on CONNECT is for still works: a resumed session gets its own filters' retained messages.
    assert await bob.subscribe([("users/bob/#", 1)]) == [1]
    await alice.publish("users/bob/inbox", b"for bob", qos=1, retain=True)
    assert [m.payload for m in await bob.messages()] == [b"for bob"]
    await bob.disconnect()
    bob = await AsyncRawClient.open(broker.port)
    assert await bob.connect("bob", False, username="bob") == (0, True)
    resumed = sorted(m.payload for m in await bob.messages())
    assert (b"for bob" in resumed) and ((b"alice's secret" in resumed) is not patched)
    for client in (admin, alice, bob):
        await client.disconnect()
