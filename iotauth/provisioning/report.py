"""The line's traceability report: one row per device, appended safely.

Several stations may append to one report on a shared disk, and a station
may be killed at any moment, so every append is one ``write()`` on an
``O_APPEND`` descriptor under an exclusive ``flock``: rows never interleave,
the CSV header is written exactly once (by whoever finds the file empty),
and a completed row is fsynced before the next device is reported. There is
no row cap and never a prompt: an existing report is simply extended.

``.csv`` gives CSV; ``.json`` / ``.jsonl`` give JSON Lines (one object per
line), because a JSON array cannot be appended to without rewriting it.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iotauth.errors import ConfigError

REPORT_FIELDS = (
    "device_id",
    "hardware_id",
    "serial",
    "fingerprint",
    "port",
    "station",
    "operator",
    "started_at",
    "finished_at",
    "result",
    "error",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def report_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".json", ".jsonl"):
        return "jsonl"
    raise ConfigError(f"report {path}: use a .csv, .json or .jsonl file name")


def _cell(value: Any) -> str:
    """Text safe for a spreadsheet: printable only, and never read as a formula."""
    text = "" if value is None else "".join(ch if ch.isprintable() else " " for ch in str(value))
    return "'" + text if text.startswith(_FORMULA_START) else text


def _render(rows: Sequence[Mapping[str, Any]], fmt: str, header: bool) -> bytes:
    if fmt == "jsonl":
        lines = (json.dumps({k: row.get(k) for k in REPORT_FIELDS}) + "\n" for row in rows)
        return "".join(lines).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(REPORT_FIELDS)
    for row in rows:
        writer.writerow([_cell(row.get(k)) for k in REPORT_FIELDS])
    return buffer.getvalue().encode()


def append_report(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append ``rows`` to the report at ``path`` (created if missing) atomically with respect to other writers."""
    if not rows:
        return
    fmt = report_format(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open report {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = memoryview(_render(rows, fmt, header=fmt == "csv" and os.fstat(fd).st_size == 0))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as exc:
        raise ConfigError(f"cannot append to report {path}: {exc.strerror}") from None
    finally:
        os.close(fd)  # closing releases the lock
