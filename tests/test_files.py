"""File writing: keys are private from the first byte; special files are never replaced."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from iotauth.errors import PkiError
from iotauth.files import write_public, write_secret


def test_secret_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    key = tmp_path / "k" / "key.pem"
    write_secret(key, b"secret")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(PkiError, match="refusing to overwrite"):
        write_secret(key, b"other")
    assert key.read_bytes() == b"secret"


def test_public_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "crl.pem"
    write_public(target, b"one")
    write_public(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["crl.pem"]  # no temp files left behind


def test_special_files_are_written_into_not_replaced(tmp_path: Path) -> None:
    """Regression: '--out /dev/null' once renamed a regular file over the device node."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_public(fifo, b"through the pipe")
    reader.join(timeout=10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
