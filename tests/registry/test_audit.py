"""The audit log detects edited, deleted and reordered rows, made as an attacker with database access would."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason, open_registry
from iotauth.registry.audit import event_hash

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@pytest.fixture
async def populated(registry_url: str, authority: Authority, registry: Registry, csr_factory: CsrFactory) -> str:
    if not await registry.events():  # PostgreSQL databases are not created by 'init'
        await registry.record_event("ca.initialised", actor="test")
    for n in range(3):
        await authority.issue(csr_factory()[1], f"sensor-{n}", actor="op")
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    report = await registry.verify_audit()
    assert report.ok and report.events == 9  # init, 3 x (created, issued), revoked cert + device
    return registry_url


async def tamper(url: str, *statements: str) -> None:
    """Edit the database directly, dropping the append-only triggers first like a real attacker."""
    if url.startswith("postgresql://"):
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                await conn.execute("DROP TRIGGER events_append_only ON events")
                for statement in statements:
                    await conn.execute(statement)
        finally:
            await conn.close()
        return
    with sqlite3.connect(url) as conn:
        conn.execute("DROP TRIGGER events_append_only_update")
        conn.execute("DROP TRIGGER events_append_only_delete")
        for statement in statements:
            conn.execute(statement)


async def fetch_row(url: str, event_id: int) -> tuple[object, ...]:
    async with await open_registry(url) as reg:
        event = (await reg.events(after_id=event_id - 1, limit=1))[0]
        raw = await reg._reader.fetchone("SELECT data FROM events WHERE id = ?", (event_id,))
    assert raw is not None
    return (event.id, event.ts, event.kind, event.actor, event.device_id, raw[0], event.prev_hash)


async def verify(url: str) -> tuple[bool, int | None, str | None]:
    async with await open_registry(url) as reg:
        report = await reg.verify_audit()
    return report.ok, report.first_bad_id, report.problem


async def test_the_log_is_append_only_for_ordinary_writes(populated: str) -> None:
    async with await open_registry(populated) as reg:
        with pytest.raises(Exception, match="append-only"):
            await reg._writer.execute("UPDATE events SET actor = 'someone-else' WHERE id = 3")


async def test_edited_row_is_reported(populated: str) -> None:
    await tamper(populated, "UPDATE events SET data = replace(data, 'key-compromise', 'superseded') WHERE id = 8")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 8 and "content" in (problem or "")


async def test_edited_and_rehashed_row_breaks_the_next_link(populated: str) -> None:
    """Recomputing the edited row's own hash is not enough: its successor still points at the old one."""
    event_id, ts, kind, _actor, device_id, data, prev = await fetch_row(populated, 4)
    forged = event_hash(str(prev), int(str(event_id)), str(ts), str(kind), "intruder", str(device_id), str(data))
    await tamper(populated, f"UPDATE events SET actor = 'intruder', hash = '{forged}' WHERE id = 4")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 5 and "link" in (problem or "")


async def test_deleted_middle_row_is_reported(populated: str) -> None:
    await tamper(populated, "DELETE FROM events WHERE id = 5")
    ok, first_bad, _ = await verify(populated)
    assert not ok and first_bad == 5


async def test_deleted_tail_is_reported(populated: str) -> None:
    await tamper(populated, "DELETE FROM events WHERE id >= 9")
    ok, first_bad, problem = await verify(populated)
    assert not ok and first_bad == 9 and "deleted" in (problem or "")


async def test_new_events_after_truncation_do_not_hide_it(populated: str) -> None:
    await tamper(populated, "DELETE FROM events WHERE id >= 9")
    async with await open_registry(populated) as reg:
        await reg.record_event("later", actor="op")
        report = await reg.verify_audit()
    assert not report.ok and report.first_bad_id == 9


async def test_reordered_rows_are_reported(populated: str) -> None:
    await tamper(
        populated,
        "UPDATE events SET id = -1 WHERE id = 3",
        "UPDATE events SET id = 3 WHERE id = 4",
        "UPDATE events SET id = 4 WHERE id = -1",
    )
    ok, first_bad, _ = await verify(populated)
    assert not ok and first_bad == 3
