"""The signer seam: CA key URIs, and a key object whose private half lives on a token.

A CA key is named by a URI, recorded in ``iotauth.toml`` (``[ca]``):

* ``file:ca/issuing.key`` (relative to the home) or ``file:///abs/path.key``: a PEM
  file, encrypted or not -- the behaviour iotauth always had;
* ``pkcs11:token=iotauth;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so``:
  a private key on a PKCS#11 token (RFC 7512). The PIN comes from ``pin-source``
  (a file) or the environment, never from the URI itself (``pin-value`` is
  refused: the URI is stored in a configuration file).

This module parses those URIs and provides :class:`TokenKey`, an
``EllipticCurvePrivateKey`` whose ``sign()`` hands a digest to a
:class:`DigestSigner` (a token session). ``cryptography`` (>= 50) calls
``sign()`` on such a subclass when it signs certificates, CRLs and OCSP
responses, so :class:`~iotauth.pki.ca.CertificateAuthority` uses a token key
exactly like a key loaded from a file. Opening the token (the binding, the
module, the PIN) is done above pki, in :mod:`iotauth.keystore` and
:mod:`iotauth.hsm`: pki stays pure and imports neither.

Only EC keys (P-256, P-384) are supported on tokens, signed with the raw
``CKM_ECDSA`` mechanism over a digest computed here: every PKCS#11 token that
does EC offers it (many, YubiKeys among them, offer no hash-and-sign variant).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_to_bytes

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.utils import Buffer

from iotauth.errors import KeyUriError, PkiError, TokenError

OFFLINE = "offline"
"""The ``root_key_uri`` of a home whose root key was exported at ``init --offline-root``."""

# The RFC 7512 attributes iotauth enforces: path attributes (";"-separated), query attributes ("&"-separated).
# Any other one (library-*, slot-description, module-name, x-...) is refused: an attribute that is read but not
# enforced would let a URI match another token than the operator meant.
_PATH_ATTRIBUTES = frozenset({"token", "manufacturer", "serial", "model", "slot-id", "object", "type", "id"})
_QUERY_ATTRIBUTES = frozenset({"pin-source", "module-path"})


@dataclass(frozen=True)
class FileKeyUri:
    """``file:PATH``: a PEM private key; a relative ``path`` is relative to the home."""

    path: str

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 ``pkcs11:`` URI naming one private key on one token (percent-decoded values)."""

    text: str
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None
    module_path: str | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def names_a_key(self) -> bool:
        return self.object is not None or self.id is not None

    def describe(self) -> str:
        """The key as a person would name it: ``object 'issuing' on token 'iotauth'`` (no PIN material)."""
        what = f"object {self.object!r}" if self.object is not None else f"id {self.id.hex() if self.id else ''}"
        return f"{what} on token {self.token or self.serial or '(any)'!r}"


KeyUri = FileKeyUri | Pkcs11Uri


def parse_key_uri(text: str) -> KeyUri:
    """Parse a CA key URI, or raise :class:`KeyUriError` saying what is wrong.

    A ``pkcs11:`` URI must name its key (``object`` and/or ``id``), may carry
    only ``type=private``, and must not carry a PIN (``pin-value``): URIs are
    written to ``iotauth.toml`` and shown in logs. Unknown attributes are
    refused rather than ignored, so a typo cannot silently widen the match.
    """
    text = text.strip()
    if text.startswith("file:"):
        return _parse_file(text)
    if text.startswith("pkcs11:"):
        return _parse_pkcs11(text)
    raise KeyUriError(f"key URI {_shown(text)!r} must start with 'file:' or 'pkcs11:'")


def _shown(text: str) -> str:
    """A URI as it may be printed: a ``pin-value`` is cut out before the text reaches any message."""
    return text.split("pin-value=", 1)[0] + ("pin-value=..." if "pin-value=" in text else "")


def _parse_file(text: str) -> FileKeyUri:
    rest = text[len("file:"):]
    if rest.startswith("//"):  # RFC 8089: file://[host]/path; only the local host makes sense here
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise KeyUriError(f"key URI {text!r}: only local files (file:///path) can hold a CA key")
        rest = "/" + path
    path = unquote_to_bytes(rest).decode("utf-8", "replace")
    if not path or "\x00" in path:
        raise KeyUriError(f"key URI {text!r} names no file")
    return FileKeyUri(path)


