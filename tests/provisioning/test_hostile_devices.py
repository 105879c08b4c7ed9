"""The station against devices that lie, clone, spew garbage or inject text: it must fail safe.

Each test plays a device over a real pty (``scripted_device``), often the
emulator's own device logic with one answer tampered with, and checks that
nothing becomes active, nothing unsafe reaches the registry, and the failure
reason is printable.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from firmware_tools.emulator import Device, Flash, Identity, Options
from iotauth.provisioning.messages import (
    Capability,
    Commit,
    Csr,
    DeviceState,
    Error,
    ErrorCode,
    GenerateKey,
    Hashes,
    Info,
    KeyType,
    KeyTypes,
    Message,
    Prove,
    Signature,
)
from iotauth.provisioning.objects import generate_key, sign_proof
from iotauth.provisioning.results import Step
from iotauth.provisioning.station import Station
from iotauth.registry import CertificateStatus, Registry
from tests.fixtures.devices import EmulatorFactory, ScriptedDevice
from tests.provisioning.invariants import all_certificates, assert_invariants

StationFactory = Callable[..., Station]
ScriptedFactory = Callable[..., ScriptedDevice]


def _board(tmp_path: Path, hardware_id: str = "EVIL-0001") -> Device:
    return Device(Flash(tmp_path / "evil-flash"), Identity(hardware_id, "evil", "6.6.6"), Options())


class _View:
    """An in-process board seen the way the invariant check sees an emulator's flash."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.hardware_id = device.identity.hardware_id

    @property
    def committed(self) -> str | None:
        mark = self.device.committed()
        return mark.hex() if mark else None

    def certificate(self) -> x509.Certificate | None:
        leaf = self.device.leaf()
        return x509.load_der_x509_certificate(leaf) if leaf else None


def _no_control(text: str | None) -> bool:
    return text is not None and all(ch.isprintable() for ch in text)


@pytest.mark.parametrize("hardware_id", [
    "../../etc/passwd", "a/b", "sensor#1", "dev+1", "$SYS", "café", "with space", "nul\x00byte", "-leading",
    "x" * 65, "", "\x1b[31mred", "ｆｕｌｌｗｉｄｔｈ",
])
async def test_hostile_hardware_ids_never_reach_the_registry(
    hardware_id: str, tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory,
    registry: Registry,
) -> None:
    board = _board(tmp_path)
    info = Info(1, 1024, Capability.KEYGEN, KeyTypes.P256, DeviceState(0), hardware_id, "m", "f")
    device = scripted_device(lambda m: info if m.TYPE.name == "HELLO" else board.handle(m))
    result = await station_factory().provision(device.port)
    assert result.result == "failed" and result.step is Step.IDENTIFY
    assert result.hardware_id is None and result.device_id is None
    assert _no_control(result.error)
    assert await registry.list_devices() == []
    assert [type(r).__name__ for r in device.requests] == ["Hello"]


