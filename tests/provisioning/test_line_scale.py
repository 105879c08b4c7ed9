"""Line-scale correctness: several stations on one registry, boards that claim one identity.

Two stations (each with its own registry connection, as on two PCs) drive two
ports each, so four real emulator processes race through the real station.
Every board claims the same MAC-address hardware id under the default id
template. Exactly one may end ACTIVE: the rule is enforced inside the issuing
transaction, which is serialised across connections (SQLite ``BEGIN
IMMEDIATE``, PostgreSQL's advisory lock), so no interleaving lets two through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from iotauth.authority import open_authority
from iotauth.config import Home
from iotauth.provisioning.ids import IdTemplate, TemplateIds
from iotauth.provisioning.session import set_testing
from iotauth.provisioning.station import Station, StationConfig
from iotauth.registry import CertificateStatus, DeviceStatus, Registry, open_registry
from tests.fixtures.devices import FAST_BAUD, FAST_POLICY, EmulatorFactory
from tests.fixtures.postgres import BACKENDS, backend_url
from tests.provisioning.invariants import all_certificates, assert_invariants

MAC = "a4:cf:12:00:be:ef"


@pytest.fixture(params=BACKENDS)
def shared_url(request: pytest.FixtureRequest, home: Home) -> str:
    return backend_url(request, home)


@pytest.fixture
async def registries(shared_url: str) -> AsyncIterator[list[Registry]]:
    """Two registry connections to one database: two stations' view of the shared registry."""
    async with await open_registry(shared_url) as first, await open_registry(shared_url) as second:
        yield [first, second]


async def _station(home: Home, registry: Registry, name: str) -> Station:
    authority = await open_authority(home, registry)
    template = TemplateIds(IdTemplate(authority.settings.id_template))  # the default template
    config = StationConfig(station=name, operator="tester", policy=FAST_POLICY, baudrate=FAST_BAUD)
    return Station(authority, config, template)


async def test_two_stations_four_boards_one_hardware_id_exactly_one_active(
        emulator: EmulatorFactory, home: Home, registries: list[Registry]) -> None:
    set_testing(True)
    try:
        boards = [emulator(hardware_id=MAC) for _ in range(4)]
        stations = [await _station(home, registry, f"station-{n}") for n, registry in enumerate(registries)]
        runs = await asyncio.gather(
            stations[0].provision_all([boards[0].port, boards[1].port]),
            stations[1].provision_all([boards[2].port, boards[3].port]),
        )
        for station in stations:
            await station.close()
    finally:
        set_testing(False)
    results = [r for run in runs for r in run]
    winners = [r for r in results if r.ok]
    assert len(winners) == 1, [(r.port, r.result, r.error) for r in results]
    assert winners[0].device_id == "sensor-a4-cf-12-00-be-ef"  # the default template maps the MAC
    for loser in (r for r in results if not r.ok):
        assert loser.error is not None and ("hardware id" in loser.error or "another board" in loser.error), \
            loser.error

    registry = registries[0]
    [device] = await registry.list_devices()
    assert device.status is DeviceStatus.ACTIVE and device.hardware_id == MAC
    certs = await all_certificates(registry)
    assert [c.status for c in certs].count(CertificateStatus.ACTIVE) == 1
    assert [c for c in certs if c.status is CertificateStatus.PENDING] == []  # losers were refused before issuing
    assert sum(1 for b in boards if b.committed) == 1
    await assert_invariants(registry, boards)


async def test_a_watching_station_revokes_stale_pending_certificates(
        home: Home, registry: Registry, station_factory: Callable[..., Station], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A station left in --watch mode sweeps too; nothing waits for the next provisioning run."""
    from iotauth.authority import open_authority as authority_for
    from iotauth.pki.keys import generate_private_key
    from tests.fixtures.pki import make_csr
    from tests.registry.test_expiry import age_pending

    monkeypatch.setattr("iotauth.provisioning.station.EXPIRY_INTERVAL", 0.05)
    authority = await authority_for(home, registry)
    issued = await authority.issue(make_csr(generate_private_key("p256")), "abandoned", activate=False, actor="st")
    station = station_factory()
    stop = asyncio.Event()
    watching = asyncio.get_running_loop().create_task(station.watch([str(tmp_path / "no-port-*")], stop,
                                                                    poll_interval=0.02))
    try:
        for _ in range(200):  # bounded wait
            if (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED:
                break
            age_pending(home, issued.record.serial)  # aged after the station's start-up sweep window
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await watching
    assert (await registry.get_certificate(issued.record.serial)).status is CertificateStatus.REVOKED
    kinds = [e.kind for e in await registry.events()]
    assert "provisioning.expired" in kinds
