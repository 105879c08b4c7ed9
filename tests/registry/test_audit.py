"""The audit log detects edited, deleted and reordered rows, as an attacker with sqlite3 would make them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason, open_registry

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@pytest.fixture
async def populated(home: Home, authority: Authority, registry: Registry, csr_factory: CsrFactory) -> Path:
    for n in range(3):
        await authority.issue(csr_factory()[1], f"sensor-{n}", actor="op")
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    report = await registry.verify_audit()
    assert report.ok and report.events == 9  # init, 3 x (created, issued), revoked cert + device
    return home.registry_db


def tamper(path: Path, *statements: str) -> None:
    """Edit the database directly, dropping the append-only triggers first like a real attacker."""
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER events_append_only_update")
        conn.execute("DROP TRIGGER events_append_only_delete")
        for statement in statements:
            conn.execute(statement)


async def verify(path: Path) -> tuple[bool, int | None, str | None]:
    async with await open_registry(path) as reg:
        report = await reg.verify_audit()
    return report.ok, report.first_bad_id, report.problem


def test_the_log_is_append_only_through_sqlite(populated: Path) -> None:
    with sqlite3.connect(populated) as conn, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET actor = 'someone-else' WHERE id = 3")


async def test_edited_row_is_reported(populated: Path) -> None:
    tamper(populated, "UPDATE events SET data = replace(data, 'key-compromise', 'superseded') WHERE id = 8")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 8 and "content" in (problem or "")


async def test_edited_and_rehashed_row_breaks_the_next_link(populated: Path) -> None:
    """Recomputing the edited row's own hash is not enough: its successor still points at the old one."""
    from iotauth.registry.audit import event_hash

    with sqlite3.connect(populated) as conn:
        row = conn.execute("SELECT id, ts, kind, actor, device_id, data, prev_hash FROM events WHERE id = 4").fetchone()
    forged = event_hash(row[6], row[0], row[1], row[2], "intruder", row[4], row[5])
    tamper(populated, f"UPDATE events SET actor = 'intruder', hash = '{forged}' WHERE id = 4")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 5 and "link" in (problem or "")


async def test_deleted_middle_row_is_reported(populated: Path) -> None:
    tamper(populated, "DELETE FROM events WHERE id = 5")
    ok, first_bad, _ = await verify(populated)
    assert not ok and first_bad == 5


async def test_deleted_tail_is_reported(populated: Path) -> None:
    tamper(populated, "DELETE FROM events WHERE id >= 9")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 9 and "deleted" in (problem or "")


async def test_new_events_after_truncation_do_not_hide_it(populated: Path) -> None:
    tamper(populated, "DELETE FROM events WHERE id >= 9")
    async with await open_registry(populated) as reg:
        await reg.record_event("later", actor="op")
        report = await reg.verify_audit()
    assert not report.ok and report.first_bad_id == 9


async def test_reordered_rows_are_reported(populated: Path) -> None:
    tamper(
        populated,
        "UPDATE events SET id = -1 WHERE id = 3",
        "UPDATE events SET id = 3 WHERE id = 4",
        "UPDATE events SET id = 4 WHERE id = -1",
    )
    ok, first_bad, _ = await verify(populated)
    assert not ok and first_bad == 3
