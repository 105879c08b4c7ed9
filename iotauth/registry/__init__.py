"""The device registry: devices, certificates and the hash-chained audit log.

Open it with :func:`open_registry`; SQLite (a path) is the embedded default.
"""

from __future__ import annotations

from pathlib import Path

from iotauth.registry.backend import WriteBatcher
from iotauth.registry.models import (
    AuditEvent,
    AuditReport,
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceStatus,
    RevocationReason,
    RevokedSerial,
)
from iotauth.registry.service import Credential, Registry

__all__ = [
    "AuditEvent",
    "AuditReport",
    "CertificateRecord",
    "CertificateStatus",
    "Credential",
    "Device",
    "DeviceStatus",
    "Registry",
    "RevocationReason",
    "RevokedSerial",
    "open_registry",
]


async def open_registry(location: str | Path, *, create: bool = False) -> Registry:
    """Open the registry at ``location``: a SQLite file path (or ``sqlite:///path``).

    Args:
        create: create the database if it does not exist (``iotauth init`` does);
            otherwise a missing database is an error rather than a silent fresh start.
    """
    text = str(location)
    from iotauth.registry import sqlite

    path = Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text)
    writer, reader = await sqlite.connect(path, create=create)
    batcher = WriteBatcher(writer, sqlite.SQLITE_DIALECT)
    return Registry(writer, reader, batcher, (writer.close, reader.close), location=str(path))
