"""Key types, key policy and private-key serialisation.

A key's type is named the way profiles name it (``p256``, ``p384``,
``ed25519``, ``rsa``) so one vocabulary runs from ``iotauth.toml`` to the
device's INFO capabilities.
"""

from __future__ import annotations

from collections.abc import Collection

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes

from iotauth.errors import CaLocked, CsrRejected, PkiError

PrivateKey = CertificateIssuerPrivateKeyTypes
_CURVES: dict[str, ec.EllipticCurve] = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}


def key_type_name(public_key: PublicKeyTypes) -> str:
    """Name the type of ``public_key`` in profile vocabulary, or raise :class:`CsrRejected`."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for name, curve in _CURVES.items():
            if public_key.curve.name == curve.name:
                return name
        raise CsrRejected(f"elliptic curve {public_key.curve.name} is not supported; use P-256 or P-384")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    raise CsrRejected(f"key algorithm {type(public_key).__name__} is not supported")


def curve_type(key: ec.EllipticCurvePrivateKey) -> str:
    """``p256`` / ``p384`` for an EC key (the name a curve has in profiles and in ``--key-type``)."""
    for name, curve in _CURVES.items():
        if key.curve.name == curve.name:
            return name
    return key.curve.name


def check_key_allowed(public_key: PublicKeyTypes, allowed: Collection[str], rsa_min_bits: int = 2048) -> str:
    """Enforce a profile's key policy; return the key type name."""
    kind = key_type_name(public_key)
    if kind not in allowed:
        raise CsrRejected(f"key type {kind} is not allowed by this profile (allowed: {', '.join(sorted(allowed))})")
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < max(rsa_min_bits, 2048):
        raise CsrRejected(f"RSA key of {public_key.key_size} bits is too small; at least {rsa_min_bits} required")
    return kind


def generate_private_key(kind: str = "p256") -> PrivateKey:
    """Create a new private key of the named type (used for the CA and host-keygen devices)."""
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind])
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise PkiError(f"unknown key type {kind!r}; choose one of p256, p384, ed25519, rsa")


def private_key_pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM, encrypted with the best available scheme when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_private_key(
    data: bytes, passphrase: bytes | None, what: str, variable: str = "IOTAUTH_CA_PASSPHRASE"
) -> PrivateKey:
    """Load a PEM private key, turning passphrase problems into :class:`CaLocked` naming ``variable``."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise CaLocked(f"{what} is encrypted; set {variable} to unlock it") from exc
        raise CaLocked(f"{what} is not encrypted but {variable} is set; unset it") from exc
    except ValueError as exc:
        if passphrase is not None:
            raise CaLocked(f"wrong {variable} for {what} (or the key file is damaged)") from exc
        raise PkiError(f"{what} is not a valid PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{what} holds an unsupported key type {type(key).__name__}")
    return key
