"""Creating a new iotauth home: CA hierarchy, broker certificate, configuration, registry.

The CA is generated in a staging directory and renamed into place, so an
interrupted ``init`` never leaves half a CA behind, and an existing CA is
never overwritten.
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

from iotauth.castore import write_hierarchy
from iotauth.certs import fingerprint
from iotauth.config import Home, default_config_text, load_settings, registry_location
from iotauth.errors import ConfigError, PkiError
from iotauth.identity import validate_trust_domain
from iotauth.pki.ca import CertificateAuthority
from iotauth.pki.hierarchy import create_hierarchy
from iotauth.registry import EventKind, open_registry


@dataclass(frozen=True)
class InitResult:
    home: Path
    trust_domain: str
    root_fingerprint: str
    issuing_fingerprint: str
    server_names: tuple[str, ...]
    encrypted: bool
    rabbitmq: bool = False


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
) -> InitResult:
    """Create everything a new home needs; refuse if a CA is already there.

    ``rabbitmq``: the home's devices will connect to RabbitMQ, so ``[rabbitmq]
    enabled = true`` from the start (device ids without ``.``).
    """
    if home.ca_dir.exists() or home.server_dir.exists():
        raise PkiError(f"a CA already exists in {home.root}; refusing to overwrite it (choose another --home)")
    if rabbitmq and home.config_file.exists() and _existing_config(home).get("rabbitmq", {}).get("enabled") is not True:
        raise ConfigError(f"{home.config_file} exists with [rabbitmq] enabled = false; set it to true, then run init")
    domain = _trust_domain(home, trust_domain)
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=home.root))
    try:
        hierarchy = create_hierarchy(domain, key_type, list(server_names))
        write_hierarchy(Home(staging), hierarchy, passphrase)
        os.rename(staging / "ca", home.ca_dir)
        os.rename(staging / "broker", home.server_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not home.config_file.exists():
        home.config_file.write_text(default_config_text(domain, rabbitmq=rabbitmq), encoding="utf-8")
    settings = load_settings(home)
    ca = hierarchy.ca
    async with await open_registry(registry_location(home, registry), create=True) as reg:
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
            },
        )
    return _result(home, ca, server_names, passphrase is not None, settings.rabbitmq.enabled)


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


def _result(home: Home, ca: CertificateAuthority, names: Sequence[str], encrypted: bool, rabbitmq: bool) -> InitResult:
    return InitResult(
        home=home.root,
        trust_domain=ca.trust_domain,
        root_fingerprint=fingerprint(ca.root_cert),
        issuing_fingerprint=fingerprint(ca.issuing_cert),
        server_names=tuple(names),
        encrypted=encrypted,
        rabbitmq=rabbitmq,
    )