def _parse_pkcs11(text: str) -> Pkcs11Uri:
    body = text[len("pkcs11:"):]
    path_part, _, query_part = body.partition("?")
    values: dict[str, str | bytes] = {}
    for part, allowed, separator in ((path_part, _PATH_ATTRIBUTES, ";"), (query_part, _QUERY_ATTRIBUTES, "&")):
        for item in filter(None, part.split(separator)):
            name, equals, raw = item.partition("=")
            if not equals:
                raise KeyUriError(f"key URI {_shown(text)!r}: attribute {name!r} has no value")
            if name == "pin-value":
                raise KeyUriError(
                    "a PIN in the key URI (pin-value) would be written to iotauth.toml; "
                    "use pin-source=FILE or $IOTAUTH_PKCS11_PIN"
                )
            if name not in allowed:
                raise KeyUriError(
                    f"key URI {_shown(text)!r}: attribute {name!r} is not supported "
                    f"(use {', '.join(sorted(allowed))})"
                )
            if name in values:
                raise KeyUriError(f"key URI {_shown(text)!r}: attribute {name!r} appears twice")
            decoded = unquote_to_bytes(raw)
            values[name] = decoded if name == "id" else decoded.decode("utf-8", "replace")
    kind = _text(values.get("type"))
    if kind not in (None, "private"):
        raise KeyUriError(f"key URI {text!r}: a CA key URI names a private key (type=private), not type={kind}")
    slot = values.get("slot-id")
    if slot is not None and not str(slot).isdigit():
        raise KeyUriError(f"key URI {text!r}: slot-id must be a decimal number")
    uri = Pkcs11Uri(
        text=text,
        token=_text(values.get("token")),
        manufacturer=_text(values.get("manufacturer")),
        serial=_text(values.get("serial")),
        model=_text(values.get("model")),
        slot_id=int(str(slot)) if slot is not None else None,
        object=_text(values.get("object")),
        id=_bytes(values.get("id")),
        pin_source=_text(values.get("pin-source")),
        module_path=_text(values.get("module-path")),
    )
    if not uri.names_a_key:
        raise KeyUriError(f"key URI {text!r} must name its key with object=LABEL and/or id=%XX...")
    return uri


def _text(value: str | bytes | None) -> str | None:
    return value if isinstance(value, str) else None


def _bytes(value: str | bytes | None) -> bytes | None:
    return value if isinstance(value, bytes) else None


class DigestSigner(Protocol):
    """What a token offers :class:`TokenKey`: raw ECDSA (``r || s``) over a digest, and a name for messages."""

    @property
    def description(self) -> str: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


class TokenKey(ec.EllipticCurvePrivateKey):
    """An EC private key that never leaves its token: ``sign()`` asks the token, everything else refuses.

    Every signature is verified with the public key before it is returned, so
    a token that answers with a wrong key or a faulty signature can never put
    an unverifiable certificate into the registry or a device's flash.
    ``private_bytes`` raises, so no code path can write this key to a file.
    """

    def __init__(self, signer: DigestSigner, public_key: ec.EllipticCurvePublicKey) -> None:
        self._signer = signer
        self._public = public_key
        self._lock = threading.Lock()  # one operation at a time on a session (CKR_OPERATION_ACTIVE otherwise)

    @property
    def description(self) -> str:
        return self._signer.description

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise PkiError(f"{self.description}: only ECDSA signatures are supported, not {signature_algorithm!r}")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(bytes(data))
            digest = hasher.finalize()
        with self._lock:
            raw = self._signer.sign_digest(digest)
        size = (self.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise TokenError(f"{self.description}: the token returned a {len(raw)}-byte signature, not {2 * size}")
        signature = utils.encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
        try:
            self._public.verify(signature, data, signature_algorithm)
        except InvalidSignature:
            raise TokenError(
                f"{self.description}: the token's signature does not verify with its public key "
                "(wrong key object, or a faulty token); nothing was signed"
            ) from None
        return signature

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise PkiError(f"{self.description}: a CA key on a token signs; it does no key agreement")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise PkiError(f"{self.description}: the private key stays on the token")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise PkiError(f"{self.description}: the private key stays on the token and cannot be exported")

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenKey:
        return self


def keys_match(private_key: object, public_key: object) -> bool:
    """Whether ``private_key`` is the private half of ``public_key`` (compared as SubjectPublicKeyInfo)."""
    own = getattr(private_key, "public_key", None)
    if own is None or not hasattr(public_key, "public_bytes"):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(own().public_bytes(*spki) == public_key.public_bytes(*spki))
