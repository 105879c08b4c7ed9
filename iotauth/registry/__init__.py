"""The device registry: devices, certificates and the hash-chained audit log.

Open it with :func:`open_registry`; SQLite (a path) is the embedded default.
"""

from __future__ import annotations

from pathlib import Path

from iotauth.certs import TIMESTAMP_FORMAT
from iotauth.registry.events import EventKind
from iotauth.registry.models import (
    AuditEvent,
    AuditReport,
    CertificateRecord,
    CertificateStatus,
    Credential,
    Device,
    DeviceStatus,
    RevocationReason,
    RevokedSerial,
)
from iotauth.registry.service import Registry
from iotauth.registry.store import Store

__all__ = [
    "TIMESTAMP_FORMAT",
    "AuditEvent",
    "AuditReport",
    "CertificateRecord",
    "CertificateStatus",
    "Credential",
    "Device",
    "DeviceStatus",
    "EventKind",
    "Registry",
    "RevocationReason",
    "RevokedSerial",
    "open_registry",
]


async def open_registry(location: str | Path, *, create: bool = False) -> Registry:
    """Open the registry at ``location``.

    ``postgresql://...`` (or ``postgres://``) selects PostgreSQL; anything else
    is a SQLite file path (``sqlite:///path`` also works).

    Args:
        create: create the iotauth schema if there is none (``iotauth init``
            does): in a new or empty SQLite file, or in an empty PostgreSQL
            database (which its administrator creates). Otherwise a missing,
            empty or foreign database is an error rather than a silent fresh
            start, and never a new, empty registry.
    """
    text = str(location)
    store: Store
    if text.startswith(("postgresql://", "postgres://")):
        from iotauth.registry import postgres

        store = postgres.PostgresStore(text)
    else:
        from iotauth.registry import sqlite

        store = sqlite.SqliteStore(Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text))
    return Registry(store, await store.connect(create=create))
