"""Rotation vectors (PROTOCOL.md part 2): exact messages, signed bytes and signatures a device can check itself against.

Written to ``vectors/rotation.json`` by ``python -m firmware_tools.make_vectors``
and replayed by ``tests/firmware_tools/test_rotation_vectors.py``. Everything
is deterministic: keys are derived from fixed labels, the test CA and the
device certificate have fixed serials and dates, and ECDSA signatures use
RFC 6979 (so a device with RFC 6979 signing reproduces them bit for bit; one
with random nonces must *verify* them instead, and compare ``signed`` exactly).
The private keys are published test keys: never trust them.

Format (byte strings are lower-case hex; JSON messages are the exact UTF-8 text)::

    {"keys": {NAME: {"type", "pkcs8": hex, "spki": hex}},
     "ca_certificate": hex (DER; it issued both device certificates),
     "current_certificate": {"der": hex, "sha256": hex, "serial": hex},
     "requests": [{"name", "key", "new_key", "device_id", "request_id", "timestamp", "csr", "csr_sha256",
                   "signed", "signature", "message"}],
     "confirms": [{"name", "key", "device_id", "request_id", "timestamp", "serial", "signed", "signature",
                   "message"}],
     "responses": [{"name", "message", "status", "error"?}],
     "order": {"message", "serial"},
     "invalid": [{"name", "message", "error", "answered"}]}

``invalid`` lists messages a renewer refuses without looking anything up:
``error`` is the code, ``answered`` whether the refusal is sent back (the
request id could be read).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotauth.errors import RefusalCode
from iotauth.rotation import messages

DEVICE = "sensor-0001"
TIMESTAMP = 1764500000  # 2025-11-30T10:53:20Z
NOT_BEFORE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _scalar(label: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    digest = hashlib.sha384 if curve.key_size >= 384 else hashlib.sha256
    return ec.derive_private_key(int.from_bytes(digest(label.encode()).digest(), "big"), curve)


def keys() -> dict[str, PrivateKeyTypes]:
    """The published test keys, derived from fixed labels."""
    return {
        "ca": _scalar("iotauth rotation vectors: test CA", ec.SECP256R1()),
        "current": _scalar("iotauth rotation vectors: current device key", ec.SECP256R1()),
        "new_p256": _scalar("iotauth rotation vectors: new P-256 key", ec.SECP256R1()),
        "new_p384": _scalar("iotauth rotation vectors: new P-384 key", ec.SECP384R1()),
        "new_ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"iotauth rotation vectors: new Ed25519 key").digest()),
    }


CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotauth rotation vectors test CA")])


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(CA_NAME)
        .issuer_name(CA_NAME)
        .public_key(ca_key.public_key())
        .serial_number(0x0CA)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_BEFORE + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def _certificate(ca_key: ec.EllipticCurvePrivateKey, key: PrivateKeyTypes, serial: int) -> x509.Certificate:
    issuer = CA_NAME
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_BEFORE + dt.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            f"spiffe://vectors.test/device/{DEVICE}")]), critical=False)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def _spki(key: PrivateKeyTypes) -> str:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).hex()


def _pkcs8(key: PrivateKeyTypes) -> str:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).hex()


def _rid(n: int) -> bytes:
    return bytes((n * 17 + i) & 0xFF for i in range(messages.REQUEST_ID_BYTES))


def rotation_vectors() -> dict[str, Any]:
    found = keys()
    ca_key, current = found["ca"], found["current"]
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert = _certificate(ca_key, current, 0x1D0C)
    requests = []
    for n, name in enumerate(("new_p256", "new_p384", "new_ed25519"), start=1):
        csr = messages.make_csr(found[name], DEVICE, deterministic=True)
        request = messages.make_renew(current, cert, csr, DEVICE, request_id=_rid(n), timestamp=TIMESTAMP + n,
                                      deterministic=True)
        requests.append({
            "name": f"renew-{name.removeprefix('new_')}", "key": "current", "new_key": name, "device_id": DEVICE,
            "request_id": request.request_id.hex(), "timestamp": request.timestamp, "csr": csr.hex(),
            "csr_sha256": hashlib.sha256(csr).hexdigest(), "signed": request.signed.hex(),
            "signature": request.signature.hex(), "message": request.encode().decode(),
        })
    renewed = _certificate(ca_key, found["new_p256"], 0x2E1D)
    serial = format(renewed.serial_number, "x")
    confirm = messages.make_confirm(found["new_p256"], DEVICE, serial, request_id=_rid(9), timestamp=TIMESTAMP + 60,
                                    deterministic=True)
    ca_cert = _ca_certificate(ca_key)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (renewed, ca_cert)).decode()
    rid = messages.b64(_rid(1))
    responses = [
        {"name": "issued", "status": "issued",
         "message": messages.issued(rid, serial, "2026-01-01T00:00:00Z", chain).encode().decode()},
        {"name": "activated", "status": "activated",
         "message": messages.activated(messages.b64(_rid(9)), serial).encode().decode()},
        {"name": "refused-outside-window", "status": "refused", "error": "outside-window",
         "message": messages.refused(rid, RefusalCode.OUTSIDE_WINDOW, "the renewal window opens at "
                                     "2025-09-29T00:00:00Z", 5000000).encode().decode()},
        {"name": "refused-key-reused", "status": "refused", "error": "key-reused",
         "message": messages.refused(rid, RefusalCode.KEY_REUSED, "the new key was already used by a certificate: "
                                     "make a new key").encode().decode()},
    ]
    good = json.loads(str(requests[0]["message"]))
    return {
        "keys": {name: {"type": _type(key), "pkcs8": _pkcs8(key), "spki": _spki(key)} for name, key in found.items()},
        "ca_certificate": ca_cert.public_bytes(serialization.Encoding.DER).hex(),
        "current_certificate": {"der": cert.public_bytes(serialization.Encoding.DER).hex(),
                                "sha256": messages.certificate_sha256(cert), "serial": format(cert.serial_number, "x")},
        "requests": requests,
        "confirms": [{"name": "confirm-p256", "key": "new_p256", "device_id": DEVICE,
                      "request_id": confirm.request_id.hex(), "timestamp": confirm.timestamp, "serial": serial,
                      "signed": confirm.signed.hex(), "signature": confirm.signature.hex(),
                      "message": confirm.encode().decode()}],
        "responses": responses,
        "order": {"serial": format(cert.serial_number, "x"),
                  "message": messages.RotateOrder(format(cert.serial_number, "x"),
                                                  "2025-11-30T10:00:00.000000Z").encode().decode()},
        "invalid": _invalid(good),
    }


def _type(key: PrivateKeyTypes) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return "p384" if key.curve.key_size >= 384 else "p256"


def _invalid(good: dict[str, Any]) -> list[dict[str, Any]]:
    def variant(name: str, error: RefusalCode, answered: bool = True, **changes: Any) -> dict[str, Any]:
        data = dict(good)
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        return {"name": name, "message": json.dumps(data, separators=(",", ":")), "error": error.value,
                "answered": answered}

    non_canonical = base64.b64encode(b"\x00\x00").decode()[:-2] + "B="  # "AAB=": decodes, but not the one encoding
    return [
        variant("version-2", RefusalCode.BAD_REQUEST, v=2),
        variant("unknown-type", RefusalCode.BAD_REQUEST, type="grant"),
        variant("unknown-field", RefusalCode.BAD_REQUEST, extra=1),
        variant("missing-csr", RefusalCode.BAD_REQUEST, csr=None),
        variant("device-id-with-slash", RefusalCode.BAD_REQUEST, device_id="a/b"),
        variant("timestamp-as-text", RefusalCode.BAD_REQUEST, timestamp=str(TIMESTAMP)),
        variant("certificate-upper-case", RefusalCode.BAD_REQUEST, certificate=good["certificate"].upper()),
        variant("csr-not-canonical-base64", RefusalCode.BAD_REQUEST, csr=non_canonical),
        variant("signature-missing", RefusalCode.BAD_SIGNATURE, signature=None),
        variant("signature-empty", RefusalCode.BAD_SIGNATURE, signature=""),
        variant("request-id-15-bytes", RefusalCode.BAD_REQUEST, False, request_id=base64.b64encode(bytes(15)).decode()),
        {"name": "not-json", "message": "renew please", "error": RefusalCode.BAD_REQUEST.value, "answered": False},
    ]
