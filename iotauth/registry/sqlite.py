"""The embedded SQLite backend (the default).

Two connections per process: one writer, owned by the group-commit batcher,
and one reader, so reads never observe a batch that might still roll back.
WAL mode lets the station, the broker and the CLI use one database file at
once; ``synchronous=FULL`` makes every commit reach the disk before it returns.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite

from iotauth.errors import Conflict, RegistryError, RegistryMissing
from iotauth.files import filesystem_problem, os_error_text
from iotauth.registry.backend import Dialect, Row
from iotauth.registry.schema import migrations
from iotauth.registry.store import Connections, read_instance_id

BUSY_TIMEOUT_MS = 30_000

# PRAGMA user_version records which of these a database has had.
MIGRATIONS = migrations("sqlite")
SCHEMA_VERSION = len(MIGRATIONS)


class SqliteConnection:
    """:class:`~iotauth.registry.backend.SqlConnection` over one aiosqlite connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.raw = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        # One thread hop: the cursor is not closed explicitly (no results to free).
        cursor = await self.raw.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = list(await self.raw.execute_fetchall(sql, params))
        return tuple(rows[0]) if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(row) for row in await self.raw.execute_fetchall(sql, params)]

    async def close(self) -> None:
        await self.raw.close()


_IO_CODES = frozenset({
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM,
})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def describe(exc: sqlite3.Error, path: Path, doing: str) -> RegistryError:
    """An SQLite error as one line that names the real cause.

    SQLite reports a full disk as "disk I/O error" (or "database or disk is
    full"), which reads like a damaged database; the file system is asked
    instead, so that the operator frees space rather than restores a backup.
    """
    code = _primary_code(exc)
    if code in _IO_CODES:
        cause = filesystem_problem(path)
        detail = f"{exc}: {cause}" if cause else str(exc)
        return RegistryError(f"registry database {path}: cannot {doing}: {detail}; the registry is unchanged")
    if code in _CORRUPT_CODES:
        return RegistryError(f"registry database {path} is corrupt or not an SQLite database: {exc}")
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"registry constraint violated: {exc}")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return RegistryError(f"registry database is busy (locked by another process for too long): {exc}")
    return RegistryError(f"registry database {path}: {exc}")


def dialect(path: Path) -> Dialect:
    """The write dialect for the database at ``path`` (errors name the file and the real cause)."""

    def translate(exc: BaseException) -> RegistryError | None:
        return describe(exc, path, "write") if isinstance(exc, sqlite3.Error) else None

    return Dialect(begin_write=("BEGIN IMMEDIATE",), translate_error=translate)


