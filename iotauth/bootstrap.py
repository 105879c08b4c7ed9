"""Creating a new iotauth home: CA hierarchy, broker certificate, configuration, registry.

The CA is generated in a staging directory and renamed into place, so an
interrupted ``init`` never leaves half a CA behind, and an existing CA is
never overwritten. The CA keys are files in ``ca/`` by default, or keys on a
PKCS#11 token (:class:`KeyPlan`), and the root key can leave the home at once
(``--offline-root``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.castore import write_hierarchy
from iotauth.certs import fingerprint
from iotauth.config import CaSettings, Home, load_settings, registry_location
from iotauth.config_text import default_config_text
from iotauth.errors import ConfigError, PkiError, RegistryError
from iotauth.identity import validate_trust_domain
from iotauth.keystore import KeyPlace, create_token_key, export_root_key
from iotauth.pki.hierarchy import Hierarchy, create_hierarchy
from iotauth.pki.keys import PrivateKey, curve_type
from iotauth.pki.signer import OFFLINE, Pkcs11Uri, parse_key_uri
from iotauth.registry import EventKind, open_registry
from iotauth.tomledit import record_ca_settings


@dataclass(frozen=True)
class KeyPlan:
    """Where ``init`` puts the CA keys; by default both are files in ``ca/``.

    Attributes:
        root_key_uri, issuing_key_uri: ``pkcs11:`` URIs of keys to create on a
            token, or to adopt if the token already holds them.
        pkcs11_module: the module for URIs without ``module-path`` (recorded as
            ``[ca] pkcs11_module``).
        offline_root: export the root key, encrypted with ``root_passphrase``,
            to this path outside the home, and keep no root key in the home.
    """

    root_key_uri: str | None = None
    issuing_key_uri: str | None = None
    pkcs11_module: str | None = None
    offline_root: Path | None = None
    root_passphrase: bytes | None = None

    def check(self, home: Home) -> None:
        """Refuse contradictory plans before anything is created (on a token or on disk)."""
        for option, uri in (("--root-key-uri", self.root_key_uri), ("--issuing-key-uri", self.issuing_key_uri)):
            if uri is not None and not isinstance(parse_key_uri(uri), Pkcs11Uri):
                raise PkiError(f"{option} takes a pkcs11: URI (file keys are written to {home.ca_dir} by default)")
        if self.root_key_uri is not None and self.root_key_uri == self.issuing_key_uri:
            raise PkiError("the root and the issuing CA need two different keys: give two different URIs")
        if self.offline_root is None:
            return
        if self.root_key_uri is not None:
            raise PkiError("--offline-root exports a new root key; it cannot also keep the root on a token")
        if self.root_passphrase is None:
            raise PkiError("--offline-root needs a passphrase for the exported key")
        target = self.offline_root.expanduser().absolute()
        if target.resolve().is_relative_to(home.root.resolve()):
            raise PkiError(f"--root-key-out {self.offline_root} is inside the home: the offline root must leave it")
        if target.exists():
            raise PkiError(f"--root-key-out {self.offline_root} already exists; refusing to overwrite it")
        if not target.parent.is_dir():
            raise PkiError(f"--root-key-out: directory {target.parent} does not exist")

    def settings(self) -> CaSettings:
        """What ``[ca]`` in ``iotauth.toml`` records: the URIs, never a PIN."""
        default = CaSettings()
        root = OFFLINE if self.offline_root is not None else (self.root_key_uri or default.root_key_uri)
        return CaSettings(self.issuing_key_uri or default.issuing_key_uri, root, self.pkcs11_module)


@dataclass(frozen=True)
class InitResult:
    home: Path
    trust_domain: str
    root_fingerprint: str
    issuing_fingerprint: str
    server_names: tuple[str, ...]
    encrypted: bool
    root_key: str
    issuing_key: str
    adopted: tuple[str, ...] = ()
    root_key_exported: Path | None = None
    rabbitmq: bool = False

    @property
    def unencrypted_key_files(self) -> bool:
        """Whether a CA key was written to the home without encryption (the CLI warns)."""
        return not self.encrypted and (self.root_key.startswith("file:") or self.issuing_key.startswith("file:"))


async def initialise_home(
    home: Home,
    trust_domain: str | None,
    server_names: Sequence[str],
    *,
    key_type: str = "p256",
    passphrase: bytes | None,
    registry: str | None = None,
    rabbitmq: bool = False,
    actor: str,
    keys: KeyPlan = KeyPlan(),
) -> InitResult:
    """Create everything a new home needs; refuse if a CA is already there.

    Token keys are created (or adopted) first, then the hierarchy is signed
    with them; an offline root is exported before the home gets its CA, so a
    failed export leaves no CA behind whose root nobody holds.

    ``rabbitmq``: the home's devices will connect to RabbitMQ, so ``[rabbitmq]
    enabled = true`` from the start (device ids without ``.``).
    """
    if home.ca_dir.exists() or home.server_dir.exists():
        raise PkiError(f"a CA already exists in {home.root}; refusing to overwrite it (choose another --home)")
    if rabbitmq and home.config_file.exists() and _existing_config(home).get("rabbitmq", {}).get("enabled") is not True:
        raise ConfigError(f"{home.config_file} exists with [rabbitmq] enabled = false; set it to true, then run init")
    domain = _trust_domain(home, trust_domain)
    keys.check(home)
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    location = registry_location(home, registry)
    # The registry first: a registry that already has a history belongs to another CA and is never adopted.
    async with await open_registry(location, create=True) as reg:
        held = await reg.last_event_id()
        if held:
            raise RegistryError(
                f"registry {reg.location} already holds {held} audit events (another home's registry?); "
                "'iotauth init' will not adopt it: move it away or choose another --registry"
            )
        adopted: list[str] = []
        hierarchy, exported = _write_ca(home, domain, key_type, server_names, passphrase, keys, adopted)
        if not home.config_file.exists():
            home.config_file.write_text(default_config_text(domain, rabbitmq=rabbitmq), encoding="utf-8")
        ca_settings = keys.settings()
        record_ca_settings(home, ca_settings)
        settings = load_settings(home)
        ca = hierarchy.ca
        await reg.record_event(
            EventKind.CA_INITIALISED,
            actor=actor,
            data={
                "trust_domain": domain,
                "root_fingerprint": fingerprint(ca.root_cert),
                "issuing_fingerprint": fingerprint(ca.issuing_cert),
                "key_type": key_type,
                "server_names": list(server_names),
                "encrypted": passphrase is not None,
                "root_key": ca_settings.root_key_uri,
                "issuing_key": ca_settings.issuing_key_uri,
                "adopted": adopted,
                "registry_instance": reg.instance_id,
            },
        )
    return InitResult(
        home=home.root,
        trust_domain=ca.trust_domain,
        root_fingerprint=fingerprint(ca.root_cert),
        issuing_fingerprint=fingerprint(ca.issuing_cert),
        server_names=tuple(server_names),
        encrypted=passphrase is not None,
        root_key=ca_settings.root_key_uri,
        issuing_key=ca_settings.issuing_key_uri,
        adopted=tuple(adopted),
        root_key_exported=exported,
        rabbitmq=settings.rabbitmq.enabled,
    )


def _write_ca(
    home: Home, domain: str, key_type: str, server_names: Sequence[str], passphrase: bytes | None, keys: KeyPlan,
    adopted: list[str],
) -> tuple[Hierarchy, Path | None]:
    """Make or adopt the token keys, sign the hierarchy, export an offline root, and move the CA into place."""
    place = KeyPlace(home.root, keys.pkcs11_module)
    root_key = _token_key(keys.root_key_uri, place, key_type, "root", adopted)
    issuing_key = _token_key(keys.issuing_key_uri, place, key_type, "issuing", adopted)
    hierarchy = create_hierarchy(domain, key_type, list(server_names), root_key=root_key, issuing_key=issuing_key)
    exported = None
    if keys.offline_root is not None and keys.root_passphrase is not None:
        exported = export_root_key(hierarchy.root_key, keys.offline_root, keys.root_passphrase, home.root)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=home.root))
    try:
        write_hierarchy(Home(staging), hierarchy, passphrase, root_key_file=root_key is None and exported is None,
                        issuing_key_file=issuing_key is None)
        os.rename(staging / "ca", home.ca_dir)
        os.rename(staging / "broker", home.server_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hierarchy, exported


def _token_key(uri: str | None, place: KeyPlace, key_type: str, which: str, adopted: list[str]) -> PrivateKey | None:
    """Create or adopt the token key ``uri`` names (None: a file key, made with the hierarchy)."""
    if uri is None:
        return None
    key, was_there = create_token_key(uri, place, key_type)
    if isinstance(key, ec.EllipticCurvePrivateKey) and curve_type(key) != key_type:
        raise PkiError(
            f"the {which} key on the token is {curve_type(key)}, not --key-type {key_type}; pass --key-type "
            f"{curve_type(key)} to adopt it"
        )
    if was_there:
        adopted.append(which)
    return key


def _existing_config(home: Home) -> dict[str, Any]:
    try:
        return tomllib.loads(home.config_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{home.config_file} is not valid TOML: {exc}") from exc


def _trust_domain(home: Home, requested: str | None) -> str:
    if home.config_file.exists():
        existing = _existing_config(home).get("trust_domain")
        if requested is not None and existing is not None and requested != existing:
            raise ConfigError(
                f"{home.config_file} already sets trust_domain = {existing!r}; drop --trust-domain or edit the file"
            )
        return validate_trust_domain(requested or existing or "iotauth.local")
    return validate_trust_domain(requested or "iotauth.local")
