"""Where a registry's connections come from, and how it knows it still has the database it opened.

A long-running process (``iotauth broker``, ``iotauth serve``) opens the
registry once. If the database behind it is then replaced -- ``mv
registry.db x; cp x registry.db``, a restore, a truncation -- the open
connections go on reading the old file while every operator command writes
the new one: a revocation would silently stop taking effect. So each registry
carries an *instance id*, generated when its schema is created and stored in
``meta``, and each backend can say cheaply whether the database at its
location is still the one it has open:

* SQLite compares the path's device and inode with the file it opened, and
  re-reads the instance id through its open connection (a file overwritten in
  place keeps its inode but not its id);
* PostgreSQL (no file) notices a lost connection and re-reads the instance id
  through a fresh pool connection (a database dropped and restored).

:class:`~iotauth.registry.service.Registry` builds ``identity_changed()`` and
``reopen()`` on this: it reopens only a database with the *same* instance id
(a copy of itself) and otherwise refuses every read and write, so its users
fail closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from iotauth.errors import RegistryError
from iotauth.registry.backend import Dialect, Row, SqlConnection

INSTANCE_QUERY = "SELECT value FROM meta WHERE key = 'instance_id'"


@dataclass
class Connections:
    """One opening of a registry database.

    Attributes:
        writer: the connection the group-commit batcher writes through.
        reader: the connection (or pool) every read uses.
        instance_id: the database's instance id, read when it was opened.
        closers: close everything this opening holds, in order.
        wait_change: waits for a commit announcement (PostgreSQL NOTIFY), if the backend has one.
        file_id: (st_dev, st_ino) of the SQLite file opened; None for PostgreSQL.
    """

    writer: SqlConnection
    reader: SqlConnection
    instance_id: str
    closers: Sequence[Callable[[], Awaitable[None]]]
    wait_change: Callable[[float], Awaitable[None]] | None = None
    file_id: tuple[int, int] | None = None

    async def close(self) -> None:
        for closer in self.closers:
            await closer()


class Store(Protocol):
    """A backend's way to open its database and to check that it still has it."""

    location: str
    """Where the database is, for messages and logs (never with a password)."""

    dialect: Dialect

    async def connect(self, *, create: bool) -> Connections:
        """Open the database; only with ``create`` may it be new (``iotauth init``)."""
        ...

    async def changed(self, current: Connections) -> str | None:
        """What differs between ``current`` and the database now at the location, or None."""
        ...


async def read_instance_id(conn: SqlConnection, location: str) -> str:
    """The instance id stored in the database, or a :class:`RegistryError` saying it has none."""
    row = await conn.fetchone(INSTANCE_QUERY)
    if row is None or not row[0]:
        raise RegistryError(f"registry {location} has no instance id: it is damaged or not an iotauth registry")
    return str(row[0])


class Unavailable:
    """A stand-in :class:`SqlConnection` for a registry whose database was lost: every call fails closed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> RegistryError:
        return RegistryError(self.reason)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        raise self._refuse()

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise self._refuse()

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        raise self._refuse()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        raise self._refuse()
