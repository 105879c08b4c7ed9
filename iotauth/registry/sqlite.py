"""The embedded SQLite backend (the default).

Two connections per process: one writer, owned by the group-commit batcher,
and one reader, so reads never observe a batch that might still roll back.
WAL mode lets the station, the broker and the CLI use one database file at
once; ``synchronous=FULL`` makes every commit reach the disk before it returns.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from iotauth.errors import Conflict, RegistryError, RegistryMissing
from iotauth.registry.backend import Dialect, Row
from iotauth.registry.schema import migrations

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


def translate_error(exc: BaseException) -> RegistryError | None:
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"registry constraint violated: {exc}")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return RegistryError(f"registry database is busy (locked by another process for too long): {exc}")
    if isinstance(exc, sqlite3.DatabaseError):
        return RegistryError(f"registry database error: {exc}")
    return None


SQLITE_DIALECT = Dialect(begin_write=("BEGIN IMMEDIATE",), translate_error=translate_error)


async def connect(path: Path, *, create: bool) -> tuple[SqliteConnection, SqliteConnection]:
    """Open (and migrate) the database; return the writer and reader connections."""
    if not create and not path.exists():  # noqa: ASYNC240 - one stat() before opening
        raise RegistryMissing(str(path))
    writer = await _open(path)
    try:
        await _migrate(writer, path)
        reader = await _open(path)
    except BaseException:
        await writer.close()
        raise
    return writer, reader


async def _open(path: Path) -> SqliteConnection:
    try:
        raw = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot open registry database {path}: {exc}") from exc
    conn = SqliteConnection(raw)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = await conn.fetchone("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        await conn.close()
        raise RegistryError(f"registry database {path} is corrupt or not an SQLite database: {exc}") from exc
    if mode is None or str(mode[0]).lower() != "wal":
        await conn.close()
        raise RegistryError(f"registry database {path} could not be switched to WAL mode (got {mode})")
    return conn


async def _migrate(conn: SqliteConnection, path: Path) -> None:
    try:
        await conn.execute("BEGIN IMMEDIATE")
        row = await conn.fetchone("PRAGMA user_version")
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry database {path} has schema version {version}, newer than this iotauth "
                f"supports ({SCHEMA_VERSION}); upgrade iotauth"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number + 1}")
        await conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        await _rollback_quietly(conn)
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
