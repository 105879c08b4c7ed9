"""Root ceremonies: what only the (offline) root key can do, done against a home.

The root key is brought to the station for the ceremony -- the encrypted file
``init --offline-root`` exported, or a ``pkcs11:`` URI of a token plugged in
for the occasion -- used in memory, and never written into the home.

* :func:`sign_issuing` -- a rollover: a new issuing CA (its key a file in
  ``ca/`` or on a token), signed by the root. The previous issuing CA moves to
  ``ca/previous/<serial>/`` and stays trusted -- by the broker, ``serve``'s
  authorizer and OCSP, and the exported Mosquitto configuration -- and keeps
  signing CRLs for its certificates until it expires, so devices holding
  certificates from either CA keep connecting. New certificates come from the
  new CA. Running brokers and services pick the change up when restarted.
* :func:`sign_arl` -- the root's CRL (an ARL) listing revoked issuing
  CAs; a previous issuing CA on it is no longer trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from iotauth import castore
from iotauth.authority import open_authority
from iotauth.certs import fingerprint, now_utc, serial_hex
from iotauth.config import Home, load_settings, registry_location
from iotauth.errors import IotAuthError, PkiError
from iotauth.keystore import KeyPlace, ca_passphrase, create_token_key, load_root_key
from iotauth.pki import hierarchy
from iotauth.pki.ca import CertificateAuthority, revoked_entry
from iotauth.pki.keys import PrivateKey, curve_type, generate_private_key
from iotauth.pki.ocsp import issue_responder
from iotauth.pki.signer import keys_match
from iotauth.registry import EventKind, Registry, open_registry
from iotauth.tomledit import record_ca_settings

REVOCATION_REASONS = {
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


@dataclass(frozen=True)
class Rollover:
    """A new issuing CA is in place; ``previous`` stays trusted until ``previous_expires``."""

    issuing_fingerprint: str
    issuing_serial: str
    issuing_key: str
    previous_fingerprint: str
    previous_serial: str
    previous_expires: str
    generation: int
    crl_error: str | None


@dataclass(frozen=True)
class RootCrl:
    number: int
    revoked: tuple[str, ...]
    next_update: str
    path: Path


async def sign_issuing(
    home: Home,
    root_key_ref: str,
    *,
    passphrase_file: Path | None,
    issuing_key_uri: str | None,
    actor: str,
    registry: str | None = None,
) -> Rollover:
    """Sign a new issuing CA with the root and make it current (see the module docstring)."""
    settings = load_settings(home)
    place = castore.key_place(home, settings)
    root = castore.read_certificate(home.root_cert)
    old = castore.read_certificate(home.issuing_cert)
    root_key = load_root_key(root_key_ref, place, passphrase_file, root.public_key())
    key_type = _key_type(old)
    key, key_file = _new_issuing_key(issuing_key_uri, place, key_type, settings.ca.issuing_key_uri, old)
    generation = _next_generation(home)
    now = now_utc()
    cert = hierarchy.sign_issuing_ca(root, root_key, key.public_key(), settings.trust_domain, generation, now)
    new_ca = CertificateAuthority(root, cert, key, settings.trust_domain, settings.crl_url, settings.ocsp_url)
    ocsp_key, ocsp_cert = issue_responder(new_ca, now)
    uri = castore.install_issuing(
        home, settings, castore.NewIssuing(cert, key, key_file, ocsp_key, ocsp_cert), ca_passphrase()
    )
    record_ca_settings(home, replace(settings.ca, issuing_key_uri=issuing_key_uri or uri))
    result = Rollover(
        issuing_fingerprint=fingerprint(cert),
        issuing_serial=serial_hex(cert),
        issuing_key=issuing_key_uri or uri,
        previous_fingerprint=fingerprint(old),
        previous_serial=serial_hex(old),
        previous_expires=old.not_valid_after_utc.isoformat(),
        generation=generation,
        crl_error=None,
    )
    async with await open_registry(registry_location(home, registry)) as reg:
        await reg.record_event(EventKind.CA_ISSUING_SIGNED, actor=actor, data={
            "issuing_fingerprint": result.issuing_fingerprint,
            "previous_fingerprint": result.previous_fingerprint,
            "issuing_key": result.issuing_key,
            "generation": generation,
        })
        return replace(result, crl_error=await _republish(home, reg))


async def sign_arl(
    home: Home,
    root_key_ref: str,
    *,
    passphrase_file: Path | None,
    revoke: Sequence[str],
    reason: str,
    next_update: timedelta,
    actor: str,
    registry: str | None = None,
) -> RootCrl:
    """Sign the root's CRL: every issuing CA it listed before, plus the previous issuing CAs in ``revoke``."""
    settings = load_settings(home)
    root = castore.read_certificate(home.root_cert)
    root_key = load_root_key(root_key_ref, castore.key_place(home, settings), passphrase_file, root.public_key())
    last = castore.read_root_crl(home)
    entries = {entry.serial_number: entry for entry in last} if last is not None else {}
    current = castore.read_certificate(home.issuing_cert)
    known = {p.cert.serial_number for p in castore.previous_issuing(home)}
    now = now_utc()
    for text in revoke:
        serial = _serial(text)
        if serial == current.serial_number:
            raise PkiError(f"{text} is the current issuing CA: sign a new one first ('iotauth ceremony sign-issuing')")
        if serial not in known and serial not in entries:
            raise PkiError(f"{text} is not a previous issuing CA of this home (see {home.previous_dir})")
        entries.setdefault(serial, revoked_entry(serial, now, REVOCATION_REASONS[reason]))
    number = _crl_number(last) + 1
    arl = hierarchy.sign_root_crl(root, root_key, list(entries.values()), number, next_update, now)
    castore.publish_root_crl(home, arl)
    async with await open_registry(registry_location(home, registry)) as reg:
        await reg.record_event(EventKind.CA_ROOT_CRL_SIGNED, actor=actor, data={
            "number": number, "revoked": [format(s, "x") for s in entries],
        })
        await _republish(home, reg)
    return RootCrl(number, tuple(format(s, "x") for s in entries), (now + next_update).isoformat(), home.root_crl_pem)


