"""Editing iotauth.toml in place keeps what the operator wrote."""

from __future__ import annotations

import tomllib
from pathlib import Path

from iotauth.config import CaSettings, Home, parse_settings
from iotauth.config_text import default_config_text
from iotauth.tomledit import record_ca_settings


def test_recording_the_key_uris_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.config_file.write_text(default_config_text("factory.test") + "# the operator's own note\n")
    record_ca_settings(home, CaSettings("pkcs11:token=t;object=i", "offline", "/usr/lib/softhsm/libsofthsm2.so"))
    text = home.config_file.read_text()
    assert "# the operator's own note" in text and "# Where the CA keys live" in text
    ca = parse_settings(tomllib.loads(text)).ca
    assert ca == CaSettings("pkcs11:token=t;object=i", "offline", "/usr/lib/softhsm/libsofthsm2.so")
