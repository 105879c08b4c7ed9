"""The CA's files in a home: where :mod:`iotauth.pki` gets its values and where its products go.

pki is pure crypto: it takes certificates and key objects, never paths. This
module is the one place that knows the home's layout for CA material -- it
reads the CA, the OCSP responder and the published CRL, writes a new
hierarchy at ``iotauth init`` and publishes CRLs -- so a later key source (an
HSM behind a ``pkcs11:`` URI) changes this module and nothing below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from iotauth.certs import pem
from iotauth.config import Home, Settings
from iotauth.errors import ConfigError, PkiError
from iotauth.files import os_error_text, write_public, write_secret
from iotauth.pki.ca import CertificateAuthority
from iotauth.pki.hierarchy import Hierarchy
from iotauth.pki.keys import load_private_key, private_key_pem
from iotauth.pki.ocsp import OcspResponder
from iotauth.pki.verify import ClientCertificateVerifier


def read_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate from ``path``, or a :class:`PkiError` that names the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a valid PEM certificate") from exc


def load_ca(home: Home, settings: Settings, passphrase: bytes | None) -> CertificateAuthority:
    """The issuing CA of ``home``; only the issuing key is read (and decrypted), never the root key."""
    home.require_initialised()
    root = read_certificate(home.root_cert)
    issuing = read_certificate(home.issuing_cert)
    try:
        key_data = home.issuing_key.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read issuing CA key {home.issuing_key}: {exc.strerror}") from exc
    key = load_private_key(key_data, passphrase, f"issuing CA key {home.issuing_key}")
    return CertificateAuthority(root, issuing, key, settings.trust_domain, settings.crl_url, settings.ocsp_url)


def client_verifier(home: Home, settings: Settings) -> ClientCertificateVerifier:
    """A verifier for device certificates of ``home``'s CA (needs no key)."""
    return ClientCertificateVerifier(
        [read_certificate(home.root_cert)], [read_certificate(home.issuing_cert)], settings.trust_domain
    )


def load_ocsp_responder(home: Home) -> OcspResponder:
    """The delegated OCSP responder written by ``iotauth init`` (its key is not encrypted)."""
    try:
        cert = x509.load_pem_x509_certificate(home.ocsp_cert.read_bytes())
        key = load_private_key(home.ocsp_key.read_bytes(), None, f"OCSP responder key {home.ocsp_key}")
        issuing = x509.load_pem_x509_certificate(home.issuing_cert.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the OCSP responder files in {home.ca_dir}: {exc.strerror}") from exc
    return OcspResponder(issuing, cert, key)


def write_hierarchy(home: Home, hierarchy: Hierarchy, passphrase: bytes | None) -> None:
    """Store a new hierarchy in ``home``; refuse if any CA file is already there.

    Re-running ``init`` must never replace a CA that devices in the field
    already trust. The CA keys are encrypted with ``passphrase`` when given;
    the broker's and the OCSP responder's keys are not (they serve unattended).
    """
    existing = [p for p in (home.root_key, home.root_cert, home.issuing_key, home.issuing_cert) if p.exists()]
    if existing:
        raise PkiError(f"a CA already exists in {home.root} ({existing[0].name}); refusing to overwrite it")
    ca = hierarchy.ca
    write_secret(home.root_key, private_key_pem(hierarchy.root_key, passphrase))
    write_secret(home.issuing_key, private_key_pem(ca.issuing_key, passphrase))
    write_public(home.root_cert, pem(ca.root_cert))
    write_public(home.issuing_cert, pem(ca.issuing_cert))
    write_public(home.chain_file, pem(ca.issuing_cert) + pem(ca.root_cert))
    write_secret(home.server_key, private_key_pem(hierarchy.server_key, None))
    write_public(home.server_cert, pem(hierarchy.server_cert) + pem(ca.issuing_cert))
    write_secret(home.ocsp_key, private_key_pem(hierarchy.ocsp_key, None))
    write_public(home.ocsp_cert, pem(hierarchy.ocsp_cert))


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


def publish_crl(home: Home, crl: x509.CertificateRevocationList) -> None:
    """Atomically replace ``ca/crl.pem`` and ``ca/crl.der`` in ``home`` (a write that fails is a PkiError)."""
    for path, encoding in ((home.crl_pem, serialization.Encoding.PEM), (home.crl_der, serialization.Encoding.DER)):
        try:
            write_public(path, crl.public_bytes(encoding))
        except OSError as exc:
            raise PkiError(f"cannot publish the CRL to {path}: {os_error_text(exc)}") from exc
