"""Replay ``firmware_tools/vectors/rotation.json`` against the protocol's own code, in both directions.

The file is regenerated in memory and must be identical (it is deterministic), so
the committed vectors and :mod:`iotauth.rotation.messages` can never drift apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_tools.make_vectors import render
from firmware_tools.rotation_vectors import rotation_vectors
from iotauth.errors import RefusalCode, RotationMessageError
from iotauth.rotation import messages
from iotauth.rotation.messages import Confirm, Renew

FILE = Path(__file__).resolve().parents[2] / "firmware_tools" / "vectors" / "rotation.json"
VECTORS: dict[str, Any] = json.loads(FILE.read_text(encoding="utf-8"))


def key(name: str) -> Any:
    return serialization.load_der_private_key(bytes.fromhex(VECTORS["keys"][name]["pkcs8"]), None)


def test_the_file_is_what_the_generator_makes() -> None:
    assert FILE.read_text(encoding="utf-8") == render(rotation_vectors())


@pytest.mark.parametrize("case", VECTORS["requests"], ids=[c["name"] for c in VECTORS["requests"]])
def test_requests(case: dict[str, Any]) -> None:
    decoded = messages.decode_request(case["message"].encode())
    assert isinstance(decoded, Renew)
    assert decoded.request_id.hex() == case["request_id"] and decoded.timestamp == case["timestamp"]
    assert decoded.csr.hex() == case["csr"] and hashlib.sha256(decoded.csr).hexdigest() == case["csr_sha256"]
    assert decoded.signed.hex() == case["signed"] and decoded.signature.hex() == case["signature"]
    current = x509.load_der_x509_certificate(bytes.fromhex(VECTORS["current_certificate"]["der"]))
    assert decoded.certificate == VECTORS["current_certificate"]["sha256"] == messages.certificate_sha256(current)
    assert messages.verify(current.public_key(), decoded.signature, decoded.signed)
    csr = x509.load_der_x509_csr(decoded.csr)
    assert csr.is_signature_valid
    spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki.hex() == VECTORS["keys"][case["new_key"]]["spki"]
    # The other way: the same inputs build the same bytes (RFC 6979 ECDSA), so a device can compare its own.
    rebuilt = messages.make_renew(key("current"), current, decoded.csr, case["device_id"],
                                  request_id=decoded.request_id, timestamp=decoded.timestamp, deterministic=True)
    assert rebuilt.encode().decode() == case["message"]


def test_confirmations() -> None:
    for case in VECTORS["confirms"]:
        decoded = messages.decode_request(case["message"].encode())
        assert isinstance(decoded, Confirm) and decoded.serial == case["serial"]
        assert decoded.signed.hex() == case["signed"]
        assert messages.verify(key(case["key"]).public_key(), decoded.signature, decoded.signed)


def test_responses_and_the_order() -> None:
    ca = x509.load_der_x509_certificate(bytes.fromhex(VECTORS["ca_certificate"]))
    for case in VECTORS["responses"]:
        decoded = messages.decode_response(case["message"].encode())
        assert decoded.status.value == case["status"]
        if "error" in case:
            assert decoded.error is RefusalCode(case["error"])
        if decoded.chain is not None:
            leaf, issuer = x509.load_pem_x509_certificates(decoded.chain.encode())
            assert issuer == ca
            leaf.verify_directly_issued_by(ca)
            assert leaf.public_key() == key("new_p256").public_key()
    order = messages.decode_order(VECTORS["order"]["message"].encode())
    assert order.serial == VECTORS["order"]["serial"] == VECTORS["current_certificate"]["serial"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=[c["name"] for c in VECTORS["invalid"]])
def test_invalid_messages(case: dict[str, Any]) -> None:
    with pytest.raises(RotationMessageError) as caught:
        messages.decode_request(case["message"].encode())
    assert caught.value.code.value == case["error"]
    assert (caught.value.request_id is not None) is case["answered"]
