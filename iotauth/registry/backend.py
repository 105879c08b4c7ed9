"""What a storage backend provides, and the group-commit writer they share.

Domain code (:mod:`iotauth.registry.service`) is written once against
:class:`Tx`. A backend supplies a connection and its dialect; the
:class:`WriteBatcher` here turns concurrent writes into one durable commit:

* writers queue an operation and await its result;
* the batcher opens one serialising transaction (SQLite ``BEGIN IMMEDIATE``,
  PostgreSQL an advisory lock), runs each queued operation in its own
  savepoint, appends their audit events to the hash chain and commits once;
* only after that commit returns (``synchronous=FULL`` / ``fsync``) does any
  caller get its result, so nothing is handed out before its record is durable.

Appending to the chain inside the serialising transaction is what keeps the
chain intact with several processes (or hosts) writing at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from iotauth.certs import now_utc, timestamp
from iotauth.errors import IotAuthError, RegistryError
from iotauth.registry.audit import GENESIS, canonical_json, event_hash
from iotauth.registry.events import EventKind

T = TypeVar("T")
Row = tuple[Any, ...]
MAX_BATCH = 512

class SqlConnection(Protocol):
    """The few primitives the batcher and the domain need; SQL uses ``?`` placeholders."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


@dataclass(frozen=True)
class Dialect:
    """How a backend opens its serialising write transaction and reports errors.

    Attributes:
        begin_write: statements that open a transaction no other writer (in any
            process, on any host) can interleave with.
        translate_error: maps a driver exception to a :class:`RegistryError`.
        announce: optional statement run before COMMIT when events were added,
            given the new highest event id (PostgreSQL NOTIFY, delivered on commit).
    """

    begin_write: tuple[str, ...]
    translate_error: Callable[[BaseException], RegistryError | None]
    announce: str | None = None


@dataclass
class _Chain:
    allocated: int
    head_hash: str
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def mark(self) -> tuple[int, str, int]:
        return self.allocated, self.head_hash, len(self.rows)

    def reset(self, mark: tuple[int, str, int]) -> None:
        self.allocated, self.head_hash, keep = mark
        del self.rows[keep:]


class Tx:
    """One operation's handle on the open write transaction."""

    def __init__(self, conn: SqlConnection, chain: _Chain, now: str) -> None:
        self._conn = conn
        self._chain = chain
        self.now = now
        self.wrote = False

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.wrote = True
        return await self._conn.execute(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.wrote = True
        await self._conn.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return await self._conn.fetchone(sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._conn.fetchall(sql, params)

    def event(
        self, kind: EventKind, actor: str, device_id: str | None = None, data: dict[str, Any] | None = None
    ) -> int:
        """Append an audit event to the chain; it is written with the transaction."""
        chain = self._chain
        event_id = chain.allocated + 1
        name = str(kind)  # the plain value: what the log stores and the chain hashes
        text = canonical_json(data or {})
        digest = event_hash(chain.head_hash, event_id, self.now, name, actor, device_id, text)
        chain.rows.append((event_id, self.now, name, actor, device_id, text, chain.head_hash, digest))
        chain.allocated, chain.head_hash = event_id, digest
        return event_id


@dataclass
class _Job:
    op: Callable[[Tx], Awaitable[Any]]
    future: asyncio.Future[Any]


class WriteBatcher:
    """Serialise and group-commit write operations on one connection."""

    def __init__(self, conn: SqlConnection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._committing = asyncio.Lock()

    async def swap(self, conn: SqlConnection) -> SqlConnection:
        """Write through ``conn`` from the next batch on; return the connection it replaces.

        Waits for a commit in flight, so no batch is ever split across two databases.
        """
        async with self._committing:
            old, self._conn = self._conn, conn
        return old

    async def submit(self, op: Callable[[Tx], Awaitable[T]]) -> T:
        if self._closed:
            raise RegistryError("the registry is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="iotauth-registry-writer")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(op, future))
        return await future

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            async with self._committing:
                await self._commit(batch)
            if stop:
                return

    async def _commit(self, batch: list[_Job]) -> None:
        """Run ``batch`` in one transaction and commit once.

        Operations validate before they write, so a refused operation usually
        leaves nothing to undo and the batch carries on without it. If one
        fails after writing, the batch is rolled back and every job is re-run
        in a transaction of its own.
        """
        results: list[tuple[bool, Any]] = []
        conn = self._conn
        try:
            for statement in self._dialect.begin_write:
                await conn.execute(statement)
            chain = await self._chain_head()
            for job in batch:
                tx = Tx(conn, chain, timestamp(now_utc()))
                mark = chain.mark()
                try:
                    results.append((True, await job.op(tx)))
                except Exception as exc:
                    if tx.wrote and len(batch) > 1:
                        raise _RetryAlone from exc
                    if tx.wrote:
                        raise
                    chain.reset(mark)
                    results.append((False, self._translate(exc)))
            if chain.rows:
                await conn.executemany(
                    "INSERT INTO events (id, ts, kind, actor, device_id, data, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    chain.rows,
                )
                await conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_allocated'", (str(chain.allocated),))
                if self._dialect.announce is not None:
                    await conn.execute(self._dialect.announce, (str(chain.allocated),))
            await conn.execute("COMMIT")
        except _RetryAlone:
            await self._rollback()
            for job in batch:
                await self._commit([job])
            return
        except BaseException as exc:
            await self._rollback()
            error = self._translate(exc)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for job, (ok, value) in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.execute("ROLLBACK")

    async def _chain_head(self) -> _Chain:
        row = await self._conn.fetchone("SELECT value FROM meta WHERE key = 'audit_allocated'")
        allocated = int(row[0]) if row else 0
        last = await self._conn.fetchone("SELECT hash FROM events ORDER BY id DESC LIMIT 1")
        return _Chain(allocated, last[0] if last else GENESIS)

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, _RetryAlone) and exc.__cause__ is not None:
            exc = exc.__cause__
        if isinstance(exc, Exception) and not isinstance(exc, IotAuthError):
            translated = self._dialect.translate_error(exc)
            if translated is not None:
                return translated
        return exc


class _RetryAlone(Exception):
    """An operation failed after writing inside a shared batch: split the batch."""
