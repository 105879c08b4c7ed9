"""Where a follower of the change feed got to, kept in the registry so that it resumes after downtime.

A follower that acts on events outside iotauth (kicking sessions off another
broker) must not lose the events that happened while it was down: it saves
the id of the last event it fully acted on and, at start, replays everything
after it. Cursors live in the ``meta`` table as ``cursor:<name>``; they only
move forward, so two followers sharing a name (one per broker host, say)
never make each other skip work, at worst repeat it, and the actions they
replay are idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from iotauth.registry.backend import SqlConnection, Tx
from iotauth.registry.events import EventKind
from iotauth.registry.models import AuditEvent

PREFIX = "cursor:"
_NAME = re.compile(r"[a-z0-9][a-z0-9:_-]{0,63}", re.ASCII)


def _key(name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise ValueError(f"invalid follower name {name!r}")
    return PREFIX + name


async def read_cursor(tx: Tx | SqlConnection, name: str) -> int | None:
    """The saved event id of follower ``name``, or ``None`` if it never saved one."""
    row = await tx.fetchone("SELECT value FROM meta WHERE key = ?", (_key(name),))
    return int(row[0]) if row else None


async def advance_cursor(tx: Tx, name: str, event_id: int) -> int:
    """Move ``name`` forward to ``event_id`` (never back); return where it now stands."""
    current = await read_cursor(tx, name)
    if current is not None and current >= event_id:
        return current
    if current is None:
        await tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_key(name), str(event_id)))
    else:
        await tx.execute("UPDATE meta SET value = ? WHERE key = ?", (str(event_id), _key(name)))
    return event_id


class FeedFollowing(Protocol):
    """The registry calls every follower of the change feed makes (``iotauth.registry.Registry`` has them).

    Followers depend on this, not on the registry class, so that they can be
    driven by anything that keeps the same promises (a read replica's client).
    """

    async def events(
        self, *, after_id: int = 0, since: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[AuditEvent]: ...

    async def last_event_id(self) -> int: ...

    async def wait_for_change(self, interval: float) -> None: ...

    async def follower_cursor(self, name: str) -> int | None: ...

    async def save_follower_cursor(
        self,
        name: str,
        event_id: int,
        *,
        actor: str = "",
        records: Sequence[tuple[EventKind, str | None, dict[str, Any]]] = (),
    ) -> None: ...
