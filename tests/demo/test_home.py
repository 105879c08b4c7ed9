"""The demo's home: its broker port is set through a TOML library, so the comments ``init`` wrote stay."""

from __future__ import annotations

import tomllib
from pathlib import Path

from iotauth.config import Home
from iotauth.config_text import default_config_text
from iotauth.demo.home import use_broker_port


def test_the_broker_port_changes_and_the_comments_stay(tmp_path: Path) -> None:
    home = Home(tmp_path)
    original = default_config_text("demo.iotauth.local")
    home.config_file.write_text(original)
    use_broker_port(home, 43210)
    text = home.config_file.read_text()
    assert tomllib.loads(text)["broker"]["port"] == 43210
    comments = [line for line in original.splitlines() if line.startswith("#")]
    assert comments and all(comment in text.splitlines() for comment in comments)
    assert text.replace("port = 43210", "port = 8883") == original  # nothing else moved


def test_a_config_without_a_broker_table_gets_one(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.config_file.write_text('trust_domain = "demo.iotauth.local"\n')
    use_broker_port(home, 1883)
    assert tomllib.loads(home.config_file.read_text()) == {"trust_domain": "demo.iotauth.local",
                                                         "broker": {"port": 1883}}