class SqliteStore:
    """The registry's SQLite file: open it (refusing what is not an iotauth registry) and notice a replacement."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self.dialect = dialect(path)

    async def connect(self, *, create: bool) -> Connections:
        """Open (and migrate) the database; return the writer and reader connections.

        Without ``create`` the file must exist *and* hold an iotauth schema: a
        truncated or foreign file is refused, never turned into a new, empty
        registry (which would, for one, publish a CRL without the revocations).
        With ``create`` (``iotauth init``) a new or empty file gets the schema,
        but a non-empty foreign database is never adopted.
        """
        path = self.path
        if not create and not path.exists():
            raise RegistryMissing(str(path))
        writer = await _open(path, create=create)
        try:
            await _migrate(writer, path, create=create)
            file_id = _file_id(path)
            instance_id = await read_instance_id(writer, str(path))
            reader = await _open(path, create=False)
        except sqlite3.Error as exc:
            await writer.close()
            raise describe(exc, path, "open it") from exc
        except FileNotFoundError as exc:
            await writer.close()
            raise RegistryMissing(str(path)) from exc
        except BaseException:
            await writer.close()
            raise
        if not _same_file(path, file_id):  # replaced while we opened it: let the caller try again
            await writer.close()
            await reader.close()
            raise RegistryError(f"registry database {path} was replaced while it was being opened")
        return Connections(writer, reader, instance_id, (writer.close, reader.close), file_id=file_id)

    async def changed(self, current: Connections) -> str | None:
        try:
            now = _file_id(self.path)
        except FileNotFoundError:
            return f"registry database {self.path} was removed"
        except OSError as exc:
            return f"registry database {self.path} cannot be examined: {os_error_text(exc)}"
        if now != current.file_id:
            return (f"registry database {self.path} was replaced by another file "
                    f"(device:inode {_show(current.file_id)} -> {_show(now)})")
        try:
            found = await read_instance_id(current.reader, str(self.path))
        except sqlite3.Error as exc:
            raise describe(exc, self.path, "read it") from exc
        if found != current.instance_id:
            return (f"registry database {self.path} was overwritten in place "
                    f"(instance id {found}, not {current.instance_id})")
        return None


def _file_id(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _same_file(path: Path, file_id: tuple[int, int]) -> bool:
    try:
        return _file_id(path) == file_id
    except OSError:
        return False


def _show(file_id: tuple[int, int] | None) -> str:
    return f"{file_id[0]}:{file_id[1]}" if file_id else "none"


async def _open(path: Path, *, create: bool) -> SqliteConnection:
    # A URI with mode=rw never creates the file: a registry removed between the check and the open stays missing.
    uri = f"file:{quote(str(path))}?mode={'rwc' if create else 'rw'}"
    try:
        raw = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        if not create and not path.exists():  # noqa: ASYNC240 - one stat() to name the cause
            raise RegistryMissing(str(path)) from exc
        raise describe(exc, path, "open it") from exc
    conn = SqliteConnection(raw)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await _check_schema(conn, path, create=create)  # before WAL mode: that would write to a foreign file
        mode = await conn.fetchone("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        await conn.close()
        raise describe(exc, path, "open it") from exc
    except BaseException:
        await conn.close()
        raise
    if mode is None or str(mode[0]).lower() != "wal":
        await conn.close()
        raise RegistryError(f"registry database {path} could not be switched to WAL mode (got {mode})")
    return conn


async def _check_schema(conn: SqliteConnection, path: Path, *, create: bool) -> None:
    """Refuse a file without an iotauth schema, unless ``create`` and it is empty."""
    row = await conn.fetchone("PRAGMA user_version")
    if row is not None and int(row[0]) > 0:
        return
    objects = await conn.fetchone("SELECT count(*) FROM sqlite_master")
    count = int(objects[0]) if objects else 0
    if not create:
        what = "an empty file" if count == 0 else f"a foreign SQLite database ({count} schema objects)"
        raise RegistryError(
            f"registry database {path} is {what}, not an iotauth registry; refusing to use it "
            "(restore it from a backup, or point --registry at the right file)"
        )
    if count:
        raise RegistryError(
            f"{path} is a foreign SQLite database ({count} schema objects, no iotauth schema); "
            "'iotauth init' will not adopt it: move it away or choose another --registry"
        )


async def _migrate(conn: SqliteConnection, path: Path, *, create: bool) -> None:
    row = await conn.fetchone("PRAGMA user_version")
    if row is not None and int(row[0]) == SCHEMA_VERSION:
        return  # the usual case: no write lock needed to open a current registry
    try:
        await conn.execute("BEGIN IMMEDIATE")
        row = await conn.fetchone("PRAGMA user_version")
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry database {path} has schema version {version}, newer than this iotauth "
                f"supports ({SCHEMA_VERSION}); upgrade iotauth"
            )
        if version == 0:
            await _check_schema(conn, path, create=create)  # another process may have changed it meanwhile
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number + 1}")
        await conn.execute("COMMIT")
    except sqlite3.Error as exc:
        await _rollback_quietly(conn)
        if _primary_code(exc) in _IO_CODES:
            raise describe(exc, path, "migrate it") from exc
        raise RegistryError(f"registry database {path} is corrupt or not an iotauth registry: {exc}") from exc
    except BaseException:
        await _rollback_quietly(conn)
        raise


async def _rollback_quietly(conn: SqliteConnection) -> None:
    with contextlib.suppress(sqlite3.Error):
        await conn.execute("ROLLBACK")


def _statements(script: str) -> list[str]:
    """Split a migration script into statements, keeping trigger bodies whole."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
