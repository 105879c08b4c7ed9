"""The Mosquitto follower's position in the change feed, kept in the registry with its audit records.

The position is the registry's follower cursor (``meta``, ``cursor:<name>``,
shared with the EMQX and RabbitMQ followers of :mod:`iotauth.export.follower`):

* a follower that was down catches up from where it stopped (the Mosquitto
  follower also reconciles everything at start);
* **its own audit records are written with the position, in one
  transaction**, so the log says what was done (a kick, a sync) exactly when
  the position says the events behind it were applied;
* a registry that went back in time (restored from an older copy: its newest
  event is older than the saved position) is noticed and the position moves
  back, loudly; the follower then reconciles everything.

The position only moves after a batch has been applied, so a failed batch is
applied again; every action of the follower is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from iotauth.registry.cursors import FeedFollowing as CursorStore
from iotauth.registry.events import EventKind, written_by_follower
from iotauth.registry.models import AuditEvent

log = logging.getLogger("iotauth.mosquitto")


@dataclass(frozen=True)
class FollowerRecord:
    """An audit record a follower writes about its own work (a kick, a sync)."""

    kind: EventKind
    device_id: str | None
    data: Mapping[str, Any] = field(default_factory=dict)


class FeedCursor:
    """One follower's position in the change feed.

    Args:
        registry: where events are read and the position is kept.
        name: the follower's name in ``follower_cursors`` (e.g. ``mosquitto:<export id>``).
        actor: the audit actor of the records it writes.
    """

    def __init__(self, registry: CursorStore, name: str, actor: str) -> None:
        self.registry = registry
        self.name = name
        self.actor = actor
        self.position = 0
        self.saved: int | None = None

    async def load(self) -> int | None:
        """Read the saved position (None: this follower never ran); ``position`` starts there, or at 0.

        A saved position beyond the registry's newest event means the registry
        was restored from an older copy: the position moves back to its head.
        """
        saved = await self.registry.follower_cursor(self.name)
        head = await self.registry.last_event_id()
        if saved is not None and saved > head:
            log.error("follower %s was at event %d but the registry ends at %d (restored from a backup?); "
                      "starting from %d", self.name, saved, head, head)
            saved = head
        self.saved = saved
        self.position = saved if saved is not None else 0
        return saved

    async def head(self) -> int:
        """The registry's newest event id (read it *before* a full reconcile reads the state it covers)."""
        return await self.registry.last_event_id()

    async def pending(self, limit: int = 500) -> list[AuditEvent]:
        """Events after the position, oldest first, at most ``limit`` (followers' own records included)."""
        return await self.registry.events(after_id=self.position, limit=limit)

    async def wait(self, interval: float) -> None:
        """Until a commit may have added events (PostgreSQL NOTIFY), or ``interval`` seconds (SQLite)."""
        await self.registry.wait_for_change(interval)

    async def went_back(self) -> bool:
        """Whether the registry's newest event is now older than the position (a restore): then move back."""
        head = await self.registry.last_event_id()
        if head >= self.position:
            return False
        log.error("registry event ids went back from %d to %d (restored from a backup?)", self.position, head)
        self.position = head
        return True

    async def advance(self, event_id: int, records: Sequence[FollowerRecord] = ()) -> None:
        """Save ``event_id`` as the position, with ``records`` appended to the audit log in the same commit."""
        await self.registry.save_follower_cursor(
            self.name,
            event_id,
            actor=self.actor,
            records=[(r.kind, r.device_id, dict(r.data)) for r in records],
        )
        self.position = self.saved = event_id


def to_apply(batch: Sequence[AuditEvent]) -> list[AuditEvent]:
    """The events of ``batch`` a follower may have to act on (not brokers' or followers' own records)."""
    return [event for event in batch if not written_by_follower(event.kind)]
