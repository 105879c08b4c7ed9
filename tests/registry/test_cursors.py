"""Follower cursors: where a follower of the change feed got to, on every backend."""

from __future__ import annotations

import pytest

from iotauth.registry import Registry
from iotauth.registry.cursors import advance_cursor, read_cursor


async def test_a_cursor_only_moves_forward(registry: Registry) -> None:
    assert await registry.write(lambda tx: read_cursor(tx, "x")) is None
    assert await registry.write(lambda tx: advance_cursor(tx, "x", 7)) == 7
    assert await registry.write(lambda tx: advance_cursor(tx, "x", 3)) == 7  # a slower follower never rewinds it
    assert await registry.write(lambda tx: advance_cursor(tx, "x", 9)) == 9
    assert await registry.write(lambda tx: read_cursor(tx, "y")) is None
    with pytest.raises(ValueError, match="invalid follower name"):
        await registry.write(lambda tx: read_cursor(tx, ""))
    report = await registry.verify_audit()
    assert report.ok  # the cursor lives beside the audit chain, never in it
