"""Replay ``firmware_tools/vectors/*.json`` against the codec, and check a frame built by hand.

The vectors are what a C or Rust implementation checks itself against, so the
Python codec must reproduce them byte for byte, in both directions.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from cobs import cobs
from cryptography.hazmat.primitives import serialization

from firmware_tools.make_vectors import message_to_json
from iotauth.errors import FrameError, ProtocolError
from iotauth.provisioning.codec import MAX_ENCODED, Deframer, Frame, decode, encode
from iotauth.provisioning.messages import MESSAGES, MsgType, SigAlg, parse_message
from iotauth.provisioning.objects import DeviceConfig, decode_cert_bundle, prove_message, verify_proof

VECTORS = Path(__file__).resolve().parents[2] / "firmware_tools" / "vectors"


def _load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def _events(chunks: list[str]) -> list[dict[str, Any]]:
    deframer = Deframer()
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        for event in deframer.feed(bytes.fromhex(chunk)):
            if isinstance(event, FrameError):
                events.append({"error": event.code})
            else:
                events.append({"frame": {"version": event.version, "type": event.type, "seq": event.seq,
                                         "payload": event.payload.hex()}})
    return events


FRAME_CASES = _load("frames.json")["cases"]
VALID = _load("messages.json")["valid"]
INVALID = _load("messages.json")["invalid"]


@pytest.mark.parametrize("case", FRAME_CASES, ids=[c["name"] for c in FRAME_CASES])
def test_frame_stream_vectors(case: dict[str, Any]) -> None:
    assert _events(case["chunks"]) == case["events"]


@pytest.mark.parametrize("case", FRAME_CASES, ids=[c["name"] for c in FRAME_CASES])
def test_frame_vectors_byte_at_a_time(case: dict[str, Any]) -> None:
    """Splitting the stream into single bytes must not change what is decoded."""
    stream = "".join(case["chunks"])
    single = [stream[i : i + 2] for i in range(0, len(stream), 2)]
    assert _events(single) == case["events"]


@pytest.mark.parametrize("case", VALID, ids=[c["name"] for c in VALID])
def test_message_vectors_decode_and_encode(case: dict[str, Any]) -> None:
    wire = bytes.fromhex(case["wire"])
    consumed, frame = decode(wire)
    assert consumed == len(wire) and frame is not None
    assert (frame.type, frame.seq, frame.payload.hex()) == (case["type"], case["seq"], case["payload"])
    message = parse_message(frame)
    assert message_to_json(message) == case["fields"]
    assert message.encode(case["seq"]) == wire
    assert message.payload().hex() == case["payload"]


def test_every_message_type_has_a_vector() -> None:
    assert {c["type"] for c in VALID} == set(MESSAGES)


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_invalid_payload_vectors_are_refused(case: dict[str, Any]) -> None:
    frame = Frame(case["type"], 7, bytes.fromhex(case["payload"]))
    with pytest.raises(ProtocolError) as refused:
        parse_message(frame)
    assert refused.value.code == case["error"]


def test_hand_built_frame_matches_the_spec() -> None:
    """PROTOCOL.md section 6, built from struct, zlib and COBS only (not from the codec)."""
    body = struct.pack(">BBHH", 1, 0x01, 1, 0)
    raw = body + struct.pack(">I", zlib.crc32(body))
    wire = bytes(cobs.encode(raw)) + b"\x00"
    assert wire.hex(" ") == "03 01 01 02 01 01 05 46 3c 31 81 00"
    assert encode(MsgType.HELLO, 1) == wire
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_unknown_type_and_version_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError) as unknown:
        parse_message(Frame(0x3E, 1, b""))
    assert unknown.value.code == "unknown-type"
    with pytest.raises(ProtocolError) as version:
        parse_message(Frame(0x01, 1, b"", version=2))
    assert version.value.code == "unsupported-version"


def test_max_encoded_bound_holds_for_the_worst_case() -> None:
    worst = encode(MsgType.PUT_CERT, 0xFFFF, b"\x01" * 1024)  # no zeros: COBS overhead is maximal
    assert len(worst) - 1 <= MAX_ENCODED
    with pytest.raises(ProtocolError):
        encode(MsgType.PUT_CERT, 1, bytes(1025))


def test_object_vectors() -> None:
    objects = _load("objects.json")
    for bundle in objects["cert_bundles"]:
        assert [d.hex() for d in decode_cert_bundle(bytes.fromhex(bundle["encoded"]))] == bundle["certificates"]
    for config in objects["configs"]:
        decoded = DeviceConfig.decode(bytes.fromhex(config["encoded"]))
        assert (decoded.device_id, decoded.broker_host, decoded.broker_port) == (
            config["device_id"], config["broker_host"], config["broker_port"])
        assert [a.hex() for a in decoded.trust_anchors] == config["trust_anchors"]
        assert decoded.encode().hex() == config["encoded"]
    for proof in objects["proofs"]:
        key = serialization.load_der_public_key(bytes.fromhex(proof["public_key_spki"]))
        nonce = bytes.fromhex(proof["nonce"])
        assert prove_message(nonce).hex() == proof["signed_message"]
        signature = bytes.fromhex(proof["signature"])
        assert verify_proof(key, SigAlg(proof["algorithm"]), signature, nonce)  # type: ignore[arg-type]
        assert not verify_proof(key, SigAlg(proof["algorithm"]), signature, bytes(32))  # type: ignore[arg-type]


def test_vectors_are_what_the_generator_writes(tmp_path: Path) -> None:
    """The shipped files are reproducible (ECDSA signatures in objects.json are randomised, so not compared)."""
    from firmware_tools.make_vectors import write_all

    write_all(tmp_path)
    for name in ("frames.json", "messages.json", "behaviour.json"):
        assert (tmp_path / name).read_text() == (VECTORS / name).read_text(), f"{name} is stale: regenerate it"


def test_the_spki_prefixes_in_protocol_md_are_what_keys_encode_to() -> None:
    """PROTOCOL.md 3.1: each key type's SubjectPublicKeyInfo is a fixed prefix, then the key."""
    import re

    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from iotauth.provisioning.objects import spki_der

    text = (Path(__file__).resolve().parents[2] / "firmware_tools" / "PROTOCOL.md").read_text()
    row = r"\| (P-256|P-384|Ed25519) +\| `([0-9a-f]+)` +\| \d+-byte \w+ +\| (\d+) +\|"
    table = {name: prefix for name, prefix, _ in re.findall(row, text)}
    keys = {"P-256": ec.generate_private_key(ec.SECP256R1()), "P-384": ec.generate_private_key(ec.SECP384R1()),
            "Ed25519": ed25519.Ed25519PrivateKey.generate()}
    assert set(table) == set(keys)
    for name, key in keys.items():
        assert spki_der(key.public_key()).hex().startswith(table[name]), name
