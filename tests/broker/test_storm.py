"""Reconnect storms: many devices behind one address come back, and revocation still bites under load.

Functional, not timed: the figures (time to all back against the CPU floor) are in benchmarks/fleet_scale.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Iterator

import pytest

from firmware_tools.backoff import Backoff, Outcome, outcome_of
from iotauth.broker.mqtt import Connect, encode_connect
from tests.fixtures.broker import BrokerProcess, DeviceCreds, Pki, configured_home, iotauth_cli, running_broker
from tests.fixtures.raw_mqtt import publish_packet

LIMITS = """
[broker.limits]
max_pending_per_address = 4
max_waiting_per_address = 8
"""
DEVICES = 60


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki]]:
    with running_broker(configured_home(tmp_path_factory.mktemp("storm"), limits=LIMITS)) as started:
        yield started


async def device(port: int, creds: DeviceCreds, source: str, backoff: Backoff,
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Connect like the reference client: retry with backoff until CONNACK 0; return the refusals it met."""
    context = ssl.create_default_context(cafile=str(creds.ca))
    context.load_cert_chain(creds.cert, creds.key)
    refusals = 0
    while True:
        code: int | None = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                           server_hostname="localhost", local_addr=(source, 0))
            writer.write(encode_connect(Connect(creds.device_id, True, 60)))
            ack = await asyncio.wait_for(reader.readexactly(4), 30)
            code = ack[3]
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            code = None
        if outcome_of(code) is Outcome.CONNECTED:
            return reader, writer, refusals
        refusals += 1
        with contextlib.suppress(Exception):
            writer.close()
        await asyncio.sleep(backoff.delay(outcome_of(code)))


async def test_a_storm_behind_one_address_is_eventually_admitted_and_revocation_still_kicks(
        small_broker: tuple[BrokerProcess, Pki]) -> None:
    broker, pki = small_broker
    fleet = await asyncio.to_thread(lambda: [pki.issue(f"storm-{n}") for n in range(DEVICES)])
    rng = random.Random(5)
    sessions = await asyncio.gather(*(device(broker.port, creds, "127.0.0.9", Backoff(base=0.2, rng=rng))
                                      for creds in fleet))
    assert len(sessions) == DEVICES  # every one got CONNACK 0, all from one address, past a cap of 4 + 8 waiting
    victim_reader = sessions[7][0]
    flood_writer = sessions[0][1]
    for n in range(2000):  # keep the broker busy while the revocation lands
        flood_writer.write(publish_packet(f"devices/storm-0/telemetry/{n % 10}", b"v" * 32))
    result = await asyncio.to_thread(iotauth_cli, broker.home, "revoke", "storm-7")
    assert result.returncode == 0
    assert await asyncio.wait_for(victim_reader.read(), 15) == b""  # kicked: EOF
    still = sessions[8][0]
    sessions[8][1].write(b"\xc0\x00")  # PINGREQ: the others are still served
    assert await asyncio.wait_for(still.readexactly(2), 15) == b"\xd0\x00"
    for _, writer, _ in sessions:
        writer.close()
