"""Writing keys and published files without ever exposing or clobbering them.

Private keys are created with mode 0600 from the first byte (``O_CREAT`` with
the mode, never chmod after the fact) and with ``O_EXCL``, so an existing key
is never overwritten. Public files are replaced atomically, so readers such as
a broker reloading its CRL never see a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from iotauth.errors import PkiError


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; refuse if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"refusing to overwrite existing private key {path}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def replace_secret(path: Path, data: bytes) -> None:
    """Atomically replace the private key ``path``: a new 0600 file beside it, fsynced, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _replace(path, data, 0o600)


def write_public(path: Path, data: bytes, mode: int = 0o644, group: int | None = None) -> None:
    """Atomically replace ``path`` with ``data`` (write to a temp file, fsync, rename).

    ``group``: hand the file to this group id (owner root) before it appears,
    so a reader running as that group never finds it unreadable (a broker
    that drops to its own account, reloading a CRL).

    A target that exists but is not a regular file (``/dev/stdout``, a FIFO, a
    device) is written to directly: renaming over it would replace the device
    node itself.
    """
    if path.exists() and not path.is_file():
        with open(path, "wb") as out:
            out.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, data, mode, group)


def _replace(path: Path, data: bytes, mode: int, group: int | None = None) -> None:
    """Write a temporary file beside ``path`` (created 0600 by mkstemp), fsync, chmod, rename over, fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, 0, group)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or an unlink in ``directory`` durable (a power cut cannot undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_text(exc: OSError) -> str:
    """An OSError as an operator reads it: the reason and its errno name (``No space left on device (ENOSPC)``)."""
    name = errno.errorcode.get(exc.errno or 0)
    reason = exc.strerror or str(exc)
    return f"{reason} ({name})" if name else reason


def filesystem_problem(path: Path) -> str | None:
    """Why the file system holding ``path`` cannot take writes, if it visibly cannot (else None).

    Libraries above the OS (SQLite above all) report a full disk as a generic
    "disk I/O error"; this names the real cause so that nobody mistakes a full
    disk for a corrupt database.
    """
    directory = path if path.is_dir() else path.parent
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        return f"the file system holding {directory} cannot be examined: {os_error_text(exc)}"
    if stats.f_flag & os.ST_RDONLY:
        return f"the file system holding {directory} is read-only (EROFS)"
    free = stats.f_bavail * stats.f_frsize
    if free < 64 * 1024 or (stats.f_files and not stats.f_favail):
        what = f"{free} bytes free" if free < 64 * 1024 else "no free inodes"
        return f"the file system holding {directory} is full (ENOSPC: {what})"
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable by this user (EACCES)"
    return None
