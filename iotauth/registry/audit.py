"""The hash chain behind the audit log (pure: no I/O).

Each event commits to its own fields and to the hash of the event before it,
so editing, deleting or reordering any row breaks every hash after it. Event
ids are contiguous from 1, which also exposes a deleted row whose neighbours
were re-hashed, and the caller compares the head with the highest id ever
allocated to catch a truncated tail.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from iotauth.registry.models import AuditEvent, AuditReport

GENESIS = "0" * 64


def canonical_json(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def event_hash(prev_hash: str, event_id: int, ts: str, kind: str, actor: str, device_id: str | None, data: str) -> str:
    """Hash of one event; ``data`` is its canonical JSON text exactly as stored."""
    material = json.dumps([prev_hash, event_id, ts, kind, actor, device_id, data], separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def verify_chain(events: Iterable[AuditEvent], raw_data: Iterable[str], highest_allocated: int) -> AuditReport:
    """Check the chain and report the first event that does not verify.

    Args:
        events: all events in id order.
        raw_data: each event's stored JSON text, in the same order.
        highest_allocated: the largest event id the database ever handed out.
    """
    prev_hash, expected_id, count = GENESIS, 1, 0
    for event, data in zip(events, raw_data, strict=True):
        if event.id != expected_id:
            problem = "event ids are not contiguous (a row was deleted or reordered)"
            return AuditReport(False, count, expected_id - 1, prev_hash, expected_id, problem)
        if event.prev_hash != prev_hash:
            return AuditReport(False, count, event.id - 1, prev_hash, event.id, "previous-hash link is broken")
        recomputed = event_hash(prev_hash, event.id, event.ts, event.kind, event.actor, event.device_id, data)
        if recomputed != event.hash:
            return AuditReport(False, count, event.id - 1, prev_hash, event.id, "event content does not match its hash")
        prev_hash, expected_id, count = event.hash, expected_id + 1, count + 1
    if highest_allocated > count:
        problem = f"events after id {count} were deleted (ids up to {highest_allocated} were allocated)"
        return AuditReport(False, count, count, prev_hash, count + 1, problem)
    return AuditReport(True, count, count, prev_hash)


def expect_head(report: AuditReport, expected: str | None) -> AuditReport:
    """``report``, failed if the chain verifies but its head is not ``expected`` (a hash kept elsewhere).

    Someone who can rewrite the database can also rebuild a consistent chain
    or cut its tail; only a head recorded outside the database catches that.
    """
    if not report.ok or not expected or expected == report.head_hash:
        return report
    problem = f"chain head {report.head_hash} differs from the expected {expected} (log truncated or replaced)"
    return replace(report, ok=False, problem=problem)
