"""Real firmware on the line: mbedTLS-made keys and CSRs, and boards whose CSR was refused.

The emulator stays the reference device, but its key and CSR come from the
real mbedTLS 2.28 library (``--keygen-command`` runs the compiled
``firmware_tools/mbedtls/keygen_csr.c``), exactly as a firmware team's board
would make them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from iotauth.config import Home
from iotauth.provisioning.station import Station
from iotauth.registry import CertificateStatus, DeviceStatus, Registry
from tests.fixtures.devices import EmulatorFactory
from tests.provisioning.invariants import assert_invariants

StationFactory = Callable[..., Station]


async def _keyed(registry: Registry, hardware_id: str) -> list[dict[str, object]]:
    return [e.data for e in await registry.events()
            if e.kind == "provisioning.keyed" and e.data.get("hardware_id") == hardware_id]


@pytest.mark.parametrize("kind", ["p256", "p384"])
async def test_an_mbedtls_board_is_provisioned_to_active(emulator: EmulatorFactory, station_factory: StationFactory,
                                                         registry: Registry, home: Home, mbedtls_keygen: Path,
                                                         kind: str) -> None:
    board = emulator(args=["--keygen-command", str(mbedtls_keygen), "--key-types", kind])
    result = await station_factory().provision(board.port)
    assert result.result == "provisioned", result.error
    device = await registry.get_device(f"sensor-{board.hardware_id}")
    assert device.status is DeviceStatus.ACTIVE
    [cert] = await registry.certificates_of(device.device_id)
    assert cert.status is CertificateStatus.ACTIVE
    [keyed] = await _keyed(registry, board.hardware_id)
    assert "NULL parameter" in str(keyed["csr_normalised"]) and keyed["key_type"] == kind
    assert keyed["rejected_csr"] is None
    await assert_invariants(registry, [board])


async def test_a_board_whose_first_csr_was_refused_recovers_on_the_next_run(
        emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry) -> None:
    board = emulator(faults=["badcsr:generate_key"])
    first = await station_factory().provision(board.port)
    assert first.result == "failed"
    assert first.error is not None and "CSR was refused" in first.error and "does not verify" in first.error
    stuck_key = board.public_key_der()
    assert stuck_key is not None and board.read("csr.der") is not None  # the board kept its key and bad CSR
    assert await registry.list_devices() == []  # nothing was issued for it

    second = await station_factory().provision(board.port)  # same firmware: the kept key's CSR is still bad
    assert second.result == "provisioned", second.error
    assert board.public_key_der() != stuck_key  # re-keyed with GENERATE_KEY(REPLACE)
    [keyed] = await _keyed(registry, board.hardware_id)
    assert "does not verify" in str(keyed["rejected_csr"]) and keyed["new_key"] is True
    await assert_invariants(registry, [board])


async def test_force_rekeys_a_board_holding_an_uncertified_key(
        emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry) -> None:
    board = emulator(faults=["badcsr:generate_key"])
    assert not (await station_factory().provision(board.port)).ok
    stuck_key = board.public_key_der()
    forced = await station_factory(force=True).provision(board.port)
    assert forced.result == "provisioned", forced.error
    assert board.public_key_der() != stuck_key
    [keyed] = await _keyed(registry, board.hardware_id)
    assert keyed["rejected_csr"] is None  # --force asked for a new key straight away
