"""Reading the audit log: the registry's change feed, and the check of its hash chain.

Every state change is an event in the same transaction as the change, so the
events table doubles as a change feed: a follower remembers the id of the
last event it applied and reads the ones after it (one indexed range query).
Brokers, the EMQX push, the CRL endpoint and the Mosquitto export watch all
follow it; :mod:`iotauth.registry.events` says which events each acts on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from iotauth.identity import validate_device_id
from iotauth.registry import rows
from iotauth.registry.audit import expect_head, verify_chain
from iotauth.registry.backend import SqlConnection
from iotauth.registry.models import AuditEvent, AuditReport

RESYNC_WINDOW = 4096  # recent event hashes a follower keeps to find where a reopened database parts from it


class EventFeed:
    """Reads of the events table over the registry's reader connection.

    Args:
        reader: the read connection (never the writer, so reads never see a batch that may roll back).
        wait_change: waits for a commit announcement (PostgreSQL NOTIFY), if the backend has one.
    """

    generation = 0
    """Bumped when the registry reopens its database (see ``Registry.reopen``)."""

    def __init__(self, reader: SqlConnection, wait_change: Callable[[float], Awaitable[None]] | None) -> None:
        self._reader = reader
        self._wait_change = wait_change

    async def events(
        self,
        *,
        after_id: int = 0,
        since: str | None = None,
        device_id: str | None = None,
        kinds: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        """Events after ``after_id``, oldest first (optionally since a time, of one device, of these kinds)."""
        sql = f"SELECT {rows.EVENT_COLUMNS} FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if kinds is not None:
            if not kinds:
                return []
            sql += f" AND kind IN ({', '.join('?' for _ in kinds)})"
            params.extend(kinds)
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(validate_device_id(device_id))
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [rows.event(r) for r in await self._reader.fetchall(sql, params)]

    async def has_events(self, *, after_id: int, kind_prefixes: Sequence[str]) -> bool:
        """Whether any event after ``after_id`` has a kind starting with one of ``kind_prefixes``."""
        if not kind_prefixes:
            return False
        condition = " OR ".join("kind LIKE ?" for _ in kind_prefixes)
        row = await self._reader.fetchone(
            f"SELECT 1 FROM events WHERE id > ? AND ({condition}) LIMIT 1",
            (after_id, *(f"{prefix}%" for prefix in kind_prefixes)),
        )
        return row is not None

    async def last_event_id(self) -> int:
        row = await self._reader.fetchone("SELECT MAX(id) FROM events")
        return int(row[0]) if row and row[0] is not None else 0

    async def wait_for_change(self, interval: float) -> None:
        """Return when a commit may have added events (PostgreSQL NOTIFY), or after ``interval`` seconds.

        For consumers that poll :meth:`events` themselves (the broker times
        every read, to fail closed) but still want push wake-ups where the
        backend has them. SQLite has none: this just sleeps.
        """
        if self._wait_change is not None:
            await self._wait_change(interval)
        else:
            await asyncio.sleep(interval)

    async def follow(self, after_id: int, poll_interval: float = 0.05) -> AsyncIterator[list[AuditEvent]]:
        """Yield batches of new events forever: the registry's change feed.

        Backends with push notification (PostgreSQL LISTEN) wake up at once;
        SQLite is polled every ``poll_interval`` seconds with one indexed query.
        If the registry reopens its database (a copy of it replaced the file),
        the feed goes on from the last event both databases share, so events
        written only to the copy are not skipped.
        """
        cursor = after_id
        seen: dict[int, str] = {}
        generation = self.generation
        while True:
            if self.generation != generation:
                generation = self.generation
                cursor = await self._shared_until(cursor, seen)
            batch = await self.events(after_id=cursor, limit=1000)
            if batch:
                cursor = batch[-1].id
                seen.update((event.id, event.hash) for event in batch)
                for old in sorted(seen)[: max(0, len(seen) - RESYNC_WINDOW)]:
                    del seen[old]
                yield batch
                continue
            await self.wait_for_change(poll_interval)

    async def _shared_until(self, cursor: int, seen: dict[int, str]) -> int:
        """The last event id (at most ``cursor``) whose hash this database shares with what was followed."""
        start = min(cursor, await self.last_event_id())
        if not seen or start < min(seen):
            return start
        low = min(seen)
        theirs = {e.id: e.hash for e in await self.events(after_id=low - 1, limit=start - low + 1)}
        for event_id in range(start, low - 1, -1):
            if theirs.get(event_id) == seen.get(event_id):
                return event_id
        return low - 1

    async def verify_audit(self, expected_head: str | None = None) -> AuditReport:
        """Recompute the whole chain; report the first event that fails.

        Args:
            expected_head: a head hash kept elsewhere earlier; a chain that
                verifies but ends elsewhere was truncated or replaced wholesale.
        """
        # The counter first: both only grow, so events read afterwards always cover it. Read the other
        # way round, a commit landing in between would look like a deleted tail.
        allocated = await self._reader.fetchone("SELECT value FROM meta WHERE key = 'audit_allocated'")
        found = await self._reader.fetchall(f"SELECT {rows.EVENT_COLUMNS} FROM events ORDER BY id")
        events = []
        for row in found:
            try:
                events.append(rows.event(row))
            except (ValueError, TypeError):
                return AuditReport(False, len(events), len(events), "", row[0], "event data is not valid JSON")
        report = verify_chain(events, [r[5] for r in found], int(allocated[0]) if allocated else 0)
        return expect_head(report, expected_head)
