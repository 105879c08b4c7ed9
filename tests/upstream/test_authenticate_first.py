"""docs/upstream/authenticate-first.patch: amqtt changes sessions before it authenticates a CONNECT.

Against a broker run from a copy of the installed amqtt, with amqtt's own ``FileAuthPlugin``: stock, a CONNECT
with the victim's client id and a wrong password is refused with CONNACK 5 -- after it has deleted the victim's
session (clean session: the victim's subscription and queued messages are gone, and a live victim is left
connected but deaf) or taken the victim's connection over (persistent session). Patched, nothing changes.

Worse, a persistent CONNECT is authenticated against the *cached* session: with the check of amqtt's own
certificate plugin (``UserAuthCertPlugin``) on amqtt's TLS listener, which asks for client certificates
only optionally, a client with no certificate at all resumes -- and takes over -- a device's session by
naming its client id, because the plugin is shown the device's own connection. Patched, it is refused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from iotauth.config import Home
from tests.fixtures.broker import Pki
from tests.fixtures.pki import TRUST_DOMAIN
from tests.fixtures.raw_mqtt import AsyncRawClient
from tests.fixtures.upstream import AmqttProcess

PATCH = "authenticate-first"
USERS = {"victim": "victim-password", "sender": "sender-password"}
WRONG = "guessed"


def password_file(directory: Path) -> Path:
    hasher = PasswordHash((Argon2Hasher(),))
    path = directory / "passwd"
    path.write_text("".join(f"{user}:{hasher.hash(password)}\n" for user, password in USERS.items()))
    return path


@pytest.fixture
def start(amqtt_broker: Callable[..., AmqttProcess], tmp_path: Path) -> Callable[[bool], AmqttProcess]:
    plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file(tmp_path))}}
    return lambda patched: amqtt_broker(PATCH if patched else None, plugins)


async def login(port: int, user: str, clean: bool = True) -> AsyncRawClient:
    client = await AsyncRawClient.open(port)
    code, _ = await client.connect(user, clean, username=user, password=USERS[user])
    assert code == 0
    return client


async def spoof(port: int, clean: bool) -> int:
    """A CONNECT with the victim's client id and username but a wrong password; its CONNACK code."""
    attacker = await AsyncRawClient.open(port)
    code, _ = await attacker.connect("victim", clean, username="victim", password=WRONG)
    await attacker.close()
    return code


@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_a_refused_clean_session_connect_leaves_the_victims_session(
    start: Callable[[bool], AmqttProcess], patched: bool
) -> None:
    broker = start(patched)
    victim = await login(broker.port, "victim", clean=False)
    assert await victim.subscribe([("victim/inbox", 1)]) == [1]
    await victim.disconnect()
    sender = await login(broker.port, "sender")
    await sender.publish("victim/inbox", b"queued while offline", qos=1)

    assert await spoof(broker.port, clean=True) == 5  # refused either way

    resumed = await AsyncRawClient.open(broker.port)
    code, session_present = await resumed.connect("victim", False, username="victim", password=USERS["victim"])
    assert code == 0
    queued = [m.payload for m in await resumed.messages()]
    await sender.publish("victim/inbox", b"after", qos=1)
    later = [m.payload for m in await resumed.messages()]
    if patched:
        assert session_present and queued == [b"queued while offline"] and later == [b"after"]
    else:  # the bug: the refused CONNECT deleted the session, its subscription and its queued message
        assert (queued, later) == ([], []), "stock amqtt kept the session: has the bug been fixed upstream?"
    await resumed.disconnect()
    await sender.disconnect()


@pytest.mark.parametrize("clean", [True, False], ids=["clean-session", "persistent-session"])
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_a_refused_connect_does_not_take_over_the_victims_connection(
    start: Callable[[bool], AmqttProcess], patched: bool, clean: bool
) -> None:
    broker = start(patched)
    victim = await login(broker.port, "victim", clean=False)
    assert await victim.subscribe([("victim/inbox", 1)]) == [1]

    assert await spoof(broker.port, clean) == 5

    sender = await login(broker.port, "sender")
    await sender.publish("victim/inbox", b"still here", qos=1)
    delivered = [m.payload for m in await victim.messages()]
    if patched:
        assert delivered == [b"still here"] and await victim.ping()
    elif clean:  # the bug: the victim's session was deleted under its live connection, which is now deaf
        assert delivered == [] and await victim.ping(), "has the bug been fixed upstream?"
    else:  # the bug: the refused CONNECT took the victim's connection over
        assert delivered == [] and await victim.closed(), "has the bug been fixed upstream?"
    await sender.disconnect()
    await victim.close()


@pytest.mark.parametrize("online", [True, False], ids=["device-online", "device-offline"])
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
async def test_a_client_without_a_certificate_cannot_resume_a_devices_session(
    amqtt_broker: Callable[..., AmqttProcess], broker_home: Home, pki: Pki, patched: bool, online: bool
) -> None:
    device = await asyncio.to_thread(pki.issue, f"cert-victim-{int(patched)}{int(online)}")
    commands = f"devices/{device.device_id}/commands"
    listener = {"ssl": True, "certfile": str(broker_home.server_cert), "keyfile": str(broker_home.server_key),
                "cafile": str(broker_home.chain_file)}
    plugins = {"tests.fixtures.amqtt_plugins.PeerCertificate": {"uri_domain": TRUST_DOMAIN}}
    broker = amqtt_broker(PATCH if patched else None, plugins, listener)
    with_cert = ssl.create_default_context(cafile=str(device.ca))
    with_cert.load_cert_chain(device.cert, device.key)
    victim = await AsyncRawClient.open(broker.port, tls=with_cert)
    assert await victim.connect(device.device_id, clean=False) == (0, False)
    assert await victim.subscribe([(f"{commands}/#", 1)]) == [1]
    if not online:
        await victim.disconnect()

    impostor = await AsyncRawClient.open(broker.port, tls=ssl.create_default_context(cafile=str(device.ca)))
    code, session_present = await impostor.connect(device.device_id, clean=False)  # no certificate at all
    if patched:
        assert code == 5
        if online:
            assert await victim.ping(), "the refused impostor disturbed the device's connection"
    else:  # the bug: authenticated with the device's certificate, from the device's own (even closed) connection
        assert (code, session_present) == (0, True), "has the bug been fixed upstream?"
        if online:
            assert await victim.closed()  # taken over
        assert await impostor.subscribe([(f"{commands}/#", 1)]) == [1]
    await impostor.close()
    await victim.close()
