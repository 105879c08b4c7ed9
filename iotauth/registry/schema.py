"""The registry schema, written once for every backend.

``migrations(dialect)[n]`` upgrades a database from version ``n`` to ``n + 1``.
The tables use SQL that SQLite and PostgreSQL both accept; only the event id
type and the append-only guard on the audit log are dialect-specific.
"""

from __future__ import annotations

from typing import Literal

Backend = Literal["sqlite", "postgresql"]

_TABLES_V1 = """
CREATE TABLE devices (
    device_id   TEXT PRIMARY KEY,
    hardware_id TEXT UNIQUE,
    profile     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'revoked')),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    fingerprint       TEXT NOT NULL UNIQUE,
    device_id         TEXT NOT NULL REFERENCES devices (device_id),
    public_key_sha256 TEXT NOT NULL,
    not_before        TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
    issued_at         TEXT NOT NULL,
    activated_at      TEXT,
    revoked_at        TEXT,
    revocation_reason TEXT,
    pem               TEXT NOT NULL
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE INDEX certificates_key ON certificates (public_key_sha256);
CREATE INDEX certificates_status ON certificates (status);
-- CRL building reads only these columns of non-active certificates: a covering partial index
-- keeps it from scanning every certificate's PEM.
CREATE INDEX certificates_crl ON certificates (not_after, serial, revoked_at, issued_at, revocation_reason, status)
    WHERE status <> 'active';
CREATE INDEX devices_status ON devices (status);
CREATE TABLE events (
    id        {event_id} PRIMARY KEY,
    ts        TEXT NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    device_id TEXT,
    data      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX events_device ON events (device_id);
CREATE INDEX events_ts ON events (ts);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('audit_allocated', '0'), ('crl_number', '0');
"""

_APPEND_ONLY: dict[Backend, str] = {
    "sqlite": """
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
""",
    "postgresql": """
CREATE FUNCTION iotauth_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION iotauth_append_only();
""",
}
_EVENT_ID: dict[Backend, str] = {"sqlite": "INTEGER", "postgresql": "BIGINT"}

# v2: the instance id that tells this registry from a copy of another one (or from an empty file).
# A copy of the database (a backup, ``cp``) keeps it; a new or foreign database cannot have it.
_INSTANCE_ID: dict[Backend, str] = {
    "sqlite": "INSERT INTO meta (key, value) VALUES ('instance_id', lower(hex(randomblob(16))));\n",
    "postgresql": "INSERT INTO meta (key, value) VALUES ('instance_id', replace(gen_random_uuid()::text, '-', ''));\n",
}

# v3: certificate rotation over MQTT. A renewal certificate names the certificate it replaces
# (``renewal_of``); the request ids a renewer has seen (replay protection, pruned after the clock
# window) and the operators' open rotation orders (one per device) are kept here so that every
# renewer process and host decides on the same facts.
_ROTATION = """
ALTER TABLE certificates ADD COLUMN renewal_of TEXT;
CREATE INDEX certificates_renewal ON certificates (device_id, issued_at) WHERE renewal_of IS NOT NULL;
CREATE TABLE rotation_requests (
    request_id TEXT PRIMARY KEY,
    device_id  TEXT NOT NULL,
    seen_at    TEXT NOT NULL
);
CREATE INDEX rotation_requests_seen ON rotation_requests (seen_at);
CREATE TABLE rotation_orders (
    device_id    TEXT PRIMARY KEY REFERENCES devices (device_id),
    serial       TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    actor        TEXT NOT NULL
);
"""


def migrations(backend: Backend) -> tuple[str, ...]:
    """Every migration script for ``backend``, oldest first."""
    return (_TABLES_V1.replace("{event_id}", _EVENT_ID[backend]) + _APPEND_ONLY[backend], _INSTANCE_ID[backend],
            _ROTATION)
