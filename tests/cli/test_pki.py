"""``iotauth issue`` and friends when the disk is full: the real cause is named and nothing is lost.

The disk is a small tmpfs mounted by the test (root only; skipped otherwise),
filled up with a file the way a runaway log fills a real one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.fixtures.cli import CsrFactory, iotauth, one_line_error


class SmallDisk:
    """A 4 MiB tmpfs that can be filled to the last byte and freed again."""

    def __init__(self, mountpoint: Path) -> None:
        self.path = mountpoint
        self.filler = mountpoint / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        failure = 0
        try:
            for size in (65536, 4096, 1):  # to the last byte
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        failure = exc.errno or 0
                        break
        finally:
            os.close(fd)
        assert failure == errno.ENOSPC

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield SmallDisk(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_under_the_registry_is_named_and_loses_nothing(small_disk: SmallDisk, csr_file: Path,
                                                                  tmp_path: Path, csr_factory: CsrFactory) -> None:
    home = small_disk.path / "home"
    iotauth(home, "init")
    iotauth(home, "issue", "d0", "--csr", str(csr_file))
    other_csr = tmp_path / "d1.csr"
    other_csr.write_bytes(csr_factory()[1].public_bytes(serialization.Encoding.PEM))
    small_disk.fill()

    for args in (("issue", "d1", "--csr", str(other_csr)), ("revoke", "d0")):
        result = iotauth(home, *args, ok=False)
        one_line_error(result, "ENOSPC")
        assert "corrupt" not in result.stderr and "is full" in result.stderr
    listing = iotauth(home, "devices", "list", "--json", ok=False)  # a read may work, or name the same cause
    assert listing.returncode == 0 or ("ENOSPC" in listing.stderr and "corrupt" not in listing.stderr)

    small_disk.free()
    devices = {d["device_id"]: d["status"] for d in json.loads(iotauth(home, "devices", "list", "--json").stdout)}
    assert devices == {"d0": "active"}  # nothing half-done: the failed issue and revoke changed nothing
    iotauth(home, "audit", "verify")
    iotauth(home, "revoke", "d0")
    iotauth(home, "issue", "d1", "--csr", str(other_csr), "--json")


def test_a_certificate_file_that_cannot_be_written_is_not_lost_and_a_retry_issues_nothing_new(
    cli_home: Path, csr_file: Path, small_disk: SmallDisk
) -> None:
    out = small_disk.path / "d2.pem"
    small_disk.fill()
    failed = iotauth(cli_home, "issue", "d2", "--csr", str(csr_file), "--out", str(out), ok=False)
    one_line_error(failed, "ENOSPC")
    shown = json.loads(iotauth(cli_home, "devices", "show", "d2", "--json").stdout)
    (record,) = shown["certificates"]
    assert record["status"] == "active"
    assert f"certificate {record['serial']} for d2 is issued and active" in failed.stderr
    assert "iotauth devices show d2 --pem" in failed.stderr

    fetched = iotauth(cli_home, "devices", "show", "d2", "--pem").stdout
    assert x509.load_pem_x509_certificate(fetched.encode()).serial_number == int(record["serial"], 16)

    again = iotauth(cli_home, "issue", "d2", "--csr", str(csr_file), "--out", str(out), ok=False)  # still full
    assert record["serial"] in again.stderr
    small_disk.free()
    retried = json.loads(iotauth(cli_home, "issue", "d2", "--csr", str(csr_file), "--out", str(out),
                                 "--json").stdout)
    assert retried["serial"] == record["serial"] and retried["reused"] is True
    assert out.read_text() == fetched
    shown = json.loads(iotauth(cli_home, "devices", "show", "d2", "--json").stdout)
    assert [c["serial"] for c in shown["certificates"]] == [record["serial"]]  # one certificate in the field


def test_a_retry_with_another_status_is_refused_naming_the_existing_serial(cli_home: Path, csr_file: Path) -> None:
    first = json.loads(iotauth(cli_home, "issue", "d3", "--csr", str(csr_file), "--pending", "--json").stdout)
    refused = iotauth(cli_home, "issue", "d3", "--csr", str(csr_file), ok=False)
    one_line_error(refused, f"already has pending certificate {first['serial']}")
    full = iotauth(cli_home, "devices", "show", "d3", "--pem", "--fullchain").stdout
    assert full.count("BEGIN CERTIFICATE") == 2
    one_line_error(iotauth(cli_home, "devices", "show", "d3", "--pem", "--serial", "ff", ok=False),
                   "has no certificate ff")
