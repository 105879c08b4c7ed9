"""Audit records buffered in memory and appended to the hash chain in the registry's group commit.

Two writers of many small records share this: the provisioning station (a
record per step, per port) and the broker (accepts, denials, kicks). Neither
may wait for a commit per record. A journal buffers records and hands the
registry's writer one operation that, when the writer runs it, takes *every*
record buffered by then. At most one such operation waits in the writer's
queue at a time, so under load a journal costs one operation per commit, not
one per record. The operation keeps the records it took, so a batch that the
writer re-runs (see :class:`~iotauth.registry.backend.WriteBatcher`) writes
the same records again, never others.

When to submit is the caller's policy: the station submits at every record
(so a step's record is committed while the next step talks to the board),
the broker every 50 ms (so a connect never pays for a commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from iotauth.errors import JournalWriteFailed
from iotauth.registry.backend import Tx
from iotauth.registry.events import EventKind

T = TypeVar("T")
Record = tuple[EventKind, str | None, dict[str, Any]]


class EventWriter(Protocol):
    """What a journal needs from the registry: its serialised, group-committed write."""

    async def write(self, op: Callable[[Tx], Awaitable[T]]) -> T: ...


class EventJournal:
    """Buffered audit records of one actor (see the module docstring).

    Args:
        writer: the registry (its :meth:`~iotauth.registry.Registry.write`).
        actor: who the records are written as.
        name: what to call the journal in a failure message.
    """

    def __init__(self, writer: EventWriter, actor: str, name: str = "the audit journal") -> None:
        self._writer = writer
        self.actor = actor
        self.name = name
        self._buffer: list[Record] = []
        self._queued = False
        self._writes: dict[asyncio.Task[None], list[Record]] = {}
        self._error: BaseException | None = None
        self._lost = 0

    @property
    def backlog(self) -> int:
        """Records buffered and not yet taken by a write."""
        return len(self._buffer)

    def record(self, kind: EventKind, device_id: str | None, data: dict[str, Any]) -> None:
        """Buffer one record; the next :meth:`submit` writes it."""
        self._buffer.append((kind, device_id, data))

    def submit(self) -> None:
        """Queue a write of the buffered records, unless one is queued that has not taken its records yet."""
        if self._queued or not self._buffer:
            return
        self._queued = True
        taken: list[Record] = []
        started = False

        async def op(tx: Tx) -> None:
            nonlocal started
            if not started:  # first run; a batch that is retried re-runs the op with the same records
                started, self._queued = True, False
                taken.extend(self._buffer)
                self._buffer = []
            for kind, device_id, data in taken:
                tx.event(kind, self.actor, device_id, data)

        task = asyncio.get_running_loop().create_task(self._writer.write(op), name="iotauth-journal")
        self._writes[task] = taken
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        records = self._writes.pop(task, [])
        if task.cancelled():
            failure: BaseException | None = TimeoutError("the write did not complete in time")
        else:
            failure = task.exception()
        if failure is None:
            return
        if not records and self._queued:  # cancelled before it took anything: those records are still buffered
            self._queued = False
        self._lost += len(records)
        if self._error is None:
            self._error = failure

    async def barrier(self) -> None:
        """Return once every record so far is queued in the registry's writer.

        The writer is FIFO and the write task enqueues its operation in its
        first step, which the event loop runs before resuming this coroutine:
        the caller's next write commits after these records (usually together).

        Raises:
            JournalWriteFailed: an earlier write of this journal failed.
        """
        self.submit()
        await asyncio.sleep(0)
        self._raise_failure()

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - cancels what overruns
        """Wait until every record so far is durable (records added meanwhile are not waited for).

        Args:
            timeout: give up on writes that take longer (they are cancelled and their records lost).

        Raises:
            JournalWriteFailed: a write of this journal failed (since the last time one was reported).
        """
        await self.barrier()
        if self._writes:
            _, late = await asyncio.wait(list(self._writes), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, lost, self._error, self._lost = self._error, self._lost, None, 0
            raise JournalWriteFailed(f"{self.name} could not be written: {error}", lost) from error
