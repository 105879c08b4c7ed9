"""Write the protocol test vectors in ``firmware_tools/vectors/`` (``python -m firmware_tools.make_vectors``).

The vectors are data, not code: a C or Rust implementation replays them
against its own codec. ``tests/firmware_tools`` replays them against ours, so
the files and the Python codec can never drift apart silently. Regenerating
is only needed when the protocol changes (and then the version byte must
change too); ECDSA signatures are randomised, so their bytes differ on each
run while still verifying.

File formats (all byte strings are lower-case hex):

* ``frames.json``: ``{"cases": [{"name", "description", "chunks": [hex, ...],
  "events": [{"frame": {"version", "type", "seq", "payload"}} | {"error": code}]}]}``.
  Feed the chunks in order to one stream decoder; expect exactly the events.
* ``messages.json``: ``{"valid": [{"name", "type", "seq", "fields", "payload", "wire"}],
  "invalid": [{"name", "type", "payload", "error"}]}``. ``fields`` uses the
  names of PROTOCOL.md; flags and enums are integers.
* ``objects.json``: certificate bundles, config records and PROVE examples.
* ``behaviour.json``: device-behaviour cases (requests, expected replies and
  resulting state), replayed on a real device by ``python -m firmware_tools.conformance``;
  the format is described in :mod:`firmware_tools.behaviour`.
* ``rotation.json``: certificate rotation over MQTT (PROTOCOL.md part 2): exact
  messages, the bytes they sign and deterministic signatures; the format is
  described in :mod:`firmware_tools.rotation_vectors`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
import zlib
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from cobs import cobs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from firmware_tools.behaviour import behaviour_vectors
from firmware_tools.rotation_vectors import rotation_vectors
from iotauth.provisioning.codec import MAX_ENCODED, MAX_PAYLOAD, encode, raw_frame
from iotauth.provisioning.messages import (
    Capability,
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
    Hashes,
    Hello,
    Info,
    KeyAck,
    KeyType,
    KeyTypes,
    Message,
    MsgType,
    Prove,
    PutCert,
    PutConfig,
    PutKey,
    ReadBack,
    SigAlg,
    Signature,
)
from iotauth.provisioning.objects import DeviceConfig, encode_cert_bundle, prove_message, sign_proof

VECTORS = Path(__file__).parent / "vectors"


def message_to_json(msg: Message) -> dict[str, Any]:
    """A message's fields as JSON values: bytes as hex, enums and flags as integers."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        if isinstance(value, bytes):
            out[f.name] = value.hex()
        elif isinstance(value, Enum):
            out[f.name] = int(value.value)
        else:
            out[f.name] = value
    return out


def _h(seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(32))


def sample_messages() -> list[tuple[str, Message, int]]:
    """One or more examples of every message, with the sequence number to frame it with."""
    return [
        ("hello", Hello(), 0x0001),
        ("info-blank", Info(1, 1024, Capability.KEYGEN | Capability.PUT_KEY, KeyTypes.P256 | KeyTypes.P384,
                            DeviceState(0), "EMU-0001", "sensor-x", "1.2.3"), 0x0001),
        ("info-committed", Info(1, 512, Capability.KEYGEN, KeyTypes.P256,
                                DeviceState.HAS_KEY | DeviceState.HAS_CERT | DeviceState.HAS_CONFIG
                                | DeviceState.COMMITTED, "AA:BB:CC:00:11:22", "m", "fw", bytes(range(91)), _h(7)),
         0x1234),
        ("generate-key", GenerateKey(KeyType.P256), 0x0002),
        ("generate-key-replace", GenerateKey(KeyType.P384, replace=True), 0x0003),
        ("generate-key-offset", GenerateKey(KeyType.P256, offset=1020), 0x0004),
        ("csr-chunk", Csr(300, 0, bytes(range(256)) + bytes(range(20))), 0x0002),
        ("put-key", PutKey(138, 0, bytes(range(138))), 0x0005),
        ("put-cert-first", PutCert(1500, 0, bytes(1020)), 0x0006),
        ("put-cert-last", PutCert(1500, 1020, b"\x00\x01\x02" * 160), 0x0007),
        ("put-config", PutConfig(12, 0, b"\x01\x00\x03abc\x03\x00\x02\x22\xb3"), 0x0008),
        ("key-ack", KeyAck(138, True, _h(1)), 0x0005),
        ("cert-ack-partial", CertAck(1020, False), 0x0006),
        ("config-ack", ConfigAck(12, True, _h(2)), 0x0008),
        ("read-back", ReadBack(), 0x0009),
        ("hashes", Hashes(DeviceState.HAS_KEY | DeviceState.HAS_CERT, _h(10), _h(20), _h(30), bytes(32)), 0x0009),
        ("prove", Prove(_h(40)), 0x000A),
        ("signature", Signature(SigAlg.ECDSA_SHA256, bytes(range(70, 140))), 0x000A),
        ("commit", Commit(_h(50)), 0x000B),
        ("committed", Committed(_h(50)), 0x000B),
        ("erase", Erase("EMU-0001"), 0x000C),
        ("erased", Erased(), 0x000C),
        ("error-locked", Error(ErrorCode.LOCKED, 0, "device is committed; ERASE first"), 0x000D),
        ("error-bad-offset", Error(ErrorCode.BAD_OFFSET, 1020, ""), 0x000E),
        ("error-unsolicited", Error(ErrorCode.BAD_FRAME, 0, "bad-crc"), 0x0000),
    ]


