"""A registry knows which database it opened: empty, foreign and replaced databases are never adopted silently."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from iotauth.authority import open_authority
from iotauth.config import Home
from iotauth.errors import RegistryError, RegistryReplaced
from iotauth.pki.keys import generate_private_key
from iotauth.registry import Registry, RevocationReason, open_registry
from tests.fixtures.pki import make_csr


async def _issue(home: Home, registry: Registry, device_id: str) -> None:
    authority = await open_authority(home, registry)
    await authority.issue(make_csr(generate_private_key("p256")), device_id, actor="test")


def checkpoint(path: Path) -> None:
    """Copy committed WAL frames into the main file, as a careful operator's copy would have them."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def test_a_truncated_registry_is_refused_not_recreated(home: Home) -> None:
    async with await open_registry(home.registry_db) as registry:
        await _issue(home, registry, "d0")
        await registry.revoke("d0", RevocationReason.KEY_COMPROMISE, actor="op")
    for suffix in ("-wal", "-shm"):
        Path(f"{home.registry_db}{suffix}").unlink(missing_ok=True)
    os.truncate(home.registry_db, 0)  # truncate -s 0 registry.db
    with pytest.raises(RegistryError, match="is an empty file, not an iotauth registry"):
        await open_registry(home.registry_db)
    assert home.registry_db.stat().st_size == 0  # refusing it wrote nothing into it


async def test_a_foreign_database_is_refused_and_never_adopted_by_init(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    before = foreign.read_bytes()
    with pytest.raises(RegistryError, match="foreign SQLite database"):
        await open_registry(foreign)
    with pytest.raises(RegistryError, match="will not adopt it"):
        await open_registry(foreign, create=True)
    assert foreign.read_bytes() == before


async def test_create_accepts_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "new.db"
    empty.touch()  # what an interrupted 'iotauth init' can leave behind
    async with await open_registry(empty, create=True) as registry:
        assert len(registry.instance_id) == 32
    async with await open_registry(empty) as again:
        assert again.instance_id == registry.instance_id  # the id lives in the database


async def test_a_copy_moved_into_place_is_reopened_and_its_writes_are_seen(home: Home) -> None:
    async with await open_registry(home.registry_db) as registry:
        await _issue(home, registry, "d1")
        assert await registry.identity_changed() is None
        checkpoint(home.registry_db)
        moved = home.registry_db.with_name("orphan.db")
        home.registry_db.rename(moved)  # mv registry.db x; cp x registry.db
        shutil.copyfile(moved, home.registry_db)
        change = await registry.identity_changed()
        assert change is not None and "replaced by another file" in change
        async with await open_registry(home.registry_db) as operator:  # 'iotauth revoke' writes the new file
            await operator.revoke("d1", RevocationReason.KEY_COMPROMISE, actor="op")
        assert await registry.ensure_identity() is True
        assert (await registry.get_device("d1")).status.value == "revoked"
        assert await registry.identity_changed() is None and registry.generation == 1
        await registry.record_event("broker.started", actor="test")  # writes go to the new file too
        async with await open_registry(home.registry_db) as reader:
            assert (await reader.events())[-1].kind == "broker.started"


@pytest.mark.parametrize("replacement", ["removed", "empty", "foreign", "another-registry"])
async def test_anything_but_a_copy_fails_closed_until_the_file_is_back(home: Home, tmp_path: Path,
                                                                      replacement: str) -> None:
    async with await open_registry(home.registry_db) as registry:
        await _issue(home, registry, "d2")
        checkpoint(home.registry_db)
        kept = tmp_path / "kept.db"
        home.registry_db.rename(kept)
        if replacement == "empty":
            home.registry_db.touch()
        elif replacement == "foreign":
            with sqlite3.connect(home.registry_db) as conn:
                conn.execute("CREATE TABLE t (x)")
        elif replacement == "another-registry":
            async with await open_registry(home.registry_db, create=True):
                pass
        expected = RegistryReplaced if replacement == "another-registry" else RegistryError
        with pytest.raises(expected):
            await registry.ensure_identity()
        assert registry.lost is not None
        with pytest.raises(RegistryError):  # every read fails closed ...
            await registry.get_device("d2")
        with pytest.raises(RegistryError):  # ... and every write
            await registry.record_event("broker.started", actor="test")
        if replacement != "removed":
            assert home.registry_db.stat().st_size == 0 or replacement != "empty"  # nothing written into it
            home.registry_db.unlink()
        shutil.copyfile(kept, home.registry_db)  # the right file is back
        assert await registry.ensure_identity() is True
        assert registry.lost is None and (await registry.get_device("d2")).status.value == "active"


async def test_a_file_overwritten_in_place_is_noticed(home: Home, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    async with await open_registry(other, create=True):
        pass
    async with await open_registry(home.registry_db) as registry:
        with sqlite3.connect(home.registry_db) as conn:  # same inode, another registry's instance id
            conn.execute("UPDATE meta SET value = 'f00d' WHERE key = 'instance_id'")
        change = await registry.identity_changed()
        assert change is not None and "overwritten in place" in change
        with pytest.raises(RegistryReplaced):
            await registry.ensure_identity()


ROTATION_UNDONE = ("DROP TABLE rotation_orders", "DROP TABLE rotation_requests", "DROP INDEX certificates_renewal",
                   "ALTER TABLE certificates DROP COLUMN renewal_of")
"""What schema version 3 (rotation) added, undone."""


async def test_a_registry_before_instance_ids_gets_one(home: Home) -> None:
    with sqlite3.connect(home.registry_db) as conn:  # what a registry of schema version 1 looks like
        conn.execute("DELETE FROM meta WHERE key = 'instance_id'")
        for statement in ROTATION_UNDONE:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    async with await open_registry(home.registry_db) as registry:
        first = registry.instance_id
    async with await open_registry(home.registry_db) as registry:
        assert registry.instance_id == first and len(first) == 32


async def test_postgres_databases_without_the_schema_are_refused(postgres_database: str) -> None:
    with pytest.raises(RegistryError, match="has no iotauth schema"):
        await open_registry(postgres_database)
    async with await open_registry(postgres_database, create=True) as registry:
        instance = registry.instance_id
        assert await registry.identity_changed() is None
    async with await open_registry(postgres_database) as registry:
        assert registry.instance_id == instance
        import asyncpg

        conn = await asyncpg.connect(postgres_database)  # a restore of another registry's dump
        try:
            await conn.execute("UPDATE meta SET value = 'another' WHERE key = 'instance_id'")
        finally:
            await conn.close()
        change = await registry.identity_changed()
        assert change is not None and "was replaced" in change
        with pytest.raises(RegistryReplaced):
            await registry.ensure_identity()
        with pytest.raises(RegistryError):
            await registry.list_devices()
