"""The emulator's device logic follows PROTOCOL.md's state machine; its retransmit cache works over a real pty."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_tools.emulator import Device, Flash, Identity, Options, parse_fault
from iotauth.provisioning.codec import Deframer, Frame
from iotauth.provisioning.messages import (
    CertAck,
    Commit,
    Committed,
    ConfigAck,
    Csr,
    DeviceState,
    Erase,
    Erased,
    Error,
    ErrorCode,
    GenerateKey,
    Hello,
    Info,
    KeyType,
    Message,
    Prove,
    PutCert,
    PutConfig,
    ReadBack,
    Signature,
    parse_message,
)
from iotauth.provisioning.objects import (
    DeviceConfig,
    encode_cert_bundle,
    generate_key,
    sha256,
    spki_der,
    verify_proof,
)
from tests.fixtures.pki import forge_certificate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(Flash(tmp_path / "flash"), Identity("UNIT-1", "unit", "0"), Options())


def _error(reply: Message) -> ErrorCode:
    assert isinstance(reply, Error), reply
    return ErrorCode(reply.code)


def _provision(device: Device) -> bytes:
    csr_reply = device.handle(GenerateKey(KeyType.P256))
    assert isinstance(csr_reply, Csr)
    csr = x509.load_der_x509_csr(csr_reply.data)
    key = device.key()
    assert key is not None
    cert = forge_certificate(csr.public_key(), key, x509.Name([]), common_name="unit")  # type: ignore[arg-type]
    leaf = cert.public_bytes(serialization.Encoding.DER)
    bundle = encode_cert_bundle([leaf])
    assert isinstance(device.handle(PutCert(len(bundle), 0, bundle)), CertAck)
    config = DeviceConfig("unit", "broker", 8883, (leaf,)).encode()
    assert isinstance(device.handle(PutConfig(len(config), 0, config)), ConfigAck)
    reply = device.handle(Commit(sha256(leaf)))
    assert isinstance(reply, Committed)
    return sha256(leaf)


def test_generate_key_keeps_the_key_unless_replace(device: Device) -> None:
    first = device.handle(GenerateKey(KeyType.P256))
    again = device.handle(GenerateKey(KeyType.P256))
    assert isinstance(first, Csr) and first == again  # same stored CSR: no second key
    replaced = device.handle(GenerateKey(KeyType.P256, replace=True))
    assert isinstance(replaced, Csr) and replaced.data != first.data
    assert _error(device.handle(GenerateKey(KeyType.P384))) is ErrorCode.BAD_STATE
    assert _error(device.handle(GenerateKey(KeyType.ED25519))) is ErrorCode.UNSUPPORTED


def test_chunked_upload_rules(device: Device) -> None:
    device.handle(GenerateKey(KeyType.P256))
    assert _error(device.handle(PutCert(100, 50, b"x" * 10))) is ErrorCode.BAD_OFFSET
    ack = device.handle(PutCert(100, 0, b"x" * 40))
    assert isinstance(ack, CertAck) and (ack.received, ack.complete) == (40, False)
    duplicate = device.handle(PutCert(100, 0, b"x" * 40))
    assert isinstance(duplicate, CertAck) and duplicate.received == 40
    skipped = device.handle(PutCert(100, 60, b"x" * 10))
    assert _error(skipped) is ErrorCode.BAD_OFFSET and isinstance(skipped, Error) and skipped.arg == 40
    assert _error(device.handle(PutCert(100, 40, b"x" * 60))) is ErrorCode.BAD_PAYLOAD  # not a bundle
    assert _error(device.handle(PutCert(9000, 0, b"x"))) is ErrorCode.TOO_LARGE


def test_certificate_for_another_key_is_refused(device: Device) -> None:
    device.handle(GenerateKey(KeyType.P256))
    stranger = forge_certificate(generate_key(KeyType.P256).public_key(), generate_key(KeyType.P256),
                                 x509.Name([]), common_name="x")  # type: ignore[arg-type]
    bundle = encode_cert_bundle([stranger.public_bytes(serialization.Encoding.DER)])
    assert _error(device.handle(PutCert(len(bundle), 0, bundle))) is ErrorCode.KEY_MISMATCH
    assert device.cert_object() is None


def test_commit_locks_until_erase(device: Device) -> None:
    fingerprint = _provision(device)
    assert DeviceState.COMMITTED in device.info().state
    assert isinstance(device.handle(Commit(fingerprint)), Committed)  # idempotent
    assert _error(device.handle(Commit(bytes(32)))) is ErrorCode.LOCKED
    for request in (GenerateKey(KeyType.P256), PutCert(1, 0, b"x"), PutConfig(1, 0, b"x")):
        assert _error(device.handle(request)) is ErrorCode.LOCKED
    proof = device.handle(Prove(bytes(32)))
    key = device.key()
    assert isinstance(proof, Signature) and key is not None
    assert verify_proof(key.public_key(), proof.algorithm, proof.signature, bytes(32))  # type: ignore[arg-type]
    assert _error(device.handle(Erase("SOMEONE-ELSE"))) is ErrorCode.CONFIRM_MISMATCH
    assert isinstance(device.handle(Erase("UNIT-1")), Erased)
    info = device.info()
    assert info.state == DeviceState(0) and info.public_key == b"" and info.cert_fingerprint == b""
    assert info.hardware_id == "UNIT-1"


def test_commit_needs_everything_and_the_right_fingerprint(device: Device) -> None:
    assert _error(device.handle(Commit(bytes(32)))) is ErrorCode.BAD_STATE
    assert _error(device.handle(Prove(bytes(32)))) is ErrorCode.BAD_STATE


def test_read_back_hashes(device: Device) -> None:
    fingerprint = _provision(device)
    hashes = device.handle(ReadBack())
    key = device.key()
    assert key is not None and not isinstance(hashes, Error)
    assert hashes.cert == fingerprint  # type: ignore[attr-defined]
    assert hashes.key == sha256(spki_der(key.public_key()))  # type: ignore[attr-defined]


def test_flash_survives_a_restart(tmp_path: Path) -> None:
    first = Device(Flash(tmp_path / "f"), Identity("R-1", "m", "f"), Options())
    fingerprint = _provision(first)
    second = Device(Flash(tmp_path / "f"), Identity("R-1", "m", "f"), Options())
    assert second.info().cert_fingerprint == fingerprint and DeviceState.COMMITTED in second.info().state


def test_fault_specs() -> None:
    assert parse_fault("disconnect:put_cert:2").nth == 2
    import argparse

    for bad in ("explode:hello", "drop:nowhere", "drop"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_fault(bad)


def test_retransmit_is_answered_from_the_cache_over_a_pty(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "firmware_tools.emulator", "--pty", "--state",
                                str(tmp_path / "flash"), "--hardware-id", "CACHE-1"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert process.stdout is not None
        select.select([process.stdout], [], [], 30)
        port = serial.Serial(process.stdout.readline().decode().strip(), timeout=5)
        deframer = Deframer()

        def exchange(wire: bytes) -> bytes:
            port.write(wire)
            buffer = b""
            while True:
                chunk = port.read(1)
                assert chunk, "no reply"
                buffer += chunk
                if chunk == b"\x00" and any(isinstance(e, Frame) for e in deframer.feed(buffer)):
                    return buffer

        request = GenerateKey(KeyType.P256).encode(0x4242)
        first = exchange(request)
        retransmit = exchange(request)
        assert retransmit == first  # byte-identical: served from the cache, not re-executed
        fresh = exchange(Hello().encode(0x4243))
        info = deframer_messages(fresh)
        assert isinstance(info, Info) and DeviceState.HAS_KEY in info.state
        noise = exchange(b"\x01\x02\x03\x00")
        error = deframer_messages(noise)
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_FRAME
        port.close()
    finally:
        process.kill()
        process.wait(10)


def deframer_messages(wire: bytes) -> Message:
    frames = [e for e in Deframer().feed(wire) if isinstance(e, Frame)]
    return parse_message(frames[-1])