def invalid_payloads() -> list[dict[str, Any]]:
    def case(name: str, msg_type: MsgType, payload: bytes) -> dict[str, Any]:
        return {"name": name, "type": int(msg_type), "payload": payload.hex(), "error": "bad-payload"}

    return [
        case("hello-trailing-byte", MsgType.HELLO, b"\x00"),
        case("generate-key-unknown-type", MsgType.GENERATE_KEY, b"\x09\x00\x00\x00"),
        case("generate-key-reserved-flag", MsgType.GENERATE_KEY, b"\x01\x02\x00\x00"),
        case("generate-key-replace-with-offset", MsgType.GENERATE_KEY, b"\x01\x01\x00\x10"),
        case("generate-key-short", MsgType.GENERATE_KEY, b"\x01\x00"),
        case("put-cert-empty-chunk", MsgType.PUT_CERT, b"\x00\x10\x00\x00"),
        case("put-cert-past-end", MsgType.PUT_CERT, b"\x00\x02\x00\x01abc"),
        case("put-cert-zero-total", MsgType.PUT_CERT, b"\x00\x00\x00\x00a"),
        case("prove-short-nonce", MsgType.PROVE, bytes(31)),
        case("prove-long-nonce", MsgType.PROVE, bytes(33)),
        case("commit-short", MsgType.COMMIT, bytes(16)),
        case("info-truncated", MsgType.INFO, b"\x01\x04\x00\x03\x03\x00\x08EMU"),
        case("info-small-payload", MsgType.INFO, b"\x01\x00\x10\x03\x03\x00" + b"\x00" * 5),
        case("info-bad-utf8", MsgType.INFO, b"\x01\x04\x00\x03\x03\x00\x02\xff\xfe\x00\x00\x00\x00"),
        case("ack-complete-2", MsgType.CERT_ACK, b"\x00\x10\x02" + bytes(32)),
        case("signature-unknown-alg", MsgType.SIGNATURE, b"\x07abc"),
        case("signature-empty", MsgType.SIGNATURE, b"\x01"),
        case("error-text-overrun", MsgType.ERROR, b"\x05\x00\x00\x10abc"),
    ]


def _frame_json(msg_type: int, seq: int, payload: bytes, version: int = 1) -> dict[str, Any]:
    return {"frame": {"version": version, "type": msg_type, "seq": seq, "payload": payload.hex()}}


