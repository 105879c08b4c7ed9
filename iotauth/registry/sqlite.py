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

from iotauth.errors import Conflict, RegistryError
from iotauth.registry.backend import Dialect, Row

BUSY_TIMEOUT_MS = 30_000

# Each entry upgrades the schema by one version; PRAGMA user_version records where a database is.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id   TEXT PRIMARY KEY,
        hardware_id TEXT UNIQUE,
        profile     TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'revoked')),
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL
    );
    CREATE TABLE certificates (
        serial            TEXT PRIMARY KEY,
        fingerprint       TEXT NOT NULL UNIQUE,
        device_id         TEXT NOT NULL REFERENCES devices (device_id),
        public_key_sha256 TEXT NOT NULL,
        not_before        TEXT NOT NULL,
        not_after         TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
        issued_at         TEXT NOT NULL,
        activated_at      TEXT,
        revoked_at        TEXT,
        revocation_reason TEXT,
        pem               TEXT NOT NULL
    );
    CREATE INDEX certificates_device ON certificates (device_id);
    CREATE INDEX certificates_key ON certificates (public_key_sha256);
    CREATE INDEX certificates_status ON certificates (status);
    -- CRL building reads only these columns of non-active certificates: a covering partial index
    -- keeps it from scanning every certificate's PEM.
    CREATE INDEX certificates_crl ON certificates (not_after, serial, revoked_at, issued_at, revocation_reason, status)
        WHERE status <> 'active';
    CREATE INDEX devices_status ON devices (status);
    CREATE TABLE events (
        id        INTEGER PRIMARY KEY,
        ts        TEXT NOT NULL,
        kind      TEXT NOT NULL,
        actor     TEXT NOT NULL,
        device_id TEXT,
        data      TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    CREATE INDEX events_device ON events (device_id);
    CREATE INDEX events_ts ON events (ts);
    CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('audit_allocated', '0'), ('crl_number', '0');
    """,
)
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
        raise RegistryError(f"registry database {path} does not exist; run 'iotauth init' or check --home")
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
