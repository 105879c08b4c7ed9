"""The Mosquitto follower's position lives in the registry, with its audit records, on every backend."""

from __future__ import annotations

import pytest

from iotauth.config import Home
from iotauth.export.managed.cursor import FeedCursor, FollowerRecord, to_apply
from iotauth.registry import EventKind, Registry, open_registry
from tests.fixtures.postgres import BACKENDS, backend_url


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest, home: Home) -> str:
    return backend_url(request, home)


async def test_a_new_follower_has_no_position_and_catches_up_from_a_saved_one(
    registry: Registry, registry_url: str
) -> None:
    cursor = FeedCursor(registry, "mosquitto:abc", "follower")
    assert await cursor.load() is None and cursor.position == 0
    first = await registry.record_event(EventKind.DEVICE_CREATED, actor="op", device_id="s1")
    await registry.record_event(EventKind.DEVICE_ACTIVE, actor="op", device_id="s1")
    batch = await cursor.pending()
    assert [e.kind for e in batch][-2:] == ["device.created", "device.active"]
    await cursor.advance(first)
    # Another process (a restarted follower) resumes after the saved event, not from "now".
    async with await open_registry(registry_url) as other:
        again = FeedCursor(other, "mosquitto:abc", "follower")
        assert await again.load() == first
        assert [e.kind for e in await again.pending()] == ["device.active"]


async def test_records_are_written_with_the_position_in_one_commit(registry: Registry) -> None:
    await registry.record_event(EventKind.DEVICE_REVOKED, actor="op", device_id="s2")
    head = await registry.last_event_id()
    cursor = FeedCursor(registry, "mosquitto:abc", "iotauth-mosquitto")
    await cursor.advance(head, [FollowerRecord(EventKind.MOSQUITTO_SESSION_KICKED, "s2", {"reason": "device-revoked"})])
    kicked = (await registry.events(after_id=head))[0]
    assert (kicked.kind, kicked.device_id, kicked.actor, kicked.data) == (
        "mosquitto.session.kicked", "s2", "iotauth-mosquitto", {"reason": "device-revoked"})
    assert await registry.follower_cursor("mosquitto:abc") == head
    assert (await registry.verify_audit()).ok
    # Its own records are never work for a follower (nor the broker's).
    assert to_apply([kicked]) == []


async def test_a_registry_restored_from_an_older_copy_moves_the_position_back(registry: Registry) -> None:
    head = await registry.last_event_id()
    await registry.save_follower_cursor("emqx:push", head + 50, actor="x")
    cursor = FeedCursor(registry, "emqx:push", "x")
    assert await cursor.load() == head and cursor.position == head
    cursor.position = head + 10
    assert await cursor.went_back() and cursor.position == head
    assert not await cursor.went_back()