async def test_csr_for_another_key_than_reported_is_refused(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    board = _board(tmp_path)
    board.handle(GenerateKey(KeyType.P256))  # the board now holds key A and reports it in INFO
    other = generate_key(KeyType.P256)
    forged = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(other, hashes.SHA256())  # type: ignore[arg-type]
    der = forged.public_bytes(serialization.Encoding.DER)

    def handler(message: Message) -> Message | None:
        if isinstance(message, GenerateKey):
            return Csr(len(der), 0, der)
        return board.handle(message)

    result = await station_factory().provision(scripted_device(handler).port)
    assert result.result == "failed" and result.step is Step.KEY
    assert "not the key the device reported" in (result.error or "")
    assert await all_certificates(registry) == []


async def test_csr_with_a_broken_signature_is_refused(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    board = _board(tmp_path)

    def handler(message: Message) -> Message | None:
        reply = board.handle(message)
        if isinstance(reply, Csr):
            data = bytearray(reply.data)
            data[-3] ^= 0x01  # inside the signature
            return Csr(reply.total, reply.offset, bytes(data))
        return reply

    result = await station_factory().provision(scripted_device(handler).port)
    assert result.result == "failed" and result.step is Step.KEY
    assert await all_certificates(registry) == []


async def test_device_that_does_not_hold_the_key_fails_prove_and_never_commits(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    board = _board(tmp_path)
    impostor = generate_key(KeyType.P256)

    def handler(message: Message) -> Message | None:
        if isinstance(message, Prove):
            return Signature(*sign_proof(impostor, message.nonce))
        return board.handle(message)

    device = scripted_device(handler)
    result = await station_factory().provision(device.port)
    assert result.result == "failed" and result.step is Step.PROVE
    assert not any(isinstance(r, Commit) for r in device.requests)
    certs = await all_certificates(registry)
    assert [c.status for c in certs] == [CertificateStatus.PENDING]  # issued, never activated


async def test_replayed_signature_for_an_old_nonce_fails(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    """A device (or a man in the middle) replaying the first PROVE answer cannot pass a second PROVE."""
    board = _board(tmp_path)
    recorded: list[Message] = []

    def handler(message: Message) -> Message | None:
        reply = board.handle(message)
        if isinstance(message, Prove):
            if recorded:
                return recorded[0]
            recorded.append(reply)
        return reply

    device = scripted_device(handler)
    assert (await station_factory().provision(device.port)).ok
    again = await station_factory().provision(device.port)
    assert again.result == "failed" and again.step is Step.PROVE


async def test_read_back_mismatch_stops_before_commit(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    board = _board(tmp_path)

    def handler(message: Message) -> Message | None:
        reply = board.handle(message)
        if isinstance(reply, Hashes):
            return Hashes(reply.state, reply.key, bytes(32), reply.chain, reply.config)
        return reply

    device = scripted_device(handler)
    result = await station_factory().provision(device.port)
    assert result.result == "failed" and result.step is Step.VERIFY and "cert" in (result.error or "")
    assert not any(isinstance(r, Commit) for r in device.requests)


@pytest.mark.parametrize("garbage", [
    b"\x00" * 10 + b"\xff" * 3000,  # a runaway frame with no delimiter
    bytes(range(1, 256)) * 8 + b"\x00",  # one huge delimited blob
    b"\x03\x01\x00",  # a short broken frame
])
async def test_garbage_spewing_device_fails_cleanly(
    garbage: bytes, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    device = scripted_device(lambda message: garbage)
    result = await station_factory().provision(device.port)
    assert result.result == "failed" and result.step is Step.IDENTIFY
    assert "attempts" in (result.error or "")
    assert len(device.requests) >= 2  # it retransmitted, then gave up
    assert await registry.list_devices() == []


async def test_device_error_text_is_sanitised(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory,
) -> None:
    board = _board(tmp_path)

    def handler(message: Message) -> Message | None:
        if isinstance(message, GenerateKey):
            return Error(0x06, 0, "\x1b]8;;http://evil\x07click\x1b[2J\r\nforged: OK")
        return board.handle(message)

    result = await station_factory().provision(scripted_device(handler).port)
    assert result.result == "failed" and result.step is Step.KEY
    assert _no_control(result.error) and "BAD_STATE" in (result.error or "")


@pytest.mark.parametrize("claims_the_key", [True, False], ids=["claims-key-and-cert", "claims-cert-only"])
async def test_board_claiming_another_devices_certificate(
    claims_the_key: bool, emulator: EmulatorFactory, tmp_path: Path, scripted_device: ScriptedFactory,
    station_factory: StationFactory, registry: Registry,
) -> None:
    """A board that says it is committed with device A's certificate must never touch device A."""
    honest = emulator()
    first = await station_factory().provision(honest.port)
    assert first.ok and first.fingerprint is not None
    liar = _board(tmp_path, "LIAR-0001")
    liar.handle(GenerateKey(KeyType.P256))
    own = liar.info()

    def handler(message: Message) -> Message | None:
        if message.TYPE.name != "HELLO" or liar.state() & DeviceState.COMMITTED:
            return liar.handle(message)
        key = (honest.public_key_der() or b"") if claims_the_key else own.public_key
        return Info(own.protocol_version, own.max_payload, own.capabilities, own.key_types,
                    DeviceState.COMMITTED | DeviceState.HAS_KEY | DeviceState.HAS_CERT, own.hardware_id, own.model,
                    own.firmware, key, bytes.fromhex(first.fingerprint or ""))

    device = scripted_device(handler)
    refused = await station_factory().provision(device.port)
    assert refused.result == "failed"
    assert ("duplicate public key" if claims_the_key else "--force") in (refused.error or "")
    forced = await station_factory(force=True).provision(device.port)
    if claims_the_key:
        assert forced.result == "failed"  # the key belongs to device A: refused even with --force
    else:
        assert forced.result == "provisioned", forced.error  # --force re-provisions the board as itself
        assert forced.device_id == "sensor-LIAR-0001"
    record = await registry.get_certificate(first.serial or "")
    assert record.status is CertificateStatus.ACTIVE  # device A untouched either way
    assert (await registry.get_device(first.device_id or "")).status.value == "active"
    await assert_invariants(registry, [honest, _View(liar)])  # type: ignore[list-item]


async def test_cloned_key_is_refused(emulator: EmulatorFactory, station_factory: StationFactory,
                                     registry: Registry) -> None:
    """Two boards with one key (cloned flash, broken RNG): the second is refused as a duplicate key."""
    original = emulator()
    assert (await station_factory().provision(original.port)).ok
    clone = emulator(start=False)
    clone.state.mkdir(parents=True)
    for name in ("key.der", "csr.der"):
        shutil.copy(original.state / name, clone.state / name)
    clone.start()
    result = await station_factory().provision(clone.port)
    assert result.result == "failed" and result.step is Step.CHECK
    assert "duplicate public key" in (result.error or "")
    assert len(await all_certificates(registry)) == 1


async def test_an_rsa_csr_where_p256_was_asked_for_is_refused_with_what_was_wrong(
    tmp_path: Path, scripted_device: ScriptedFactory, station_factory: StationFactory, registry: Registry,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    board = _board(tmp_path)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256()) \
        .public_bytes(serialization.Encoding.DER)

    def handler(message: Message) -> Message | None:
        if isinstance(message, GenerateKey):
            return Csr(len(der), message.offset, der[message.offset: message.offset + 1000])
        return board.handle(message)

    result = await station_factory().provision(scripted_device(handler).port)
    assert result.result == "failed" and result.step is Step.KEY
    assert "CSR was refused: the CSR's key is RSAPublicKey, but the station asked for p256" in (result.error or "")
    assert await all_certificates(registry) == []


async def test_oversize_with_the_requests_seq_is_final_not_a_retransmit_loop(
    scripted_device: ScriptedFactory, station_factory: StationFactory,
) -> None:
    """PROTOCOL.md section 2: only an unsolicited (seq 0) OVERSIZE means 'could not read it, send it again'."""
    device = scripted_device(lambda message: Error(ErrorCode.OVERSIZE, 0, "payload above max_payload"))
    result = await station_factory().provision(device.port)
    assert result.result == "failed" and "OVERSIZE" in (result.error or "")
    assert [type(r).__name__ for r in device.requests] == ["Hello"]  # refused once, never retransmitted
