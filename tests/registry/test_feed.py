"""The change feed: another process's commit reaches a follower (NOTIFY on PostgreSQL, polling on SQLite)."""

from __future__ import annotations

import asyncio

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
