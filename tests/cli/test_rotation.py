"""``iotauth rotate`` as an operator reads it: progress on stderr while waiting, a summary, skipped devices named."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.fixtures.cli import CsrFactory, iotauth


def _issue(home: Path, tmp_path: Path, csr_factory: CsrFactory, device_id: str) -> None:
    csr = tmp_path / f"{device_id}.csr"
    csr.write_bytes(csr_factory()[1].public_bytes(serialization.Encoding.PEM))
    iotauth(home, "issue", device_id, "--csr", str(csr), "--out", os.devnull)


def test_waiting_without_a_renewer_shows_progress_and_says_nobody_renewed(
    cli_home: Path, tmp_path: Path, csr_factory: CsrFactory
) -> None:
    for device_id in ("rot-1", "rot-2"):
        _issue(cli_home, tmp_path, csr_factory, device_id)
    iotauth(cli_home, "revoke", "rot-2")
    result = iotauth(cli_home, "rotate", "rot-1", "rot-2", "--wait", "--timeout", "1", ok=False)
    assert result.returncode == 1  # nobody renewed: no renewer runs
    lines = result.stderr.splitlines()
    assert any(line.startswith("requested 1 · renewed 0 ·") for line in lines), result.stderr
    assert any("0 of 1 device(s) renewed" in line for line in lines), result.stderr
    assert any("not ordered: rot-2" in line for line in lines), result.stderr
    ordered = json.loads(iotauth(cli_home, "rotate", "rot-1", "--json").stdout)
    assert ordered["ordered"] == ["rot-1"]
    kinds = [e["kind"] for e in json.loads(iotauth(cli_home, "audit", "--json").stdout)]
    assert kinds.count("rotation.requested") >= 1


def test_rotate_needs_a_choice_and_names_a_bad_duration(cli_home: Path) -> None:
    assert iotauth(cli_home, "rotate", ok=False).returncode == 2
    bad = iotauth(cli_home, "rotate", "--expiring-within", "soon", ok=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: bad duration 'soon'")
