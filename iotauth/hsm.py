"""PKCS#11 tokens, through python-pkcs11: find the token, log in, find or create the key, sign.

This is the only module that imports the binding. It turns a
:class:`~iotauth.pki.signer.Pkcs11Uri` plus a module path and a PIN (looked up
by :mod:`iotauth.keystore`) into a :class:`~iotauth.pki.signer.TokenKey`, and
every failure of the module or the token into one line that names the token
or the object: a wrong PIN, a missing token, a missing object, a refused
mechanism.

PKCS#11 logs an application in per token, not per session, so one logged-in
session is kept per (module, token) and shared by every key on that token. A
session that the token drops (removed and re-inserted, restarted daemon) is
reopened once, transparently, with the same PIN. A token that is not found
makes the module rescan its slots once (``C_Finalize`` + ``C_Initialize``):
modules such as SoftHSM2 list only the tokens present when they were loaded.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from iotauth.errors import MechanismRefused, TokenError, TokenLoginFailed, TokenMissing, TokenObjectMissing
from iotauth.pki.signer import Pkcs11Uri, TokenKey

_CURVE_OIDS = {"p256": "1.2.840.10045.3.1.7", "p384": "1.3.132.0.34"}
_CURVES = {"secp256r1": "p256", "secp384r1": "p384"}
_SESSION_LOST = (
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.KeyHandleInvalid,
)
_REFUSED = (
    pkcs11.exceptions.MechanismInvalid,
    pkcs11.exceptions.MechanismParamInvalid,
    pkcs11.exceptions.FunctionNotSupported,
    pkcs11.exceptions.KeyTypeInconsistent,
    pkcs11.exceptions.FunctionRejected,
)


@dataclass(frozen=True)
class TokenAccess:
    """Everything needed to reach one key: the module, the URI and the PIN (None: the token needs none)."""

    module: str
    uri: Pkcs11Uri
    pin: str | None

    @property
    def description(self) -> str:
        return f"{self.uri.describe()} (module {self.module})"


class _Connection:
    """One logged-in session on one token, shared by its keys; reopened once if the token drops it."""

    def __init__(self, access: TokenAccess, token: pkcs11.Token) -> None:
        self.access = access
        self.token = token
        self.lock = threading.Lock()
        self.session = _log_in(token, access)

    def reopen(self) -> None:
        """A new session after the token dropped this one; rescan the slots only if the token is gone."""
        with contextlib.suppress(pkcs11.PKCS11Error):
            self.session.close()
        try:
            self.session = _log_in(self.token, self.access)
        except TokenError:
            library = _load(self.access.module)
            _rescan(library, self.access.module)
            self.token = _find_token(library, self.access)
            self.session = _log_in(self.token, self.access)


_CONNECTIONS: dict[str, dict[bytes, _Connection]] = {}
_GUARD = threading.Lock()


def _connect(access: TokenAccess) -> _Connection:
    with _GUARD:
        library = _load(access.module)
        token = _find_token(library, access)
        per_module = _CONNECTIONS.setdefault(access.module, {})
        connection = per_module.get(token.serial)
        if connection is None:
            connection = per_module[token.serial] = _Connection(access, token)
        return connection


def _load(module: str) -> Any:
    try:
        return pkcs11.lib(module)
    except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:
        raise TokenMissing(f"cannot load PKCS#11 module {module}: {_reason(exc)}") from exc


def _rescan(library: Any, module: str) -> None:
    """``C_Finalize`` + ``C_Initialize``: the module lists tokens again. Every session on it ends (its keys
    reopen theirs on next use)."""
    try:
        library.reinitialize()
    except pkcs11.PKCS11Error as exc:
        raise TokenMissing(f"PKCS#11 module {module} failed to reinitialise: {_reason(exc)}") from exc


def _find_token(library: Any, access: TokenAccess) -> pkcs11.Token:
    matches = list(_matching_tokens(library, access.uri))
    if not matches:  # the module may list only the tokens that were present when it was loaded
        _rescan(library, access.module)
        matches = list(_matching_tokens(library, access.uri))
    if len(matches) == 1:
        return matches[0]
    present = sorted(repr(t.label) for t in _present_tokens(library))
    if not matches:
        raise TokenMissing(
            f"no token matches {_token_filter(access.uri)} in PKCS#11 module {access.module} "
            f"(tokens present: {', '.join(present) or 'none'})"
        )
    raise TokenMissing(
        f"{len(matches)} tokens match {_token_filter(access.uri)} in PKCS#11 module {access.module}; "
        "add serial=... to the key URI"
    )


def _present_tokens(library: Any) -> Iterator[pkcs11.Token]:
    for slot in library.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except pkcs11.PKCS11Error:
            continue
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            yield token


def _matching_tokens(library: Any, uri: Pkcs11Uri) -> Iterator[pkcs11.Token]:
    for token in _present_tokens(library):
        if uri.slot_id is not None and token.slot.slot_id != uri.slot_id:
            continue
        wanted = {"token": uri.token, "manufacturer": uri.manufacturer, "serial": uri.serial, "model": uri.model}
        actual = {
            "token": token.label,
            "manufacturer": token.manufacturer_id,
            "serial": token.serial.decode("ascii", "replace"),
            "model": token.model,
        }
        if all(value is None or actual[name].strip() == value for name, value in wanted.items()):
            yield token


def _token_filter(uri: Pkcs11Uri) -> str:
    parts = {"token": uri.token, "manufacturer": uri.manufacturer, "serial": uri.serial, "model": uri.model,
             "slot-id": uri.slot_id}
    return ";".join(f"{name}={value}" for name, value in parts.items() if value is not None) or "(any token)"


def _log_in(token: pkcs11.Token, access: TokenAccess) -> pkcs11.Session:
    name = f"token {token.label.strip()!r}"
    if access.pin is None:
        if token.flags & TokenFlag.LOGIN_REQUIRED:
            raise TokenLoginFailed(
                f"{name} needs its user PIN: set IOTAUTH_PKCS11_PIN or add pin-source=FILE to the key URI"
            )
        return _open(token, None, name)
    try:
        return _open(token, access.pin, name)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return _open(token, None, name)  # this process is logged in already (the login is per token)


def _open(token: pkcs11.Token, pin: str | None, name: str) -> pkcs11.Session:
    try:
        return token.open(rw=True, user_pin=pin)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        raise
    except pkcs11.exceptions.PinIncorrect as exc:
        raise TokenLoginFailed(f"wrong PIN for {name} (check IOTAUTH_PKCS11_PIN or the pin-source file)") from exc
    except pkcs11.exceptions.PinLocked as exc:
        raise TokenLoginFailed(f"the user PIN of {name} is locked after too many wrong attempts") from exc
    except (pkcs11.exceptions.PinLenRange, pkcs11.exceptions.PinInvalid) as exc:
        raise TokenLoginFailed(f"the PIN for {name} has the wrong length or characters") from exc
    except pkcs11.exceptions.UserPinNotInitialized as exc:
        raise TokenLoginFailed(f"{name} has no user PIN yet; initialise it first") from exc
    except pkcs11.PKCS11Error as exc:
        raise TokenError(f"cannot open a session on {name}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- keys -----------------------------------------------------------------------------------


class _Signer:
    """The :class:`~iotauth.pki.signer.DigestSigner` of one key: raw CKM_ECDSA in the shared session."""

    def __init__(self, connection: _Connection, access: TokenAccess) -> None:
        self._connection = connection
        self._access = access
        self._key: Any = None  # a pkcs11 PrivateKey with SignMixin (the stubs do not say so)

    @property
    def description(self) -> str:
        return self._access.description

    def sign_digest(self, digest: bytes) -> bytes:
        with self._connection.lock:
            for attempt in (1, 2):
                try:
                    if self._key is None:
                        self._key = _private_key(self._connection.session, self._access)
                    return bytes(self._key.sign(digest, mechanism=Mechanism.ECDSA))
                except _SESSION_LOST as exc:
                    if attempt == 2:
                        raise TokenError(f"{self.description}: the token keeps dropping the session "
                                         f"({_reason(exc)})") from exc
                    self._key = None
                    self._connection.reopen()
                except _REFUSED as exc:
                    raise MechanismRefused(
                        f"{self.description}: the token refuses ECDSA signing (CKM_ECDSA) with this key: "
                        f"{_reason(exc)}"
                    ) from exc
                except pkcs11.PKCS11Error as exc:
                    raise TokenError(f"{self.description}: signing failed: {_reason(exc)}") from exc
        raise AssertionError("unreachable")


def _search(access: TokenAccess, object_class: ObjectClass) -> dict[Attribute, Any]:
    attributes: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if access.uri.object is not None:
        attributes[Attribute.LABEL] = access.uri.object
    if access.uri.id is not None:
        attributes[Attribute.ID] = access.uri.id
    return attributes


def _private_key(session: pkcs11.Session, access: TokenAccess) -> Any:
    found: list[Any] = list(session.get_objects(_search(access, ObjectClass.PRIVATE_KEY)))
    if not found:
        raise TokenObjectMissing(f"no private key {access.uri.describe()} (module {access.module})")
    if len(found) > 1:
        raise TokenObjectMissing(f"{len(found)} private keys match {access.uri.describe()}; add id=... to the URI")
    key = found[0]
    if key.key_type != KeyType.EC:
        raise MechanismRefused(
            f"{access.description} is a {KeyType(key.key_type).name} key; CA keys on a token must be EC "
            "(P-256 or P-384)"
        )
    return key


def _public_key(session: pkcs11.Session, access: TokenAccess, private: Any) -> ec.EllipticCurvePublicKey:
    search = _search(access, ObjectClass.PUBLIC_KEY)
    key_id = _attribute(private, Attribute.ID)
    if key_id:
        search = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
    found = list(session.get_objects(search))
    if len(found) != 1:
        raise TokenObjectMissing(
            f"{access.description}: found {len(found)} matching public key objects, need exactly one "
            "(iotauth reads the CA's public key from the token)"
        )
    loaded = serialization.load_der_public_key(encode_ec_public_key(found[0]))  # type: ignore[arg-type]
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name not in _CURVES:
        raise MechanismRefused(f"{access.description}: CA keys on a token must be EC P-256 or P-384")
    return loaded


def _attribute(obj: pkcs11.Object, attribute: Attribute) -> Any:
    try:
        return obj[attribute]
    except (pkcs11.PKCS11Error, KeyError, NotImplementedError):
        return None


def open_token_key(access: TokenAccess, expected: ec.EllipticCurvePublicKey | None = None) -> TokenKey:
    """The key ``access`` names, as a :class:`TokenKey`; proven usable by one signature before it is returned.

    ``expected`` (the public key of the CA certificate) is used when the token
    holds no public key object, and the proof signature is checked against it.
    """
    connection = _connect(access)
    with connection.lock:
        try:
            private = _private_key(connection.session, access)
            public = expected if expected is not None else _public_key(connection.session, access, private)
        except _SESSION_LOST:
            connection.reopen()
            private = _private_key(connection.session, access)
            public = expected if expected is not None else _public_key(connection.session, access, private)
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"{access.description}: {_reason(exc)}") from exc
    key = TokenKey(_Signer(connection, access), public)
    key.sign(b"iotauth: proof that the token signs with this key", ec.ECDSA(_hash(key)))
    return key


def _hash(key: TokenKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.key_size >= 384 else hashes.SHA256()


def create_token_key(access: TokenAccess, key_type: str) -> tuple[TokenKey, bool]:
    """Generate a non-extractable EC key pair on the token, or adopt the one the URI already names.

    Returns the key and whether it was adopted. An adopted key must be
    sensitive and non-extractable: a CA key that the token would export is
    not a key that never touches a disk.
    """
    if access.uri.object is None:
        raise TokenObjectMissing(f"{access.uri}: a key created on a token needs a label (object=...)")
    connection = _connect(access)
    with connection.lock:
        session = connection.session
        existing = list(session.get_objects(_search(access, ObjectClass.PRIVATE_KEY)))
        if existing:
            _check_protected(existing[0], access)
            adopted = True
        else:
            _generate(session, access, key_type)
            adopted = False
    return open_token_key(access), adopted


def _check_protected(key: pkcs11.Object, access: TokenAccess) -> None:
    if _attribute(key, Attribute.EXTRACTABLE) is True or _attribute(key, Attribute.SENSITIVE) is False:
        raise TokenError(
            f"{access.description} can be exported from the token (CKA_EXTRACTABLE or not CKA_SENSITIVE); "
            "iotauth adopts only CA keys the token keeps secret"
        )


def _generate(session: pkcs11.Session, access: TokenAccess, key_type: str) -> None:
    if key_type not in _CURVE_OIDS:
        raise MechanismRefused(f"CA keys on a token are EC P-256 or P-384, not {key_type}")
    key_id = access.uri.id if access.uri.id is not None else _new_id()
    try:
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_OIDS[key_type])}, local=True
        )
        parameters.generate_keypair(
            store=True,
            label=access.uri.object,
            id=key_id,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={
                Attribute.SIGN: True,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
    except _REFUSED as exc:
        raise MechanismRefused(
            f"{access.description}: the token refuses to generate an EC {key_type} key pair "
            f"(CKM_EC_KEY_PAIR_GEN): {_reason(exc)}"
        ) from exc
    except pkcs11.PKCS11Error as exc:
        raise TokenError(f"{access.description}: key generation failed: {_reason(exc)}") from exc


def _new_id() -> bytes:
    return os.urandom(8)
