"""The change feed: another process's commit reaches a follower (NOTIFY on PostgreSQL, polling on SQLite)."""

from __future__ import annotations

import asyncio

from iotauth.config import Home
from iotauth.registry import AuditEvent, Registry, RevocationReason, open_registry


async def _first_batch(registry: Registry, after: int, poll_interval: float) -> list[AuditEvent]:
    async for batch in registry.follow(after, poll_interval=poll_interval):
        return batch
    raise AssertionError("the feed ended")


async def test_follower_sees_a_revocation_committed_elsewhere(
    registry_url: str, registry: Registry, csr_factory: object
) -> None:
    # PostgreSQL must wake on NOTIFY: with a 30 s poll interval, polling alone would time out.
    poll = 30.0 if registry_url.startswith("postgresql://") else 0.05
    await registry.record_event("test.start", actor="test")
    cursor = await registry.last_event_id()
    follower = asyncio.create_task(_first_batch(registry, cursor, poll))
    await asyncio.sleep(0.3)  # the follower is now waiting
    async with await open_registry(registry_url) as other:
        await other.record_event("device.created", actor="elsewhere", device_id="sensor-9")
        await other.record_event(
            "certificate.revoked",
            actor="elsewhere",
            device_id="sensor-9",
            data={"reason": RevocationReason.KEY_COMPROMISE.value},
        )
    batch = await asyncio.wait_for(follower, timeout=10)
    assert batch[0].kind == "device.created"
    assert all(e.id > cursor for e in batch)


async def test_a_follower_goes_on_from_what_a_reopened_copy_shares(home: Home) -> None:
    """After mv/cp, events written to the orphan and to the copy get the same ids: the feed must not skip the
    copy's (an EMQX kick would be lost) and resumes from the last event both files share."""
    import shutil
    import sqlite3

    async with await open_registry(home.registry_db) as registry:
        feed = registry.follow(await registry.last_event_id(), poll_interval=0.02)
        await registry.record_event("device.created", actor="test", device_id="shared")
        assert [e.device_id for e in await anext(feed)] == ["shared"]
        conn = sqlite3.connect(home.registry_db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        orphan = home.registry_db.with_name("orphan.db")
        home.registry_db.rename(orphan)
        for suffix in ("-wal", "-shm"):  # the orphan keeps its (now unlinked) WAL; the copy gets its own
            home.registry_db.with_name(f"registry.db{suffix}").unlink(missing_ok=True)
        shutil.copyfile(orphan, home.registry_db)
        await registry.record_event("device.created", actor="test", device_id="orphan-only")
        (written,) = await anext(feed)
        assert written.device_id == "orphan-only"
        async with await open_registry(home.registry_db) as operator:
            await operator.record_event("device.revoked", actor="op", device_id="copy-only")
        assert await registry.ensure_identity()
        batch = await asyncio.wait_for(anext(feed), timeout=10)
        assert [e.device_id for e in batch] == ["copy-only"]
        assert batch[0].id == written.id  # the same id as the orphan's event: following on would have skipped it


async def test_events_of_some_kinds_only(registry: Registry) -> None:
    mark = await registry.last_event_id()
    await registry.record_event("device.created", actor="t", device_id="kinds-1")
    await registry.record_event("certificate.revoked", actor="t", device_id="kinds-1", data={"reason": "superseded"})
    await registry.record_event("certificate.activated", actor="t", device_id="kinds-1")
    found = await registry.events(after_id=mark, kinds=("certificate.revoked", "certificate.activated"))
    assert [e.kind for e in found] == ["certificate.revoked", "certificate.activated"]
    assert await registry.events(after_id=mark, kinds=()) == []
    assert [e.kind for e in await registry.events(after_id=mark, kinds=("device.created",), limit=5)] == [
        "device.created"]
