"""The objects a device stores, as they travel in PUT_* chunks, and the PROVE signature.

* KEY object (PUT_KEY): a PKCS#8 DER private key (host-generated-key mode).
* CERT object (PUT_CERT): ``u8 count`` then ``count`` times ``u16 length | DER``,
  the device certificate first, then its CA chain up to (not including) the
  trust anchor, which travels in CONFIG.
* CONFIG object (PUT_CONFIG): TLV records ``u8 tag | u16 length | value`` in
  ascending tag order; tags 0x80 and above are vendor extensions a device may
  ignore.
* PROVE: the device signs ``b"iotauth-prove-v1\\x00" + nonce``; the context
  string keeps the signing oracle from ever signing a TLS transcript or a CSR.

Pure functions over bytes, shared by the station and the emulator.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from iotauth.errors import InvalidIdentity, ProtocolError
from iotauth.identity import validate_device_id
from iotauth.provisioning.messages import KeyType, SigAlg

MAX_KEY_OBJECT = 512
MAX_CERT_OBJECT = 8192
MAX_CONFIG_OBJECT = 4096
MAX_BUNDLE_CERTS = 4
PROVE_CONTEXT = b"iotauth-prove-v1\x00"
TAG_DEVICE_ID = 0x01
TAG_BROKER_HOST = 0x02
TAG_BROKER_PORT = 0x03
TAG_TRUST_ANCHOR = 0x04
VENDOR_TAGS = 0x80  # 0x80-0xFF: vendor extensions; 0x05-0x7F are reserved and refused
_HOST = re.compile(r"[A-Za-z0-9.:-]{1,253}", re.ASCII)
ZERO_HASH = bytes(32)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad-payload", message)


def encode_cert_bundle(ders: Sequence[bytes]) -> bytes:
    """The CERT object: the device certificate, then the CA chain, each length-prefixed."""
    if not (1 <= len(ders) <= MAX_BUNDLE_CERTS):
        raise _bad(f"a certificate bundle holds 1-{MAX_BUNDLE_CERTS} certificates")
    out = bytearray([len(ders)])
    for der in ders:
        if not (1 <= len(der) <= 0xFFFF):
            raise _bad("certificate too large for the bundle")
        out += struct.pack(">H", len(der)) + der
    if len(out) > MAX_CERT_OBJECT:
        raise _bad(f"certificate bundle of {len(out)} bytes exceeds {MAX_CERT_OBJECT}")
    return bytes(out)


def decode_cert_bundle(data: bytes) -> tuple[bytes, ...]:
    """Split a CERT object into DER certificates (device certificate first)."""
    if not data:
        raise _bad("empty certificate bundle")
    count, pos, ders = data[0], 1, []
    if not (1 <= count <= MAX_BUNDLE_CERTS):
        raise _bad(f"certificate bundle count {count} is outside 1-{MAX_BUNDLE_CERTS}")
    for _ in range(count):
        if pos + 2 > len(data):
            raise _bad("certificate bundle truncated")
        (length,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if length == 0 or pos + length > len(data):
            raise _bad("certificate bundle truncated")
        ders.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise _bad("trailing bytes after the certificate bundle")
    return tuple(ders)


@dataclass(frozen=True)
class DeviceConfig:
    """What the device needs to reach the broker as itself."""

    device_id: str
    broker_host: str
    broker_port: int
    trust_anchors: tuple[bytes, ...]

    def encode(self) -> bytes:
        records = [
            (TAG_DEVICE_ID, self.device_id.encode("ascii")),
            (TAG_BROKER_HOST, self.broker_host.encode("ascii")),
            (TAG_BROKER_PORT, struct.pack(">H", self.broker_port)),
            *((TAG_TRUST_ANCHOR, der) for der in self.trust_anchors),
        ]
        out = b"".join(struct.pack(">BH", tag, len(value)) + value for tag, value in records)
        if len(out) > MAX_CONFIG_OBJECT:
            raise _bad(f"config of {len(out)} bytes exceeds {MAX_CONFIG_OBJECT}")
        return out

    @classmethod
    def decode(cls, data: bytes) -> DeviceConfig:
        values: dict[int, list[bytes]] = {}
        pos, last_tag = 0, 0
        while pos < len(data):
            if pos + 3 > len(data):
                raise _bad("config record truncated")
            tag, length = struct.unpack_from(">BH", data, pos)
            pos += 3
            if pos + length > len(data):
                raise _bad("config record truncated")
            if tag < last_tag or tag == 0:
                raise _bad("config tags must be non-zero and in non-decreasing order")
            if TAG_TRUST_ANCHOR < tag < VENDOR_TAGS:
                raise _bad(f"config tag 0x{tag:02X} is reserved")
            last_tag = tag
            values.setdefault(tag, []).append(data[pos : pos + length])
            pos += length
        for tag in (TAG_DEVICE_ID, TAG_BROKER_HOST, TAG_BROKER_PORT):
            if len(values.get(tag, [])) != 1:
                raise _bad(f"config needs exactly one record with tag 0x{tag:02X}")
        if not values.get(TAG_TRUST_ANCHOR):
            raise _bad("config needs at least one trust anchor")
        port = values[TAG_BROKER_PORT][0]
        if len(port) != 2 or port == b"\x00\x00":
            raise _bad("broker port must be 2 bytes, 1-65535")
        device_id = values[TAG_DEVICE_ID][0].decode("latin-1")
        host = values[TAG_BROKER_HOST][0].decode("latin-1")
        try:
            validate_device_id(device_id)
        except InvalidIdentity:
            raise _bad("device id must be 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -") from None
        if _HOST.fullmatch(host) is None:
            raise _bad("broker host must be 1-253 characters from A-Z a-z 0-9 . - : (a name or an IP address)")
        return cls(device_id, host, struct.unpack(">H", port)[0], tuple(values[TAG_TRUST_ANCHOR]))


def spki_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def wire_key_type(public_key: PublicKeyTypes) -> KeyType | None:
    """The protocol's :class:`KeyType` for ``public_key``, or None if devices cannot hold that kind of key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": KeyType.P256, "secp384r1": KeyType.P384}.get(public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    return None


