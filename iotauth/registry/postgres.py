"""The PostgreSQL backend: one registry for many stations and broker nodes.

Writers on every host serialise on one transaction-scoped advisory lock, which
plays the part SQLite's ``BEGIN IMMEDIATE`` plays locally: the audit chain is
extended by exactly one writer at a time, so it stays a chain. Each commit
that adds events sends ``NOTIFY iotauth_events``; brokers and authorizers
LISTEN, so revocations reach every node at once instead of at the next poll.
Commits are synchronous (``synchronous_commit = on`` is forced per session).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from iotauth.errors import Conflict, RegistryError
from iotauth.registry.backend import Dialect, Row
from iotauth.registry.schema import migrations
from iotauth.registry.store import Connections, read_instance_id

try:
    import asyncpg
except ImportError:  # pragma: no cover - exercised only without the extra installed
    asyncpg = None

CHANNEL = "iotauth_events"
WRITE_LOCK = 0x107A07  # advisory lock key shared by every iotauth writer
SCHEMA_LOCK = 0x107A08

MIGRATIONS = migrations("postgresql")  # the iotauth_schema table records how many have run
SCHEMA_VERSION = len(MIGRATIONS)


def to_numbered(sql: str) -> str:
    """Rewrite ``?`` placeholders as ``$1, $2, ...`` (outside string literals)."""
    out, n, quoted = [], 0, False
    for char in sql:
        if char == "'":
            quoted = not quoted
        if char == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(char)
    return "".join(out)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresConnection:
    """:class:`~iotauth.registry.backend.SqlConnection` over one asyncpg connection (or a pool)."""

    def __init__(self, target: Any) -> None:
        self.raw = target
        self._sql: dict[str, str] = {}

    def _numbered(self, sql: str) -> str:
        cached = self._sql.get(sql)
        if cached is None:
            cached = self._sql[sql] = to_numbered(sql)
        return cached

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status: str = await self.raw.execute(self._numbered(sql), *params)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(self._numbered(sql), rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row = await self.raw.fetchrow(self._numbered(sql), *params)
        return tuple(row) if row is not None else None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self.raw.fetch(self._numbered(sql), *params)]

    async def close(self) -> None:
        await self.raw.close()


def translate_error(exc: BaseException) -> RegistryError | None:
    if asyncpg is None:
        return None
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return Conflict(f"registry constraint violated: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return RegistryError(f"registry database error: {exc}")
    if isinstance(exc, OSError | asyncpg.InterfaceError):
        return RegistryError(f"registry database connection failed: {exc}")
    return None


POSTGRES_DIALECT = Dialect(
    begin_write=("BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"),
    translate_error=translate_error,
    announce=f"SELECT pg_notify('{CHANNEL}', ?)",
)


class ChangeListener:
    """LISTEN on the event channel; :meth:`wait` returns when a commit announced events."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._event = asyncio.Event()

    async def start(self) -> None:
        await self._conn.add_listener(CHANNEL, self._notified)

    def _notified(self, *_: object) -> None:
        self._event.set()

    async def wait(self, interval: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), interval)
        self._event.clear()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()


class PostgresStore:
    """A PostgreSQL registry: connect (refusing a database without the iotauth schema) and notice a replacement."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.location = redact(url)
        self.dialect = POSTGRES_DIALECT

    async def connect(self, *, create: bool) -> Connections:
        writer, reader, listener = await connect(self._url, create=create)
        try:
            instance_id = await read_instance_id(writer, self.location)
        except BaseException:
            for close in (writer.close, reader.close, listener.close):
                with contextlib.suppress(Exception):
                    await close()
            raise
        return Connections(writer, reader, instance_id, (writer.close, reader.close, listener.close),
                           wait_change=listener.wait)

    async def changed(self, current: Connections) -> str | None:
        """A lost writer connection, or another instance id behind the URL (a dropped and restored database)."""
        writer = current.writer
        if isinstance(writer, PostgresConnection) and writer.raw.is_closed():
            return f"the connection to registry {self.location} was lost"
        try:
            found = await read_instance_id(current.reader, self.location)
        except Exception as exc:
            translated = translate_error(exc)
            if translated is None:
                raise
            raise translated from exc
        if found != current.instance_id:
            return f"registry {self.location} was replaced (instance id {found}, not {current.instance_id})"
        return None


async def connect(url: str, *, create: bool = False) -> tuple[PostgresConnection, PostgresConnection, ChangeListener]:
    """Connect the writer, a reader pool and the change listener; migrate the schema.

    Without ``create`` the database must already hold the iotauth schema (``iotauth init`` creates it):
    an empty or foreign database is refused rather than silently becoming a new, empty registry.
    """
    if asyncpg is None:
        raise RegistryError("the PostgreSQL registry needs asyncpg: pip install 'iotauth[postgresql]'")
    try:
        writer_raw = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise RegistryError(f"cannot connect to registry {redact(url)}: {exc}") from exc
    writer = PostgresConnection(writer_raw)
    try:
        await writer.execute("SET synchronous_commit = on")
        await _migrate(writer, url, create=create)
        reader = PostgresConnection(await asyncpg.create_pool(url, min_size=1, max_size=4, timeout=10))
        listener = ChangeListener(await asyncpg.connect(url, timeout=10))
        await listener.start()
    except BaseException as exc:
        await writer.close()
        if isinstance(exc, asyncpg.PostgresError | OSError):
            raise RegistryError(f"cannot open registry {redact(url)}: {exc}") from exc
        raise
    return writer, reader, listener


async def _migrate(conn: PostgresConnection, url: str, *, create: bool) -> None:
    await conn.execute(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
    try:
        exists = await conn.fetchone("SELECT to_regclass('iotauth_schema') IS NOT NULL")
        if not (exists and exists[0]) and not create:
            raise RegistryError(
                f"registry {redact(url)} has no iotauth schema (an empty or foreign database); refusing to use it "
                "(run 'iotauth init' with this --registry to create a new registry)"
            )
        await conn.execute("CREATE TABLE IF NOT EXISTS iotauth_schema (version INTEGER NOT NULL)")
        row = await conn.fetchone("SELECT version FROM iotauth_schema")
        if row is None:
            await conn.execute("INSERT INTO iotauth_schema (version) VALUES (0)")
            version = 0
        else:
            version = int(row[0])
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {redact(url)} has schema version {version}, newer than this iotauth supports "
                f"({SCHEMA_VERSION}); upgrade iotauth"
            )
        for number in range(version, SCHEMA_VERSION):
            async with conn.raw.transaction():
                await conn.raw.execute(MIGRATIONS[number])
                await conn.execute("UPDATE iotauth_schema SET version = ?", (number + 1,))
    finally:
        await conn.execute(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")
