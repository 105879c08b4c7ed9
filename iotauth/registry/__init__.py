"""The device registry: devices, certificates and the hash-chained audit log.

Open it with :func:`open_registry`; SQLite (a path) is the embedded default.
"""

from __future__ import annotations

from pathlib import Path

from iotauth.certs import TIMESTAMP_FORMAT
from iotauth.registry.backend import WriteBatcher
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
        create: create a SQLite database if it does not exist (``iotauth init``
            does); otherwise a missing file is an error rather than a silent
            fresh start. PostgreSQL databases are created by their administrator;
            iotauth creates its tables in them.
    """
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from iotauth.registry import postgres

        pg_writer, pg_reader, listener = await postgres.connect(text)
        return Registry(
            pg_writer,
            pg_reader,
            WriteBatcher(pg_writer, postgres.POSTGRES_DIALECT),
            (pg_writer.close, pg_reader.close, listener.close),
            wait_change=listener.wait,
            location=postgres.redact(text),
        )
    from iotauth.registry import sqlite

    path = Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text)
    writer, reader = await sqlite.connect(path, create=create)
    batcher = WriteBatcher(writer, sqlite.SQLITE_DIALECT)
    return Registry(writer, reader, batcher, (writer.close, reader.close), location=str(path))
