"""Every fault the emulator can inject, at every step, with the invariants checked after each.

A fault fires once. Faults the protocol absorbs (a corrupted or lost reply, a
NAK, a reboot) must not fail the run; faults that take the board away (a
disconnect, a hang) fail it with a reason, and after a power cycle the next
run resumes to success without issuing a second certificate.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from iotauth.provisioning.station import Station
from iotauth.registry import CertificateStatus, Registry
from tests.fixtures.devices import EmulatorFactory
from tests.provisioning.invariants import all_certificates, assert_invariants

KINDS = ("corrupt", "drop", "nak", "reboot", "stall", "disconnect")
CSR_STEPS = ("hello", "generate_key", "put_cert", "put_cert:2", "put_config", "read_back", "prove", "commit")
HOST_STEPS = ("put_key",)
FATAL = {"stall", "disconnect"}

CASES = [(kind, step, False) for step in CSR_STEPS for kind in KINDS] + [
    (kind, step, True) for step in HOST_STEPS for kind in KINDS
]


@pytest.mark.parametrize(("kind", "step", "host_keygen"), CASES,
                         ids=[f"{k}-{s.replace(':', '#')}{'-hostkey' if h else ''}" for k, s, h in CASES])
async def test_fault_then_resume(kind: str, step: str, host_keygen: bool, emulator: EmulatorFactory,
                                 station_factory: Callable[..., Station], registry: Registry) -> None:
    args = ["--no-keygen"] if host_keygen else []
    board = emulator(args=args, faults=[f"{kind}:{step}"])
    station = station_factory(host_keygen=host_keygen)

    first = await station.provision(board.port)
    if kind in FATAL:
        assert first.result == "failed", "the board vanished or hung: the run must fail, not hang or pass"
        assert first.error
        if kind == "disconnect":
            assert board.wait_exit() == 3
            assert "disconnect" in first.error
        else:
            assert "attempts" in first.error or "time" in first.error
    else:
        assert first.result == "provisioned", first.error
    await assert_invariants(registry, [board])
    if first.result == "failed":
        # Nothing the board has not committed to may be active.
        assert all(c.status is not CertificateStatus.ACTIVE for c in await all_certificates(registry))

    if not board.running or kind == "stall":
        board.start()  # power cycle into healthy firmware, same flash
    second = await station.provision(board.port)
    assert second.ok, second.error
    assert second.result == ("already-provisioned" if first.ok else "provisioned")
    await assert_invariants(registry, [board])

    certs = await all_certificates(registry)
    assert len(certs) == 1, "resuming must not issue a second certificate"
    assert certs[0].status is CertificateStatus.ACTIVE
    assert board.committed == certs[0].fingerprint


@pytest.mark.parametrize("kind", KINDS)
async def test_fault_during_forced_erase(kind: str, emulator: EmulatorFactory,
                                         station_factory: Callable[..., Station], registry: Registry) -> None:
    """Re-provisioning with --force: the old certificate is revoked before ERASE, whatever ERASE then does."""
    board = emulator()
    original = await station_factory().provision(board.port)
    assert original.ok
    board.start("--fault", f"{kind}:erase")  # the same board, now with misbehaving firmware

    forced = await station_factory(force=True).provision(board.port)
    assert forced.result == ("failed" if kind in FATAL else "provisioned"), forced.error
    await assert_invariants(registry, [board])
    old = await registry.get_certificate(original.serial or "")
    assert old.status is CertificateStatus.REVOKED

    if not board.running or kind == "stall":
        board.start()
    again = await station_factory(force=not forced.ok).provision(board.port)
    assert again.result == ("provisioned" if not forced.ok else "already-provisioned"), again.error
    await assert_invariants(registry, [board])
    active = [c for c in await all_certificates(registry) if c.status is CertificateStatus.ACTIVE]
    assert len(active) == 1 and active[0].serial != original.serial and board.committed == active[0].fingerprint
