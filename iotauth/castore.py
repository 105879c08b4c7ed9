"""The CA's files in a home: where :mod:`iotauth.pki` gets its values and where its products go.

pki is pure crypto: it takes certificates and key objects, never paths. This
module is the one place that knows the home's layout for CA material:

* ``ca/root.crt``, ``ca/issuing.crt`` and the keys their ``[ca]`` key URIs name
  (``file:ca/issuing.key`` by default, or a ``pkcs11:`` token key, which never
  has a file), ``ca/ocsp.*`` (the delegated OCSP responder), ``ca/crl.*``;
* ``ca/previous/<serial>/``: each issuing CA that ``iotauth ceremony
  sign-issuing`` replaced, with the URI of its key (``key.uri``) and its OCSP
  responder. It stays trusted, and keeps signing CRLs for its certificates,
  until it expires or the root's CRL (``ca/root-crl.pem``, the ARL) revokes it.

:func:`load_ca` is the single entry point for everything that signs: the
Authority (CLI, station, ``serve``) and the renewal service open the CA
through it, whatever holds the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotauth.certs import now_utc, pem, serial_hex
from iotauth.config import Home, Settings
from iotauth.errors import ConfigError, PkiError
from iotauth.files import os_error_text, replace_secret, write_public, write_secret
from iotauth.keystore import KeyPlace, open_key
from iotauth.pki.ca import CertificateAuthority
from iotauth.pki.hierarchy import Hierarchy
from iotauth.pki.keys import PrivateKey, load_private_key, private_key_pem
from iotauth.pki.ocsp import OcspResponder, ResponderIdentity
from iotauth.pki.signer import FileKeyUri, parse_key_uri
from iotauth.pki.verify import ClientCertificateVerifier


def read_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate from ``path``, or a :class:`PkiError` that names the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a valid PEM certificate") from exc


def key_place(home: Home, settings: Settings) -> KeyPlace:
    return KeyPlace(home.root, settings.ca.pkcs11_module)


def load_ca(home: Home, settings: Settings) -> CertificateAuthority:
    """The issuing CA of ``home`` with its key, from ``[ca] issuing_key_uri``; the root key is never opened.

    The key must be the private half of ``ca/issuing.crt`` (checked; a token
    key also signs once to prove it works). Passphrase and PIN come from the
    environment or a ``pin-source`` file (:mod:`iotauth.keystore`).
    """
    home.require_initialised()
    root = read_certificate(home.root_cert)
    issuing = read_certificate(home.issuing_cert)
    key = open_key(settings.ca.issuing_key_uri, key_place(home, settings), what="issuing CA key",
                   expected=issuing.public_key())
    return CertificateAuthority(root, issuing, key, settings.trust_domain, settings.crl_url, settings.ocsp_url)


# -- issuing CAs replaced by a rollover -------------------------------------------------------


@dataclass(frozen=True)
class PreviousIssuing:
    """An issuing CA replaced by a rollover, still trusted until it expires or the ARL revokes it."""

    directory: Path
    cert: x509.Certificate

    @property
    def key_uri(self) -> str:
        return (self.directory / "key.uri").read_text(encoding="utf-8").strip()

    @property
    def ocsp_cert(self) -> Path:
        return self.directory / "ocsp.crt"

    @property
    def ocsp_key(self) -> Path:
        return self.directory / "ocsp.key"


def previous_issuing(home: Home, now: datetime | None = None) -> list[PreviousIssuing]:
    """The replaced issuing CAs that are still valid and not revoked by the root's CRL, newest first."""
    if not home.previous_dir.is_dir():
        return []
    at = now or now_utc()
    revoked = revoked_issuing_serials(home)
    found = []
    for directory in sorted(home.previous_dir.iterdir()):
        if not (directory / "issuing.crt").is_file():
            continue
        cert = read_certificate(directory / "issuing.crt")
        if cert.not_valid_after_utc > at and cert.serial_number not in revoked:
            found.append(PreviousIssuing(directory, cert))
    return sorted(found, key=lambda p: p.cert.not_valid_before_utc, reverse=True)


def load_previous_cas(home: Home, settings: Settings) -> tuple[CertificateAuthority, ...]:
    """The replaced issuing CAs with their keys: each still signs the CRL for the certificates it issued."""
    root = read_certificate(home.root_cert)
    place = key_place(home, settings)
    return tuple(
        CertificateAuthority(
            root, previous.cert,
            open_key(previous.key_uri, place, what=f"previous issuing CA key ({previous.directory.name})",
                     expected=previous.cert.public_key()),
            settings.trust_domain, settings.crl_url, settings.ocsp_url,
        )
        for previous in previous_issuing(home)
    )


