"""``iotauth status``: the home's certificates, the fleet, what expires soon and the audit head."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.fixtures.cli import CsrFactory, iotauth


def test_status_reports_the_home_and_the_fleet(cli_home: Path, tmp_path: Path, csr_factory: CsrFactory) -> None:
    for device_id in ("sensor-1", "sensor-2"):
        csr = tmp_path / f"{device_id}.csr"
        csr.write_bytes(csr_factory()[1].public_bytes(serialization.Encoding.PEM))
        iotauth(cli_home, "issue", device_id, "--csr", str(csr), "--out", os.devnull)
    iotauth(cli_home, "revoke", "sensor-2")
    data = json.loads(iotauth(cli_home, "status", "--json").stdout)
    assert data["devices"] == {"pending": 0, "active": 1, "suspended": 0, "revoked": 1}
    assert data["certificates"]["revoked"] == 1 and data["expiring_within_days"] == {"7": 0, "30": 0}
    names = {c["name"]: c for c in data["home_certificates"]}
    assert {"root CA", "issuing CA", "OCSP responder", "broker/serve TLS", "published CRL"} <= set(names)
    root = names["root CA"]
    assert datetime.fromisoformat(root["not_after"]) > datetime.now(UTC) and root["days_left"] > 3000
    assert names["published CRL"]["problem"] is None  # 'revoke' published one
    events = json.loads(iotauth(cli_home, "audit", "--json").stdout)
    assert data["audit_head"] == {k: events[-1][k] for k in ("id", "ts", "kind", "hash")}

    shown = iotauth(cli_home, "status").stdout
    lines = shown.splitlines()
    assert any(line.split()[:2] == ["root", "CA"] and root["not_after"] in line for line in lines)
    assert ["devices", "0", "1", "0", "1"] in [line.split() for line in lines]
    assert any(line.split() == ["hash", events[-1]["hash"]] for line in lines)


def test_status_names_what_is_missing_without_a_traceback(cli_home: Path) -> None:
    (cli_home / "ca" / "ocsp.crt").unlink()
    result = iotauth(cli_home, "status")
    assert "warning: OCSP responder: cannot read certificate" in result.stderr
    assert "warning: published CRL: no CRL published" in result.stderr
    data = json.loads(iotauth(cli_home, "status", "--json").stdout)
    ocsp = next(c for c in data["home_certificates"] if c["name"] == "OCSP responder")
    assert ocsp["expires_soon"] and ocsp["not_after"] is None