def frame_cases() -> list[dict[str, Any]]:
    hello = encode(MsgType.HELLO, 1)
    prove = encode(MsgType.PROVE, 0x0A, _h(40))
    big_payload = bytes(range(256)) * 4  # 1024 bytes with zeros in it: COBS at work
    big = encode(MsgType.PUT_CERT, 0x0102, big_payload)
    raw = bytearray(raw_frame(MsgType.HELLO, 2, b""))
    raw[-1] ^= 0xFF
    bad_crc = bytes(cobs.encode(bytes(raw))) + b"\x00"
    body = struct.pack(">BBHH", 1, MsgType.HELLO, 3, 5)  # length says 5, no payload follows
    bad_length = bytes(cobs.encode(body + struct.pack(">I", zlib.crc32(body)))) + b"\x00"
    v2_body = struct.pack(">BBHH", 2, MsgType.HELLO, 4, 0)
    v2 = bytes(cobs.encode(v2_body + struct.pack(">I", zlib.crc32(v2_body)))) + b"\x00"
    oversize_body = struct.pack(">BBHH", 1, MsgType.PUT_CERT, 5, MAX_PAYLOAD + 1) + bytes(MAX_PAYLOAD + 1)
    oversize = bytes(cobs.encode(oversize_body + struct.pack(">I", zlib.crc32(oversize_body)))) + b"\x00"
    runaway = b"\x55" * (MAX_ENCODED + 10) + b"\x00"
    return [
        {"name": "hello", "description": "HELLO, seq 1, empty payload",
         "chunks": [hello.hex()], "events": [_frame_json(MsgType.HELLO, 1, b"")]},
        {"name": "split-across-reads", "description": "one frame delivered one byte at a time",
         "chunks": [bytes([b]).hex() for b in prove], "events": [_frame_json(MsgType.PROVE, 0x0A, _h(40))]},
        {"name": "two-frames-one-read", "description": "two frames in one read",
         "chunks": [(hello + prove).hex()],
         "events": [_frame_json(MsgType.HELLO, 1, b""), _frame_json(MsgType.PROVE, 0x0A, _h(40))]},
        {"name": "max-payload", "description": "1024-byte payload with zero bytes (max size frame)",
         "chunks": [big.hex()], "events": [_frame_json(MsgType.PUT_CERT, 0x0102, big_payload)]},
        {"name": "garbage-before-and-after", "description": "line noise around a frame is reported, then resync",
         "chunks": [(b"\x13\x37noise\x00" + hello + b"\xff\xfe").hex(), b"\x00".hex()],
         "events": [{"error": "bad-cobs"}, _frame_json(MsgType.HELLO, 1, b""), {"error": "bad-cobs"}]},
        {"name": "leading-delimiters", "description": "empty frames (bare delimiters) are skipped silently",
         "chunks": [(b"\x00\x00\x00" + hello).hex()], "events": [_frame_json(MsgType.HELLO, 1, b"")]},
        {"name": "bad-crc", "description": "CRC mismatch, then a good frame",
         "chunks": [(bad_crc + hello).hex()], "events": [{"error": "bad-crc"}, _frame_json(MsgType.HELLO, 1, b"")]},
        {"name": "short-frame", "description": "fewer than 10 bytes after COBS decoding",
         "chunks": [(bytes(cobs.encode(b"\x01\x01\x00")) + b"\x00").hex()], "events": [{"error": "short"}]},
        {"name": "length-mismatch", "description": "length field disagrees with the bytes present",
         "chunks": [bad_length.hex()], "events": [{"error": "bad-length"}]},
        {"name": "other-version", "description": "a valid frame of version 2 decodes; the message layer refuses it",
         "chunks": [v2.hex()], "events": [_frame_json(MsgType.HELLO, 4, b"", version=2)]},
        {"name": "oversize-delimited", "description": "a delimited frame with a 1025-byte payload",
         "chunks": [oversize.hex()], "events": [{"error": "oversize"}]},
        {"name": "oversize-runaway", "description": f"more than {MAX_ENCODED} bytes without a delimiter, then a frame",
         "chunks": [runaway[:600].hex(), runaway[600:].hex(), hello.hex()],
         "events": [{"error": "oversize"}, _frame_json(MsgType.HELLO, 1, b"")]},
        {"name": "truncated-then-resync", "description": "a frame cut short by a reset; the next frame decodes",
         "chunks": [prove[:20].hex(), (b"\x00" + hello).hex()],
         "events": [{"error": "bad-cobs"}, _frame_json(MsgType.HELLO, 1, b"")]},
    ]


def object_vectors() -> dict[str, Any]:
    p256 = ec.derive_private_key(0x1F2E3D4C5B6A79881F2E3D4C5B6A79881F2E3D4C5B6A79881F2E3D4C5B6A7988, ec.SECP256R1())
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    nonce = _h(40)
    proofs = []
    for name, key in (("p256", p256), ("ed25519", ed)):
        algorithm, signature = sign_proof(key, nonce)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        proofs.append({"key_type": name, "public_key_spki": spki.hex(), "nonce": nonce.hex(),
                       "signed_message": prove_message(nonce).hex(), "algorithm": int(algorithm),
                       "signature": signature.hex()})
    config = DeviceConfig("sensor-EMU-0001", "broker.example", 8883, (b"\x30\x03\x02\x01\x00",))
    return {
        "cert_bundles": [
            {"certificates": ["3003020101", "30020500"], "encoded": encode_cert_bundle([b"\x30\x03\x02\x01\x01",
                                                                                         b"\x30\x02\x05\x00"]).hex()},
        ],
        "configs": [
            {"device_id": config.device_id, "broker_host": config.broker_host, "broker_port": config.broker_port,
             "trust_anchors": [a.hex() for a in config.trust_anchors], "encoded": config.encode().hex()},
        ],
        "proofs": proofs,
    }


def all_vectors() -> dict[str, Any]:
    """Every vector file's content, by file name."""
    messages = {
        "valid": [
            {"name": name, "type": int(msg.TYPE), "seq": seq, "fields": message_to_json(msg),
             "payload": msg.payload().hex(), "wire": msg.encode(seq).hex()}
            for name, msg, seq in sample_messages()
        ],
        "invalid": invalid_payloads(),
    }
    return {"frames.json": {"cases": frame_cases()}, "messages.json": messages, "objects.json": object_vectors(),
            "behaviour.json": behaviour_vectors(), "rotation.json": rotation_vectors()}


def render(data: Any) -> str:
    return json.dumps(data, indent=1) + "\n"


def write_all(target: Path = VECTORS, only: Sequence[str] = ()) -> None:
    """Write the vector files (``only``: just these, e.g. ``rotation.json``, leaving the others' random bytes be)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, data in all_vectors().items():
        if not only or name in only:
            (target / name).write_text(render(data), encoding="utf-8")


if __name__ == "__main__":
    write_all(only=sys.argv[1:])
