"""The export refuses to write files Mosquitto's own account could not read, with the reason in one line."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from iotauth.config import Home
from iotauth.errors import ConfigError
from iotauth.export.access import check_access, mosquitto_account
from tests.fixtures.broker import iotauth_cli

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not any(p.pw_name == "mosquitto" for p in pwd.getpwall()),
    reason="Mosquitto only changes account when started as root (and needs its 'mosquitto' account)",
)


@pytest.fixture
def base(reachable_dir: Path) -> Path:
    return reachable_dir


@pytest.mark.parametrize("managed", [False, True])
def test_export_under_a_private_directory_fails_with_the_reason(home: Home, base: Path, managed: bool) -> None:
    private = base / "private"
    private.mkdir(mode=0o700)
    args = ["export", "mosquitto", "--out", str(private / "export")] + (["--managed"] if managed else [])
    result = iotauth_cli(home, *args)
    assert result.returncode == 1
    assert "Mosquitto runs as 'mosquitto' and could not reach" in result.stderr
    assert f"directory {private} (mode 0700, owner root:root) does not let it in" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_file_only_root_can_read_is_named(base: Path) -> None:
    secret = base / "crl.pem"
    secret.write_text("x")
    secret.chmod(0o600)
    with pytest.raises(ConfigError, match=r"could not read .*crl\.pem \(mode 0600, owner root:root\)"):
        check_access(mosquitto_account(None), [secret])
    secret.chmod(0o644)
    check_access(mosquitto_account(None), [secret])
    state = base / "state"
    state.mkdir(mode=0o755)
    with pytest.raises(ConfigError, match="could not write"):  # the plugin saves its state there
        check_access(mosquitto_account(None), [], [state])


def test_the_account_is_the_one_mosquitto_drops_to(base: Path) -> None:
    assert mosquitto_account(None) is not None and mosquitto_account(None).name == "mosquitto"  # type: ignore[union-attr]
    assert mosquitto_account("root") is None  # 'user root': it keeps root's access
    with pytest.raises(ConfigError, match="no such user"):
        mosquitto_account("no-such-account-here")
