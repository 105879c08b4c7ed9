"""The demo's home: a broker port of its own, and an operator identity to watch the fleet with."""

from __future__ import annotations

from pathlib import Path

from iotauth.authority import Authority
from iotauth.certs import pem
from iotauth.config import Home
from iotauth.files import write_public, write_secret
from iotauth.pki.keys import generate_private_key, private_key_pem
from iotauth.testing import CredentialFiles
from iotauth.tomledit import update_settings

OPERATOR_ID = "ops-ingest"


def use_broker_port(home: Home, port: int) -> None:
    """Set ``[broker] port`` in ``iotauth.toml`` (what the station writes to devices), keeping its comments."""
    update_settings(home, "broker", {"port": port})


def operator_folder(home: Home) -> Path:
    return home.root / "operator"


async def issue_operator_identity(authority: Authority, home: Home) -> CredentialFiles:
    """An 'ingest' service identity for the operator side, issued like any device; its key stays in the home."""
    key = generate_private_key("p256")
    issued = await authority.issue_for_key(key.public_key(), OPERATOR_ID, "ingest", activate=True, actor="demo")
    folder = operator_folder(home)
    write_secret(folder / "ingest.key", private_key_pem(key, None))
    write_public(folder / "ingest.crt", pem(issued.certificate) + pem(issued.chain[0]))
    return CredentialFiles(OPERATOR_ID, folder / "ingest.crt", folder / "ingest.key", home.root_cert)
