"""The rotation protocol's messages: what is signed, every field checked, nothing ambiguous accepted."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from iotauth.errors import RefusalCode, RotationMessageError
from iotauth.pki.keys import generate_private_key
from iotauth.rotation import messages
from iotauth.rotation.messages import Confirm, Renew, Status
from tests.fixtures.pki import forge_certificate

KEY_TYPES = ["p256", "p384", "ed25519", "rsa"]


def current_cert(key_type: str = "p256") -> tuple[Any, x509.Certificate]:
    key = generate_private_key(key_type)
    issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ca")])
    return key, forge_certificate(key.public_key(), generate_private_key("p256"), issuer, common_name="dev-1",
                                  uris=["spiffe://factory.test/device/dev-1"])


def renew_json(**changes: Any) -> bytes:
    key, cert = current_cert()
    request = messages.make_renew(key, cert, messages.make_csr(generate_private_key("p256"), "dev-1"), "dev-1")
    data = json.loads(request.encode())
    data.update(changes)
    for name in [k for k, v in changes.items() if v is ...]:
        del data[name]
    return json.dumps(data).encode()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_a_request_round_trips_and_verifies_with_the_current_key(key_type: str) -> None:
    key, cert = current_cert(key_type)
    csr = messages.make_csr(generate_private_key(key_type), "dev-1")
    request = messages.make_renew(key, cert, csr, "dev-1")
    decoded = messages.decode_request(request.encode())
    assert decoded == request and isinstance(decoded, Renew)
    assert messages.verify(cert.public_key(), decoded.signature, decoded.signed)
    assert decoded.certificate == messages.certificate_sha256(cert)
    other, _ = current_cert(key_type)
    assert not messages.verify(other.public_key(), decoded.signature, decoded.signed)
    confirm = messages.make_confirm(key, "dev-1", "1a2b")
    assert messages.decode_request(confirm.encode()) == confirm and isinstance(confirm, Confirm)
    assert messages.verify(key.public_key(), confirm.signature, confirm.signed)


def test_the_signature_covers_every_field() -> None:
    key, cert = current_cert()
    csr = messages.make_csr(generate_private_key("p256"), "dev-1")
    request = messages.make_renew(key, cert, csr, "dev-1")
    other_csr = messages.make_csr(generate_private_key("p256"), "dev-1")
    for changed in (Renew("dev-2", request.request_id, request.timestamp, request.certificate, csr, request.signature),
                    Renew("dev-1", bytes(16), request.timestamp, request.certificate, csr, request.signature),
                    Renew("dev-1", request.request_id, request.timestamp + 1, request.certificate, csr,
                          request.signature),
                    Renew("dev-1", request.request_id, request.timestamp, "0" * 64, csr, request.signature),
                    Renew("dev-1", request.request_id, request.timestamp, request.certificate, other_csr,
                          request.signature)):
        assert not messages.verify(cert.public_key(), changed.signature, changed.signed)
    # A confirmation's signature cannot stand in for a request's: the type is signed too.
    confirm = messages.signed_bytes(messages.Kind.CONFIRM, "dev-1", request.request_id, request.timestamp, b"x")
    assert confirm.split(b"\0")[1] == b"confirm" and request.signed.split(b"\0")[1] == b"renew"


def test_the_signed_bytes_are_the_documented_layout() -> None:
    signed = messages.signed_bytes(messages.Kind.RENEW, "dev-1", b"\x01" * 16, 1764500000,
                                   messages.renew_tail("ab" * 32, b"csr"))
    parts = signed.split(b"\0", 5)
    assert parts[:5] == [b"iotauth-rotation-v1", b"renew", b"dev-1", b"\x01" * 16, b"1764500000"]
    assert parts[5][:64] == b"ab" * 32 and parts[5][64] == 0 and len(parts[5]) == 64 + 1 + 32


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"v": 2}, "v must be 1"),
        ({"v": True}, "v must be 1"),
        ({"type": "grant"}, "type must be"),
        ({"extra": 1}, "unknown ['extra']"),
        ({"csr": ...}, "missing ['csr']"),
        ({"device_id": "../x"}, "device_id"),
        ({"device_id": 7}, "device_id"),
        ({"timestamp": "1764500000"}, "timestamp"),
        ({"timestamp": -1}, "timestamp"),
        ({"timestamp": 2**41}, "timestamp"),
        ({"certificate": "AB" * 32}, "64 hex digits"),
        ({"certificate": "ab"}, "64 hex digits"),
        ({"csr": "not base64!"}, "csr is not standard base64"),
        ({"csr": "AAB="}, "not canonical"),  # decodes, but is not the one encoding of its bytes
        ({"csr": "A" * 12000}, "at most"),  # under the message bound, over the CSR bound
        ({"signature": "AA=="[:-1]}, "signature"),
    ],
)
def test_every_malformed_field_is_refused_and_answered(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(RotationMessageError) as caught:
        messages.decode_request(renew_json(**changes))
    assert needle in str(caught.value)
    assert caught.value.code is RefusalCode.BAD_REQUEST
    assert caught.value.request_id is not None  # the request id was readable: the device gets the answer


@pytest.mark.parametrize("signature", [..., "", None])
def test_a_missing_signature_is_its_own_refusal(signature: Any) -> None:
    with pytest.raises(RotationMessageError) as caught:
        messages.decode_request(renew_json(signature=signature))
    assert caught.value.code is RefusalCode.BAD_SIGNATURE and "no signature" in str(caught.value)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[]", b"null", b'{"request_id": "short"}', b"[" * 5000, b"{" + b'"a":1,' * 4000 + b'"b":1}',
     json.dumps({"request_id": base64.b64encode(bytes(15)).decode()}).encode()],
)
def test_without_a_readable_request_id_nothing_is_answered(payload: bytes) -> None:
    with pytest.raises(RotationMessageError) as caught:
        messages.decode_request(payload)
    assert caught.value.request_id is None


def test_nesting_and_size_are_bounded_before_parsing() -> None:
    deep = b'{"request_id": "' + base64.b64encode(bytes(16)) + b'", "x": ' + b"[" * 50 + b"]" * 50 + b"}"
    with pytest.raises(RotationMessageError, match="nested deeper"):
        messages.decode_request(deep)
    with pytest.raises(RotationMessageError, match="too large"):
        messages.decode_request(b" " * (messages.MAX_MESSAGE + 1))


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_garbage_never_escapes_as_another_exception(payload: bytes) -> None:
    with contextlib.suppress(RotationMessageError):
        messages.decode_request(payload)


def test_responses_and_orders_round_trip() -> None:
    issued = messages.issued("rid", "1a", "2027-01-01T00:00:00Z", "-----BEGIN CERTIFICATE-----\n")
    assert messages.decode_response(issued.encode()) == issued
    refusal = messages.refused("rid", RefusalCode.OUTSIDE_WINDOW, "later", 3600)
    decoded = messages.decode_response(refusal.encode())
    assert (decoded.status, decoded.error, decoded.retry_after) == (Status.REFUSED, RefusalCode.OUTSIDE_WINDOW, 3600)
    future = json.loads(refusal.encode())
    future["error"] = "a-code-from-the-future"
    assert messages.decode_response(json.dumps(future).encode()).error is RefusalCode.INTERNAL
    assert messages.decode_response(messages.activated("rid", "1a").encode()).status is Status.ACTIVATED
    order = messages.RotateOrder("1a2b", "2026-11-30T00:00:00Z")
    assert messages.decode_order(order.encode()) == order
    for bad in (b"", b"{}", b'{"v":1,"type":"rotate","serial":"XYZ","requested_at":"x"}'):
        with pytest.raises(RotationMessageError):
            messages.decode_order(bad)


def test_topics() -> None:
    assert messages.device_of_request_topic("devices/dev-1/rotation/request") == "dev-1"
    for topic in ("devices/dev-1/rotation/response", "devices/+/rotation/request", "devices/../rotation/request",
                  "devices/a/b/rotation/request", "x/dev-1/rotation/request"):
        assert messages.device_of_request_topic(topic) is None
    with pytest.raises(ValueError, match="device id"):
        messages.response_topic("a/b")


def test_csrs_are_proof_of_possession_for_each_key_type() -> None:
    for key_type in KEY_TYPES:
        key = generate_private_key(key_type)
        csr = x509.load_der_x509_csr(messages.make_csr(key, "dev-1"))
        assert csr.is_signature_valid
        assert csr.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
