"""Editing ``iotauth.toml`` in place: a command that records a setting keeps every comment and other setting.

The file is the operator's: ``init`` and the ceremonies write the key URIs into
``[ca]``, the demo its broker port, through tomlkit, which round-trips the
document exactly apart from the values it sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit

from iotauth.config import CaSettings, Home


def update_settings(home: Home, table: str, values: Mapping[str, Any]) -> None:
    """Set ``values`` in ``[table]`` of ``iotauth.toml`` (creating the table if needed), keeping every comment."""
    document = tomlkit.parse(home.config_file.read_text(encoding="utf-8"))
    section = document.get(table)
    if section is None:
        section = tomlkit.table()
        document[table] = section
    section.update(values)
    home.config_file.write_text(tomlkit.dumps(document), encoding="utf-8")


def record_ca_settings(home: Home, ca: CaSettings) -> None:
    """Write ``[ca]``: the key URIs (never a PIN) and the PKCS#11 module, if any."""
    values: dict[str, str] = {"issuing_key_uri": ca.issuing_key_uri, "root_key_uri": ca.root_key_uri}
    if ca.pkcs11_module:
        values["pkcs11_module"] = ca.pkcs11_module
    update_settings(home, "ca", values)