def _key_type(cert: x509.Certificate) -> str:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PkiError("the issuing CA key is not an EC key")
    return "p384" if public.curve.key_size >= 384 else "p256"


def _new_issuing_key(
    uri: str | None, place: KeyPlace, key_type: str, current_uri: str, old: x509.Certificate
) -> tuple[PrivateKey, bool]:
    """A new key: on a token (``uri``), or generated here to be written as ``ca/issuing.key``."""
    if uri is None:
        return generate_private_key(key_type), True
    if uri == current_uri:
        raise PkiError("--issuing-key-uri names the current issuing key; name a new object on the token")
    key, _ = create_token_key(uri, place, key_type)
    if keys_match(key, old.public_key()):
        raise PkiError("--issuing-key-uri names the current issuing key; name a new object on the token")
    if isinstance(key, ec.EllipticCurvePrivateKey) and curve_type(key) != key_type:
        raise PkiError(f"the token key is {curve_type(key)}; the CA uses {key_type}")
    return key, False


def _next_generation(home: Home) -> int:
    """1 for the issuing CA of ``init``; each rollover adds one (every previous one counts, expired or not)."""
    if not home.previous_dir.is_dir():
        return 2
    return 2 + sum(1 for d in home.previous_dir.iterdir() if (d / "issuing.crt").is_file())


def _serial(text: str) -> int:
    try:
        return int(text.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise PkiError(f"{text!r} is not a certificate serial number (hex)") from None


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


async def _republish(home: Home, registry: Registry) -> str | None:
    """Publish the CRL bundle with the new CA set; why not, if the issuing key is not at hand."""
    authority = await open_authority(home, registry, signing_optional=True)
    if authority.signing_unavailable is not None:
        return str(authority.signing_unavailable)
    try:
        await authority.publish_crl(home)
    except IotAuthError as exc:
        return str(exc)
    return None