def generate_key(key_type: KeyType) -> PrivateKeyTypes:
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP384R1() if key_type is KeyType.P384 else ec.SECP256R1())


def prove_message(nonce: bytes) -> bytes:
    """The exact bytes a device signs for PROVE."""
    return PROVE_CONTEXT + nonce


def sign_proof(private_key: PrivateKeyTypes, nonce: bytes) -> tuple[SigAlg, bytes]:
    """Device side of PROVE: ECDSA (DER) with SHA-256/384 by curve, or pure Ed25519."""
    message = prove_message(nonce)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return SigAlg.ED25519, private_key.sign(message)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if private_key.curve.name == "secp384r1":
            return SigAlg.ECDSA_SHA384, private_key.sign(message, ec.ECDSA(hashes.SHA384()))
        return SigAlg.ECDSA_SHA256, private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    raise _bad(f"cannot sign with {type(private_key).__name__}")


def verify_proof(public_key: PublicKeyTypes, algorithm: SigAlg, signature: bytes, nonce: bytes) -> bool:
    """Station side of PROVE: does ``signature`` over the nonce verify with ``public_key``?

    The algorithm must be the one the key type implies, so a device cannot
    pick a weaker hash than its curve calls for.
    """
    message = prove_message(nonce)
    expected = {KeyType.P256: SigAlg.ECDSA_SHA256, KeyType.P384: SigAlg.ECDSA_SHA384}
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            if algorithm is not SigAlg.ED25519:
                return False
            public_key.verify(signature, message)
            return True
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            kind = wire_key_type(public_key)
            if kind is None or algorithm is not expected.get(kind):
                return False
            digest = hashes.SHA384() if algorithm is SigAlg.ECDSA_SHA384 else hashes.SHA256()
            public_key.verify(signature, message, ec.ECDSA(digest))
            return True
    except (InvalidSignature, ValueError):
        return False
    return False
