"""The station against real emulator processes on real pseudo-terminals: happy paths and resume."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.authority import Authority
from iotauth.certs import fingerprint
from iotauth.config import Home, load_settings
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.provisioning.results import Step
from iotauth.provisioning.station import Station
from iotauth.registry import CertificateStatus, DeviceStatus, Registry
from tests.fixtures.devices import EmulatorFactory
from tests.fixtures.pki import TRUST_DOMAIN
from tests.fixtures.rabbitmq import enable_rabbitmq
from tests.provisioning.invariants import all_certificates, assert_invariants

StationFactory = Callable[..., Station]


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


async def _check_provisioned(board: object, registry: Registry, home: Home, device_id: str) -> None:
    """The board holds a certificate that chains to the CA, for its own key, and it is active."""
    cert = board.certificate()  # type: ignore[attr-defined]
    assert cert is not None
    anchors, chain = board.trust_anchors(), board.chain()  # type: ignore[attr-defined]
    root = home.root_cert.read_bytes()
    assert [a.public_bytes(serialization.Encoding.PEM) for a in anchors] == [root]
    identity = ClientCertificateVerifier(anchors, chain, TRUST_DOMAIN).verify(cert)
    assert identity.device_id == device_id
    assert _spki(cert.public_key()) == board.public_key_der()  # type: ignore[attr-defined]
    assert board.committed == fingerprint(cert)  # type: ignore[attr-defined]
    credential = await registry.find_credential(fingerprint(cert))
    assert credential is not None and credential.usable
    assert credential.device.hardware_id == board.hardware_id  # type: ignore[attr-defined]
    assert board.config() == {"device_id": device_id, "broker_host": "localhost", "broker_port": 8883}  # type: ignore[attr-defined]


async def test_csr_mode_happy_path(emulator: EmulatorFactory, station_factory: StationFactory,
                                   registry: Registry, home: Home) -> None:
    board = emulator(hardware_id="AA:BB:CC:00:00:01".replace(":", ""))
    station = station_factory()
    result = await station.provision(board.port)
    assert result.result == "provisioned", result.error
    device_id = f"sensor-{board.hardware_id}"
    assert result.device_id == device_id and result.hardware_id == board.hardware_id
    await _check_provisioned(board, registry, home, device_id)
    cert = board.certificate()
    assert cert is not None and isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert result.serial == format(cert.serial_number, "x") and result.fingerprint == fingerprint(cert)
    await assert_invariants(registry, [board])

    events = await registry.events()
    steps = [e for e in events if e.kind.startswith("provisioning.") and e.data.get("hardware_id") == board.hardware_id]
    assert [e.kind for e in steps] == [s.event for s in Step]
    for event in steps:
        assert event.data["station"] == "test-station" and event.data["port"] == board.port
        assert event.actor == "tester" and "elapsed_ms" in event.data
    keyed = next(e for e in steps if e.kind == "provisioning.keyed")
    assert keyed.data["key_source"] == "board" and len(keyed.data["csr_sha256"]) == 64
    issued = next(e for e in steps if e.kind == "provisioning.issued")
    assert issued.data["fingerprint"] == fingerprint(cert)
    # pending until COMMIT: the certificate.activated event comes after provisioning.committed
    kinds = [e.kind for e in events]
    assert kinds.index("certificate.activated") > kinds.index("provisioning.committed")
    assert kinds.index("provisioning.keyed") < kinds.index("certificate.issued")  # the journal stays in order


async def test_openssl_accepts_the_stored_credential(emulator: EmulatorFactory, station_factory: StationFactory,
                                                     tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    board = emulator()
    assert (await station_factory().provision(board.port)).ok
    run = subprocess.run(
        ["openssl", "verify", "-CAfile", str(board.state / "ca.pem"), "-untrusted", str(board.state / "chain.pem"),
         "-purpose", "sslclient", str(board.state / "cert.pem")],
        capture_output=True, text=True, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


async def test_host_key_mode(emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry,
                             home: Home, capsys: pytest.CaptureFixture[str],
                             caplog: pytest.LogCaptureFixture) -> None:
    board = emulator(args=["--no-keygen"])
    station = station_factory(host_keygen=True)
    result = await station.provision(board.port)
    assert result.result == "provisioned", result.error
    device_id = f"sensor-{board.hardware_id}"
    await _check_provisioned(board, registry, home, device_id)
    keyed = [e for e in await registry.events() if e.kind == "provisioning.keyed"]
    assert keyed[0].data["key_source"] == "host"
    issued = [e for e in await registry.events() if e.kind == "certificate.issued"]
    assert issued[0].data["key_source"] == "host"
    await assert_invariants(registry, [board])

    # The key exists on the board and nowhere on the host: not in the registry, home, logs or output.
    der = board.read("key.der")
    assert der is not None
    private = serialization.load_der_private_key(der, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    scalar = private.private_numbers().private_value.to_bytes(32, "big")
    await registry.close()
    for path in home.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert scalar not in data and der not in data, f"private key material found in {path}"
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert scalar.hex() not in text and der.hex() not in text


async def test_csr_mode_refuses_a_device_that_cannot_generate_keys(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    board = emulator(args=["--no-keygen"])
    result = await station_factory().provision(board.port)
    assert result.result == "failed" and result.step is Step.CHECK
    assert "--host-keygen" in (result.error or "")
    assert await all_certificates(registry) == []


async def test_eight_devices_in_parallel(emulator: EmulatorFactory, station_factory: StationFactory,
                                         registry: Registry, home: Home) -> None:
    boards = [emulator() for _ in range(8)]
    station = station_factory()
    results = await station.provision_all([b.port for b in boards])
    assert [r.result for r in results] == ["provisioned"] * 8, [r.error for r in results]
    assert len({r.serial for r in results}) == 8
    for board, result in zip(boards, results, strict=True):
        assert result.port == board.port
        await _check_provisioned(board, registry, home, f"sensor-{board.hardware_id}")
    await assert_invariants(registry, boards)


async def test_rerun_on_a_provisioned_board_confirms_without_issuing(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    board = emulator()
    station = station_factory()
    first = await station.provision(board.port)
    again = await station.provision(board.port)
    assert first.result == "provisioned" and again.result == "already-provisioned"
    assert again.serial == first.serial
    assert len(await all_certificates(registry)) == 1
    proven = [e for e in await registry.events() if e.kind == "provisioning.proven"]
    assert len(proven) == 2 and proven[0].data["nonce"] != proven[1].data["nonce"]


async def test_force_reprovisions_and_revokes_the_old_certificate(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    board = emulator()
    first = await station_factory().provision(board.port)
    assert first.ok
    old_key = board.public_key_der()

    refused = await station_factory().provision(board.port)
    assert refused.result == "already-provisioned"  # no --force: nothing changes

    forced = await station_factory(force=True).provision(board.port)
    assert forced.result == "provisioned", forced.error
    assert forced.serial != first.serial and forced.device_id == first.device_id
    assert board.public_key_der() != old_key
    old = await registry.get_certificate(first.serial or "")
    new = await registry.get_certificate(forced.serial or "")
    assert old.status is CertificateStatus.REVOKED and old.revocation_reason is not None
    assert old.revocation_reason.value == "superseded"
    assert new.status is CertificateStatus.ACTIVE
    assert (await registry.get_device(forced.device_id or "")).status is DeviceStatus.ACTIVE
    assert any(e.kind == "provisioning.erased" for e in await registry.events())
    await assert_invariants(registry, [board])


async def test_committed_board_with_unknown_certificate_needs_force(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry, tmp_path: Path,
) -> None:
    """A board committed by another line (a certificate this registry never issued) is not silently overwritten."""
    board = emulator()
    assert (await station_factory().provision(board.port)).ok
    # Forget the registry: a fresh home that never saw this board.
    from iotauth.bootstrap import initialise_home
    from iotauth.registry import open_registry

    other = Home(tmp_path / "other-home")
    await initialise_home(other, TRUST_DOMAIN, ["localhost"], passphrase=None, actor="test")
    from iotauth.authority import open_authority
    from iotauth.provisioning.ids import IdTemplate, TemplateIds
    from iotauth.provisioning.station import StationConfig
    from tests.fixtures.devices import FAST_POLICY

    async with await open_registry(other.registry_db) as other_registry:
        authority = await open_authority(other, other_registry)
        ids = TemplateIds(IdTemplate("sensor-{hardware_id}"))
        station = Station(authority, StationConfig("s2", "op", policy=FAST_POLICY), ids)
        refused = await station.provision(board.port)
        assert refused.result == "failed" and "--force" in (refused.error or "")
        assert "unknown to this registry" in (refused.error or "")
        forced = await Station(authority, StationConfig("s2", "op", force=True, policy=FAST_POLICY),
                               ids).provision(board.port)
        assert forced.result == "provisioned", forced.error


async def test_pending_ttl_expiry_revokes_and_replaces_the_key(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    """A delivery that never finished is revoked after the TTL; its key is never certified again."""
    board = emulator(faults=["stall:put_cert"])
    station = station_factory()
    stalled = await station.provision(board.port)
    assert stalled.result == "failed"
    pending = await all_certificates(registry)
    assert [c.status for c in pending] == [CertificateStatus.PENDING]
    board.start()  # power cycle

    from dataclasses import replace
    from datetime import timedelta

    expiring = station_factory()
    expiring.settings = replace(expiring.settings, pending_ttl=timedelta(0))
    expired = await expiring.expire_pending()
    assert [c.serial for c in expired] == [pending[0].serial]
    assert (await registry.get_certificate(pending[0].serial)).revocation_reason is not None

    result = await station_factory().provision(board.port)
    assert result.result == "provisioned", result.error
    certs = await all_certificates(registry)
    assert sorted(c.status.value for c in certs) == ["active", "revoked"]
    revoked = next(c for c in certs if c.status is CertificateStatus.REVOKED)
    assert revoked.revocation_reason is not None and revoked.revocation_reason.value == "superseded"
    assert revoked.public_key_sha256 != next(c for c in certs if c.status is CertificateStatus.ACTIVE).public_key_sha256
    assert any(e.kind == "provisioning.expired" for e in await registry.events())
    await assert_invariants(registry, [board])


async def test_hardware_id_bound_to_another_device_is_refused(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    board = emulator()
    assert (await station_factory().provision(board.port)).ok
    board_b = emulator(hardware_id=board.hardware_id + "x")
    # A template that maps a different hardware id onto the same device id.
    clash = await station_factory(template=f"sensor-{board.hardware_id}").provision(board_b.port)
    assert clash.result == "failed" and clash.step is Step.ASSIGN
    assert "already belongs to hardware id" in (clash.error or "")
    renamed = await station_factory(template="renamed-{hardware_id}").provision(board.port)
    assert renamed.result == "failed" and "already bound to device" in (renamed.error or "")
    await assert_invariants(registry, [board, board_b])


async def test_key_type_outside_the_profile_is_refused(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry
) -> None:
    board = emulator(args=["--key-types", "ed25519"])  # the default profile allows p256 and p384 only
    result = await station_factory().provision(board.port)
    assert result.result == "failed" and result.step is Step.CHECK
    assert "no key type" in (result.error or "")
    assert await all_certificates(registry) == []


async def test_p384_when_that_is_all_the_device_offers(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry, home: Home
) -> None:
    board = emulator(args=["--key-types", "p384"])
    result = await station_factory().provision(board.port)
    assert result.result == "provisioned", result.error
    cert = board.certificate()
    assert cert is not None and isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    await _check_provisioned(board, registry, home, f"sensor-{board.hardware_id}")


async def test_small_device_frames_are_chunked(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry, home: Home
) -> None:
    """A device that only takes 64-byte payloads still gets its CSR read and its objects written, in chunks."""
    board = emulator(args=["--max-payload", "64"])
    result = await station_factory().provision(board.port)
    assert result.result == "provisioned", result.error
    await _check_provisioned(board, registry, home, f"sensor-{board.hardware_id}")


async def test_a_rabbitmq_home_refuses_a_dotted_id_before_the_board_holds_anything(
    emulator: EmulatorFactory, station_factory: StationFactory, registry: Registry, home: Home, authority: Authority
) -> None:
    enable_rabbitmq(home)
    authority.settings = load_settings(home)
    board = emulator(hardware_id="AB.12")  # a hardware id may hold '.'; the template passes it into the id
    result = await station_factory().provision(board.port)
    assert not result.ok and result.step is Step.ASSIGN
    assert result.error is not None and "RabbitMQ" in result.error and "sensor-AB.12" in result.error
    assert board.certificate() is None and board.committed is None
    assert await registry.list_devices() == []
