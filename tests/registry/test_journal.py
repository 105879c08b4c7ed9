"""The shared audit journal (station steps, broker decisions): batching, retries and failures, with a writer
whose operations the test runs by hand, and once against a real registry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from iotauth.errors import JournalWriteFailed
from iotauth.registry import EventKind, Registry
from iotauth.registry.journal import EventJournal


class RecordingTx:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None, dict[str, Any]]] = []

    def event(self, kind: EventKind, actor: str, device_id: str | None = None,
              data: dict[str, Any] | None = None) -> int:
        self.events.append((str(kind), actor, device_id, data or {}))
        return len(self.events)


class ManualWriter:
    """Queues write operations like the registry's writer; the test runs (or fails) them."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[[Any], Awaitable[Any]], asyncio.Future[Any]]] = []

    async def write(self, op: Callable[[Any], Awaitable[Any]]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queued.append((op, future))
        return await future

    async def run(self, *, repeats: int = 1, fail: Exception | None = None) -> RecordingTx:
        op, future = self.queued.pop(0)
        tx = RecordingTx()
        for _ in range(repeats):  # a batch that is split is re-run
            tx.events.clear()
            await op(tx)
        if fail is not None:
            future.set_exception(fail)
        else:
            future.set_result(None)
        await asyncio.sleep(0)
        return tx


async def test_records_buffered_before_the_writer_runs_share_one_operation() -> None:
    writer = ManualWriter()
    journal = EventJournal(writer, "station-1")
    for n in range(3):
        journal.record(EventKind.PROVISIONING_CHECKED, f"dev-{n}", {"n": n})
        journal.submit()
    await asyncio.sleep(0)
    assert len(writer.queued) == 1 and journal.backlog == 3
    tx = await writer.run()
    assert [(e[0], e[1], e[2]) for e in tx.events] == [("provisioning.checked", "station-1", f"dev-{n}")
                                                      for n in range(3)]
    assert journal.backlog == 0
    await journal.flush()


async def test_a_rerun_operation_writes_the_same_records_and_later_ones_wait_for_the_next() -> None:
    writer = ManualWriter()
    journal = EventJournal(writer, "broker@test")
    journal.record(EventKind.BROKER_CONNECT_ACCEPTED, "a", {})
    journal.submit()
    await asyncio.sleep(0)
    op, _ = writer.queued[0]
    first = RecordingTx()
    await op(first)  # the writer starts the batch: the records are taken now
    journal.record(EventKind.BROKER_CONNECT_ACCEPTED, "b", {})
    journal.submit()
    await asyncio.sleep(0)
    tx = await writer.run(repeats=2)
    assert [e[2] for e in tx.events] == ["a"]
    assert [e[2] for e in (await writer.run()).events] == ["b"]
    await journal.flush()


async def test_a_failed_write_is_reported_once_with_what_was_lost() -> None:
    writer = ManualWriter()
    journal = EventJournal(writer, "station-1", "the provisioning journal")
    for n in range(3):
        journal.record(EventKind.PROVISIONING_KEYED, None, {"n": n})
    journal.submit()
    await asyncio.sleep(0)
    await writer.run(fail=OSError("disk full"))
    with pytest.raises(JournalWriteFailed, match="the provisioning journal could not be written: disk full") as lost:
        await journal.flush()
    assert lost.value.lost == 3
    await journal.flush()  # reported once


async def test_a_write_that_overruns_is_cancelled_and_its_records_stay_buffered() -> None:
    writer = ManualWriter()
    journal = EventJournal(writer, "broker@test")
    journal.record(EventKind.BROKER_SESSION_KICKED, "d", {})
    with pytest.raises(JournalWriteFailed) as lost:
        await journal.flush(timeout=0.05)
    assert lost.value.lost == 0 and journal.backlog == 1
    journal.submit()  # a new write is queued for them
    await asyncio.sleep(0)
    assert len(writer.queued) == 2


async def test_records_reach_the_hash_chain(registry: Registry) -> None:
    journal = EventJournal(registry, "tester")
    journal.record(EventKind.PROVISIONING_FAILED, None, {"error": "x"})
    await journal.flush()
    events = await registry.events()
    assert [(e.kind, e.actor, e.data) for e in events[-1:]] == [("provisioning.failed", "tester", {"error": "x"})]
    assert (await registry.verify_audit()).ok
