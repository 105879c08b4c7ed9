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


GENESIS_KIND = "ca.initialised"


def expect_genesis(
    report: AuditReport, first: AuditEvent | None, root_fingerprint: str | None, instance_id: str | None
) -> AuditReport:
    """``report``, failed unless event #1 is the ``ca.initialised`` genesis of this home's CA and registry.

    The chain proves that nothing *after* its first event was changed; only
    the genesis ties the log to a home. A registry that lost its history (an
    empty one, or one rebuilt from scratch) has none, and one copied in from
    another home names another root CA.

    Args:
        first: the log's event #1, if any.
        root_fingerprint: the SHA-256 fingerprint of the home's root CA certificate, if it is to be checked.
        instance_id: the registry's instance id, checked if the genesis recorded one.
    """
    if not report.ok:
        return report
    if first is None or first.id != 1 or first.kind != GENESIS_KIND:
        found = "no events" if first is None else f"event #{first.id} is {first.kind!r}"
        problem = f"the log has no genesis event {GENESIS_KIND!r} as event #1 ({found}): its history is lost"
        return replace(report, ok=False, first_bad_id=1, problem=problem)
    recorded = first.data.get("root_fingerprint")
    if root_fingerprint is not None:
        if not isinstance(recorded, str):
            note = (f"the genesis event #1 records no root_fingerprint (a registry initialised before iotauth "
                    f"recorded it): the log could not be tied to the root CA {root_fingerprint[:16]}... of this home")
            return replace(report, notes=(*report.notes, note))
        if recorded.lower() != root_fingerprint.lower():
            problem = (f"the genesis event #1 names root CA {recorded[:16]}..., but this home's root CA is "
                       f"{root_fingerprint[:16]}...: the log belongs to another home")
            return replace(report, ok=False, first_bad_id=1, problem=problem)
    registry = first.data.get("registry_instance")
    if instance_id is not None and isinstance(registry, str) and registry != instance_id:
        problem = f"the genesis event #1 was written in registry instance {registry}, this registry is {instance_id}"
        return replace(report, ok=False, first_bad_id=1, problem=problem)
    return report


def expect_checkpoint(report: AuditReport, event: AuditEvent | None, head_id: int, head_hash: str) -> AuditReport:
    """``report``, failed unless the log still holds event ``head_id`` with hash ``head_hash`` (an anchor).

    The log may have grown since the anchor was written; because every hash
    covers the ones before it, an unchanged event ``head_id`` means an
    unchanged log up to it.
    """
    if not report.ok:
        return report
    if report.head_id < head_id or event is None:
        problem = f"the log ends at event #{report.head_id}, but the anchor recorded #{head_id}: events were removed"
        return replace(report, ok=False, first_bad_id=report.head_id + 1, problem=problem)
    if event.hash != head_hash:
        problem = (f"event #{head_id} has hash {event.hash[:16]}..., the anchor recorded {head_hash[:16]}...: "
                   "the log was rewritten")
        return replace(report, ok=False, first_bad_id=head_id, problem=problem)
    return report