def trusted_issuing(home: Home, now: datetime | None = None) -> list[x509.Certificate]:
    """Every issuing CA whose device certificates are accepted: the current one first, then the replaced ones."""
    current = read_certificate(home.issuing_cert)
    return [current, *(p.cert for p in previous_issuing(home, now) if p.cert != current)]


def trusted_issuing_pem(home: Home) -> bytes:
    """:func:`trusted_issuing` as one PEM bundle: what a TLS server loads as its client-certificate anchors."""
    return b"".join(pem(cert) for cert in trusted_issuing(home))


def revoked_issuing_serials(home: Home) -> frozenset[int]:
    """Issuing CAs on the root's CRL (the ARL), which must verify under ``ca/root.crt``."""
    try:
        data = home.root_crl_pem.read_bytes()
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise PkiError(f"cannot read the root's CRL {home.root_crl_pem}: {exc.strerror}") from exc
    try:
        arl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"{home.root_crl_pem} is not a valid PEM CRL") from exc
    root = read_certificate(home.root_cert)
    if arl.issuer != root.subject or not arl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{home.root_crl_pem} is not signed by this home's root CA; refusing to trust it")
    return frozenset(entry.serial_number for entry in arl)


def client_verifier(home: Home, settings: Settings) -> ClientCertificateVerifier:
    """A verifier for device certificates of ``home``'s CA (needs no key), across a rollover."""
    return ClientCertificateVerifier([read_certificate(home.root_cert)], trusted_issuing(home), settings.trust_domain)


def load_ocsp_responder(home: Home) -> OcspResponder:
    """The delegated OCSP responders: the current issuing CA's and each still-trusted previous one's."""
    identities = [_responder(home.issuing_cert, home.ocsp_cert, home.ocsp_key, home.ca_dir)]
    for previous in previous_issuing(home):
        if previous.ocsp_cert.exists():
            identities.append(_responder(previous.directory / "issuing.crt", previous.ocsp_cert,
                                         previous.ocsp_key, previous.directory))
    return OcspResponder(identities)


def _responder(issuing: Path, cert: Path, key: Path, where: Path) -> ResponderIdentity:
    try:
        return ResponderIdentity(
            x509.load_pem_x509_certificate(issuing.read_bytes()),
            x509.load_pem_x509_certificate(cert.read_bytes()),
            load_private_key(key.read_bytes(), None, f"OCSP responder key {key}"),
        )
    except OSError as exc:
        raise ConfigError(f"cannot read the OCSP responder files in {where}: {exc.strerror}") from exc


# -- writing ----------------------------------------------------------------------------------


def write_hierarchy(home: Home, hierarchy: Hierarchy, passphrase: bytes | None, *, root_key_file: bool = True,
                    issuing_key_file: bool = True) -> None:
    """Store a new hierarchy in ``home``; refuse if any CA file is already there.

    Re-running ``init`` must never replace a CA that devices in the field
    already trust. CA keys are written only where they are files
    (``*_key_file``); a token key or an exported offline root has none. They
    are encrypted with ``passphrase`` when given; the broker's and the OCSP
    responder's keys are not (they serve unattended).
    """
    existing = [p for p in (home.root_key, home.root_cert, home.issuing_key, home.issuing_cert) if p.exists()]
    if existing:
        raise PkiError(f"a CA already exists in {home.root} ({existing[0].name}); refusing to overwrite it")
    ca = hierarchy.ca
    if root_key_file:
        write_secret(home.root_key, private_key_pem(hierarchy.root_key, passphrase))
    if issuing_key_file:
        write_secret(home.issuing_key, private_key_pem(ca.issuing_key, passphrase))
    write_public(home.root_cert, pem(ca.root_cert))
    write_public(home.issuing_cert, pem(ca.issuing_cert))
    write_public(home.chain_file, pem(ca.issuing_cert) + pem(ca.root_cert))
    write_secret(home.server_key, private_key_pem(hierarchy.server_key, None))
    write_public(home.server_cert, pem(hierarchy.server_cert) + pem(ca.issuing_cert))
    write_secret(home.ocsp_key, private_key_pem(hierarchy.ocsp_key, None))
    write_public(home.ocsp_cert, pem(hierarchy.ocsp_cert))


