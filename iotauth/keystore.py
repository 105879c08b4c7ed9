"""Where CA keys come from: a key URI, and the secret that unlocks it.

:mod:`iotauth.pki.signer` parses key URIs and wraps token keys, purely;
this module does the I/O around them -- reading key files, reading a PIN from
a ``pin-source`` file or the environment, choosing the PKCS#11 module -- and
hands ``pkcs11:`` keys to :mod:`iotauth.hsm`. It is the one place that knows
where key secrets may come from:

* ``$IOTAUTH_CA_PASSPHRASE``: the passphrase of ``file:`` CA keys (optional);
* ``$IOTAUTH_PKCS11_PIN`` or the URI's ``pin-source=FILE``: a token's user PIN;
  never the command line, never ``iotauth.toml`` (``pin-value`` is refused);
* ``$IOTAUTH_ROOT_PASSPHRASE`` or ``--root-passphrase-file``: the passphrase of
  an offline root key exported by ``init --offline-root``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from iotauth.errors import KeyUriError, PkiError
from iotauth.files import write_secret
from iotauth.pki.keys import PrivateKey, load_private_key
from iotauth.pki.signer import FileKeyUri, Pkcs11Uri, keys_match, parse_key_uri

if TYPE_CHECKING:  # the binding (python-pkcs11) is imported only when a token key is used: ~0.1 s at startup
    from iotauth.hsm import TokenAccess

PASSPHRASE_ENV = "IOTAUTH_CA_PASSPHRASE"  # noqa: S105 - the variable names, not secrets
PIN_ENV = "IOTAUTH_PKCS11_PIN"
ROOT_PASSPHRASE_ENV = "IOTAUTH_ROOT_PASSPHRASE"  # noqa: S105
MIN_ROOT_PASSPHRASE = 12
ROOT_KDF_ITERATIONS = 600_000
_MAX_SECRET_FILE = 4096


@dataclass(frozen=True)
class KeyPlace:
    """How to resolve a key URI: relative ``file:`` paths against ``home``; ``pkcs11:`` without a module path
    through ``pkcs11_module`` (``[ca] pkcs11_module``)."""

    home: Path
    pkcs11_module: str | None = None


def ca_passphrase() -> bytes | None:
    """The passphrase of ``file:`` CA keys from ``$IOTAUTH_CA_PASSPHRASE``, if set."""
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def open_key(uri_text: str, place: KeyPlace, *, what: str, expected: PublicKeyTypes | None = None) -> PrivateKey:
    """Load the key ``uri_text`` names, and check it is the private half of ``expected`` (a CA certificate's key).

    A ``file:`` key is read and decrypted with ``$IOTAUTH_CA_PASSPHRASE``; a
    ``pkcs11:`` key stays on its token and is proven usable with one signature.
    """
    uri = parse_key_uri(uri_text)
    if isinstance(uri, FileKeyUri):
        path = resolve_file(uri, place)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from exc
        key = load_private_key(data, ca_passphrase(), f"{what} {path}")
    else:
        from iotauth import hsm

        public = expected if isinstance(expected, ec.EllipticCurvePublicKey) else None
        key = hsm.open_token_key(token_access(uri, place), public)
    if expected is not None and not keys_match(key, expected):
        raise PkiError(f"{what} at {uri} is not the key of its certificate; check the key URI in iotauth.toml")
    return key


def create_token_key(uri_text: str, place: KeyPlace, key_type: str) -> tuple[PrivateKey, bool]:
    """Create (or adopt, if it exists) the ``pkcs11:`` key ``uri_text`` names; returns (key, adopted)."""
    uri = parse_key_uri(uri_text)
    if not isinstance(uri, Pkcs11Uri):
        raise KeyUriError(f"{uri_text!r}: a CA key created on a token needs a pkcs11: URI")
    from iotauth import hsm

    return hsm.create_token_key(token_access(uri, place), key_type)


def resolve_file(uri: FileKeyUri, place: KeyPlace) -> Path:
    path = Path(uri.path).expanduser()
    return path if path.is_absolute() else place.home / path


def token_access(uri: Pkcs11Uri, place: KeyPlace) -> TokenAccess:
    from iotauth.hsm import TokenAccess

    module = uri.module_path or place.pkcs11_module
    if not module:
        raise KeyUriError(
            f"{uri}: no PKCS#11 module; add ?module-path=/path/to/module.so to the URI or set [ca] pkcs11_module"
        )
    return TokenAccess(module, uri, token_pin(uri))


def token_pin(uri: Pkcs11Uri) -> str | None:
    """The user PIN: the URI's ``pin-source`` file if it names one, else ``$IOTAUTH_PKCS11_PIN``, else None."""
    if uri.pin_source is not None:  # a path, file:/path or file:///path
        source = uri.pin_source
        source = source[len("file://"):] if source.startswith("file:///") else source.removeprefix("file:")
        return read_secret_file(Path(source), "pin-source").decode("utf-8").strip("\r\n")
    value = os.environ.get(PIN_ENV)
    return value if value else None


def read_secret_file(path: Path, what: str) -> bytes:
    """A PIN or passphrase file: refused if other users may read it (like ssh refuses a readable key)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise PkiError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o007:
            raise PkiError(f"{what} {path} is readable by other users (mode {info.st_mode & 0o777:o}); chmod 600 it")
        if info.st_size > _MAX_SECRET_FILE:
            raise PkiError(f"{what} {path} is too large to be a PIN or passphrase")
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from exc


# -- the offline root ------------------------------------------------------------------------


def root_passphrase(passphrase_file: Path | None) -> bytes:
    """The offline root's passphrase: ``passphrase_file`` if given, else ``$IOTAUTH_ROOT_PASSPHRASE``."""
    if passphrase_file is not None:
        value = read_secret_file(passphrase_file, "root passphrase file").rstrip(b"\r\n")
    else:
        value = os.environ.get(ROOT_PASSPHRASE_ENV, "").encode()
    if not value:
        raise PkiError(f"the offline root key needs a passphrase: set {ROOT_PASSPHRASE_ENV} or --root-passphrase-file")
    if len(value) < MIN_ROOT_PASSPHRASE:
        raise PkiError(f"the root passphrase must be at least {MIN_ROOT_PASSPHRASE} characters")
    return value


def export_root_key(key: PrivateKey, path: Path, passphrase: bytes, home: Path) -> Path:
    """Write the root key, encrypted, to ``path`` (mode 0600, never overwriting), which must be outside the home."""
    target = path.expanduser().absolute()
    if target.resolve().is_relative_to(home.resolve()):
        raise PkiError(f"--root-key-out {path} is inside the home {home}: the offline root key must leave it")
    write_secret(target, encrypted_pkcs8(key, passphrase))
    return target


def encrypted_pkcs8(key: PrivateKey, passphrase: bytes, iterations: int = ROOT_KDF_ITERATIONS) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY`` (PKCS#8, PBES2: PBKDF2-HMAC-SHA256 with ``iterations``, AES-256-CBC).

    ``cryptography``'s own PKCS#8 encryption uses 2,048 PBKDF2 iterations; a root
    key stored off-site for years deserves the 600,000 that OWASP recommends for
    PBKDF2-HMAC-SHA256. The structure is built with asn1crypto; OpenSSL and
    ``cryptography`` read it as any encrypted PKCS#8 key.
    """
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    secret = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padder.update(der) + padder.finalize()) + encryptor.finalize()
    info = asn1_keys.EncryptedPrivateKeyInfo({
        "encryption_algorithm": {
            "algorithm": "pbes2",
            "parameters": {
                "key_derivation_func": {
                    "algorithm": "pbkdf2",
                    "parameters": {"salt": asn1_core.OctetString(salt), "iteration_count": iterations,
                                   "prf": {"algorithm": "sha256"}},
                },
                "encryption_scheme": {"algorithm": "aes256_cbc", "parameters": iv},
            },
        },
        "encrypted_data": sealed,
    })
    return bytes(asn1_pem.armor("ENCRYPTED PRIVATE KEY", info.dump()))


def load_root_key(
    reference: str, place: KeyPlace, passphrase_file: Path | None, expected: PublicKeyTypes
) -> PrivateKey:
    """The root key for a ceremony: a key URI (``pkcs11:`` / ``file:``), or the encrypted file ``init`` exported."""
    if reference.startswith(("pkcs11:", "file:")):
        return open_key(reference, place, what="root CA key", expected=expected)
    path = Path(reference).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read the root key {path}: {exc.strerror}") from exc
    key = load_private_key(data, root_passphrase(passphrase_file), f"root key {path}", variable=ROOT_PASSPHRASE_ENV)
    if not keys_match(key, expected):
        raise PkiError(f"{path} is not the key of this home's root CA (ca/root.crt)")
    return key
