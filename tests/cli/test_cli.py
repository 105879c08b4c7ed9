"""The operator CLI, run as the installed console script: outputs, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.fixtures.cli import CsrFactory, iotauth, one_line_error


def test_issue_list_show_revoke_audit_roundtrip(cli_home: Path, csr_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sensor.pem"
    issued = json.loads(
        iotauth(
            cli_home, "issue", "sensor-1", "--csr", str(csr_file), "--hardware-id", "HW-1", "--out", str(out), "--json"
        ).stdout
    )
    assert issued["status"] == "active" and issued["device_id"] == "sensor-1"
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.subject.rfc4514_string().endswith("CN=sensor-1") and format(cert.serial_number, "x") == issued["serial"]

    listed = json.loads(iotauth(cli_home, "devices", "list", "--json").stdout)
    assert [(d["device_id"], d["status"]) for d in listed] == [("sensor-1", "active")]
    table = iotauth(cli_home, "devices", "list").stdout
    assert "sensor-1" in table and "HW-1" in table

    shown = json.loads(iotauth(cli_home, "devices", "show", "sensor-1", "--json").stdout)
    assert shown["certificates"][0]["serial"] == issued["serial"]

    revoked = json.loads(iotauth(cli_home, "revoke", "sensor-1", "--reason", "key-compromise", "--json").stdout)
    assert revoked["revoked_serials"] == [issued["serial"]]
    assert (
        json.loads(iotauth(cli_home, "devices", "list", "--status", "revoked", "--json").stdout)[0]["device_id"]
        == "sensor-1"
    )
    crl = x509.load_pem_x509_crl((cli_home / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(issued["serial"], 16)) is not None

    events = json.loads(iotauth(cli_home, "audit", "--json").stdout)
    assert [e["kind"] for e in events][-2:] == ["certificate.revoked", "device.revoked"]
    assert json.loads(iotauth(cli_home, "audit", "verify", "--json").stdout)["ok"] is True


def test_suspend_resume_and_crl_der(cli_home: Path, csr_file: Path, tmp_path: Path) -> None:
    iotauth(cli_home, "issue", "sensor-1", "--csr", str(csr_file), "--out", str(tmp_path / "c.pem"))
    assert json.loads(iotauth(cli_home, "suspend", "sensor-1", "--json").stdout)["status"] == "suspended"
    der = tmp_path / "crl.der"
    info = json.loads(iotauth(cli_home, "crl", "--der", "--out", str(der), "--json").stdout)
    assert info["entries"] == 1
    assert len(x509.load_der_x509_crl(der.read_bytes())) == 1
    assert json.loads(iotauth(cli_home, "resume", "sensor-1", "--json").stdout)["status"] == "active"


def test_pending_issue(cli_home: Path, csr_file: Path) -> None:
    issued = json.loads(iotauth(cli_home, "issue", "sensor-1", "--csr", str(csr_file), "--pending", "--json").stdout)
    assert issued["status"] == "pending"


def test_reinit_refuses(cli_home: Path) -> None:
    one_line_error(iotauth(cli_home, "init", ok=False), "refusing to overwrite")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("devices", "show", "ghost"), "unknown device 'ghost'"),
        (("revoke", "ghost"), "unknown device 'ghost'"),
        (("devices", "show", "a/b"), "invalid device id 'a/b'"),
        (("issue", "x", "--csr", "/nonexistent.csr"), "cannot read CSR file"),
        (("issue", "bad#id", "--csr", "/etc/hostname"), "not a PEM or DER certificate signing request"),
        (("issue", "dev", "--csr", "/etc/hostname", "--profile", "nope"), "not a PEM or DER"),
    ],
)
def test_errors_are_one_clear_line(cli_home: Path, args: tuple[str, ...], needle: str) -> None:
    one_line_error(iotauth(cli_home, *args, ok=False), needle)


def test_bad_device_id_and_unknown_profile(cli_home: Path, csr_file: Path) -> None:
    one_line_error(iotauth(cli_home, "issue", "dev+1", "--csr", str(csr_file), ok=False), "invalid device id")
    one_line_error(
        iotauth(cli_home, "issue", "dev", "--csr", str(csr_file), "--profile", "nope", ok=False),
        "unknown profile 'nope'",
    )


def test_missing_home_is_one_line(tmp_path: Path) -> None:
    one_line_error(iotauth(tmp_path / "nowhere", "devices", "list", ok=False), "run 'iotauth init' first")


def test_corrupt_database_is_one_line(cli_home: Path) -> None:
    db = cli_home / "registry.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"\x00garbage" * 512)
    one_line_error(iotauth(cli_home, "devices", "list", ok=False), "corrupt")


def test_wrong_and_missing_passphrase_are_one_line(tmp_path: Path, csr_file: Path) -> None:
    home = tmp_path / "enc"
    result = iotauth(home, "init", env={"IOTAUTH_CA_PASSPHRASE": "correct horse"})
    assert "UNENCRYPTED" not in result.stderr
    one_line_error(
        iotauth(home, "issue", "d", "--csr", str(csr_file), env={"IOTAUTH_CA_PASSPHRASE": "wrong"}, ok=False),
        "wrong IOTAUTH_CA_PASSPHRASE",
    )
    one_line_error(iotauth(home, "issue", "d", "--csr", str(csr_file), ok=False), "set IOTAUTH_CA_PASSPHRASE")
    iotauth(
        home,
        "issue",
        "d",
        "--csr",
        str(csr_file),
        "--out",
        str(tmp_path / "d.pem"),
        env={"IOTAUTH_CA_PASSPHRASE": "correct horse"},
    )
    # Revoking needs no CA key: the registry changes, the CRL refresh is reported as a warning.
    revoke = iotauth(home, "revoke", "d")
    assert "CRL not refreshed" in revoke.stderr


def test_audit_verify_fails_on_tampering(cli_home: Path, csr_file: Path) -> None:
    iotauth(cli_home, "issue", "sensor-1", "--csr", str(csr_file), "--out", os.devnull)
    with sqlite3.connect(cli_home / "registry.db") as conn:
        conn.execute("DROP TRIGGER events_append_only_update")
        conn.execute("UPDATE events SET actor = 'nobody' WHERE id = 2")
    one_line_error(iotauth(cli_home, "audit", "verify", ok=False), "at event 2")
    report = iotauth(cli_home, "audit", "verify", "--json", ok=False)
    assert report.returncode == 1 and json.loads(report.stdout)["first_bad_id"] == 2


def test_a_rabbitmq_home_says_why_a_device_id_is_refused(tmp_path: Path, csr_factory: CsrFactory) -> None:
    home = tmp_path / "rabbit-home"
    data = json.loads(iotauth(home, "init", "--rabbitmq", "--json").stdout)
    assert "no '.'" in data["device_ids"] and "enabled = true" in (home / "iotauth.toml").read_text()
    csr = tmp_path / "d.csr"
    csr.write_bytes(csr_factory()[1].public_bytes(serialization.Encoding.PEM))
    one_line_error(iotauth(home, "issue", "meter.7", "--csr", str(csr), ok=False),
                   "[rabbitmq] enabled = true in iotauth.toml device ids use only A-Z a-z 0-9 _ -")
    iotauth(home, "issue", "meter-7", "--csr", str(csr))
    other = tmp_path / "plain-home"
    other.mkdir()
    (other / "iotauth.toml").write_text('trust_domain = "x.test"\n[rabbitmq]\nenabled = false\n')
    one_line_error(iotauth(other, "init", "--rabbitmq", ok=False), "exists with [rabbitmq] enabled = false")