@dataclass(frozen=True)
class NewIssuing:
    """What a rollover installs: the new issuing CA, its key (a file key is written; a token key is not) and its
    OCSP responder. The broker's server certificate is left as it is: it stays valid under the previous issuing CA,
    which devices trust through the root, and replacing its key would break brokers that copied it."""

    cert: x509.Certificate
    key: PrivateKey
    key_file: bool
    ocsp_key: PrivateKey
    ocsp_cert: x509.Certificate


def install_issuing(home: Home, settings: Settings, new: NewIssuing, passphrase: bytes | None) -> str:
    """Replace the current issuing CA by ``new``, keeping the old one in ``ca/previous/<serial>/``.

    The old CA's key stays where it is (a token key), or is hard-linked into
    its directory before ``ca/issuing.key`` is replaced (a file key in the
    home), so it can sign CRLs for its certificates until they expire. Each
    file is replaced atomically; the old generation is saved first, so an
    interruption never loses a key. Returns the URI to record for the new key
    (``file:ca/issuing.key`` for a file key).
    """
    old = read_certificate(home.issuing_cert)
    target = home.previous_dir / serial_hex(old)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    old_uri = parse_key_uri(settings.ca.issuing_key_uri)
    retired_uri = settings.ca.issuing_key_uri
    old_file: Path | None = None
    if isinstance(old_uri, FileKeyUri) and not Path(old_uri.path).is_absolute():
        old_file, kept = home.root / old_uri.path, target / "issuing.key"
        if not kept.exists():
            os.link(old_file, kept)
        retired_uri = f"file:{kept.relative_to(home.root)}"
    write_public(target / "key.uri", retired_uri.encode() + b"\n")
    for name, source in (("ocsp.crt", home.ocsp_cert), ("ocsp.key", home.ocsp_key)):
        if not (target / name).exists():
            os.link(source, target / name)
    write_public(target / "issuing.crt", pem(old))  # last: a directory without it is ignored
    if new.key_file:
        replace_secret(home.issuing_key, private_key_pem(new.key, passphrase))
    elif old_file is not None:
        old_file.unlink()  # the key moved to a token: no issuing key file stays in ca/ (its link is in previous/)
    write_public(home.issuing_cert, pem(new.cert))
    write_public(home.chain_file, pem(new.cert) + pem(read_certificate(home.root_cert)))
    replace_secret(home.ocsp_key, private_key_pem(new.ocsp_key, None))
    write_public(home.ocsp_cert, pem(new.ocsp_cert))
    return "file:ca/issuing.key" if new.key_file else settings.ca.issuing_key_uri


# -- CRLs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlFiles:
    """A CRL file pair as published in a home."""

    der: bytes
    pem: bytes


def read_published_crl(home: Home) -> CrlFiles | None:
    """The CRL last published in ``home``, or None if none has been (or it cannot be read)."""
    try:
        return CrlFiles(home.crl_der.read_bytes(), home.crl_pem.read_bytes())
    except OSError:
        return None


def publish_crl(home: Home, crl: x509.CertificateRevocationList, *, also: tuple[bytes, ...] = ()) -> None:
    """Atomically replace ``ca/crl.pem`` and ``ca/crl.der`` in ``home`` (a write that fails is a PkiError).

    ``crl.der`` holds the current issuing CA's CRL; ``crl.pem`` holds it and,
    after a rollover, the CRLs in ``also`` (one per previous issuing CA, and
    the root's CRL): OpenSSL-based relying parties (Mosquitto's ``crlfile``)
    load every CRL in the file and need one from each CA in a chain.
    """
    _publish(home.crl_pem, crl.public_bytes(serialization.Encoding.PEM) + b"".join(also), "CRL")
    _publish(home.crl_der, crl.public_bytes(serialization.Encoding.DER), "CRL")


def publish_root_crl(home: Home, arl: x509.CertificateRevocationList) -> None:
    _publish(home.root_crl_pem, arl.public_bytes(serialization.Encoding.PEM), "root's CRL")
    _publish(home.root_crl_der, arl.public_bytes(serialization.Encoding.DER), "root's CRL")


def _publish(path: Path, data: bytes, what: str) -> None:
    try:
        write_public(path, data)
    except OSError as exc:
        raise PkiError(f"cannot publish the {what} to {path}: {os_error_text(exc)}") from exc


def read_root_crl(home: Home) -> x509.CertificateRevocationList | None:
    """The root's CRL last signed by a ceremony (checked by :func:`revoked_issuing_serials`), or None."""
    if not home.root_crl_pem.exists():
        return None
    revoked_issuing_serials(home)  # verifies it
    return x509.load_pem_x509_crl(home.root_crl_pem.read_bytes())
