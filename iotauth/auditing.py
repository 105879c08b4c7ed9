"""Checking the audit log against its home, and anchoring its head outside the home.

The hash chain (:mod:`iotauth.registry.audit`) proves that no event was edited,
deleted or reordered *inside* the log. Alone it cannot prove two things:

* **that the log is this home's, from its start.** ``iotauth init`` writes the
  genesis event ``ca.initialised`` naming the root CA's fingerprint (and the
  registry's instance id); :func:`verify_log` requires it as event #1 and
  compares it with the root certificate in the home. A registry that lost its
  history, or one copied in from another home, fails.
* **that the log was not rewritten or cut.** Someone who can write the
  database can rebuild a consistent chain or drop its tail. Only a head kept
  where that person cannot write catches it: ``iotauth audit anchor TARGET``
  writes the head (event id and hash) to a file or an HTTP(S) URL the operator
  chooses -- run it from cron, towards storage on another machine -- and
  ``iotauth audit verify --anchor TARGET`` checks that the log still holds
  that event with that hash. Anchoring refuses a log that does not extend the
  anchor already there, so the anchor itself only ever moves forward.

An anchor is a small JSON document (:class:`Anchor`). Files are replaced
atomically; URLs are written with ``PUT`` (or ``POST``) and read with ``GET``,
with ``Authorization: Bearer $IOTAUTH_ANCHOR_TOKEN`` when that is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from iotauth import safejson
from iotauth.castore import read_certificate
from iotauth.certs import fingerprint, now_utc, timestamp
from iotauth.config import Home
from iotauth.errors import AnchorError, AuditChainBroken
from iotauth.files import os_error_text, write_public
from iotauth.registry import AuditReport, Registry
from iotauth.registry.audit import expect_checkpoint, expect_genesis

ANCHOR_FORMAT = "iotauth-audit-anchor/1"
ANCHOR_TOKEN_ENV = "IOTAUTH_ANCHOR_TOKEN"  # noqa: S105 - the variable's name, not a secret
MAX_ANCHOR_BYTES = 4096
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Anchor:
    """The audit log's head at one moment, kept outside the home."""

    registry_instance: str
    head_id: int
    head_hash: str
    anchored_at: str
    root_fingerprint: str

    def to_bytes(self) -> bytes:
        data = {"format": ANCHOR_FORMAT, **self.__dict__}
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, source: str) -> Anchor:
        try:
            raw: Any = safejson.loads(data, max_bytes=MAX_ANCHOR_BYTES, max_depth=2)
        except ValueError as exc:
            raise AnchorError(f"{source} is not an iotauth audit anchor: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != ANCHOR_FORMAT:
            raise AnchorError(f"{source} is not an iotauth audit anchor (format {ANCHOR_FORMAT!r} expected)")
        try:
            anchor = cls(str(raw["registry_instance"]), int(raw["head_id"]), str(raw["head_hash"]),
                         str(raw["anchored_at"]), str(raw["root_fingerprint"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AnchorError(f"{source} is a damaged audit anchor: {exc!r}") from exc
        if anchor.head_id < 0 or len(anchor.head_hash) != 64:
            raise AnchorError(f"{source} is a damaged audit anchor: bad head {anchor.head_id}/{anchor.head_hash!r}")
        return anchor


def root_fingerprint(home: Home) -> str:
    """The SHA-256 fingerprint of the home's root CA certificate."""
    home.require_initialised()
    return fingerprint(read_certificate(home.root_cert))


async def verify_log(
    home: Home, registry: Registry, *, expected_head: str | None = None, anchor_target: str | None = None
) -> AuditReport:
    """The whole check: the chain, its genesis against the home's CA, and optionally a head kept elsewhere.

    Args:
        expected_head: a head hash the log must end with (``--expect-head``).
        anchor_target: a file or URL written by :func:`anchor_log`; the log must still hold its head.

    Raises:
        AnchorError: the anchor cannot be read (or there is none at ``anchor_target``).
    """
    anchor = None
    if anchor_target is not None:
        anchor = await read_anchor(anchor_target)
        if anchor is None:
            raise AnchorError(f"there is no audit anchor at {anchor_target} (write one with 'iotauth audit anchor')")
    return await _verify(home, registry, expected_head, anchor)


async def _verify(home: Home, registry: Registry, expected_head: str | None, anchor: Anchor | None) -> AuditReport:
    root = root_fingerprint(home)
    report = await registry.verify_audit(expected_head)
    first = await registry.events(limit=1)
    report = expect_genesis(report, first[0] if first else None, root, registry.instance_id)
    if anchor is None or not report.ok:
        return report
    if anchor.registry_instance != registry.instance_id:
        problem = (f"the anchor is for registry instance {anchor.registry_instance}, this registry is "
                   f"{registry.instance_id}: the registry was replaced")
        return AuditReport(False, report.events, report.head_id, report.head_hash, 1, problem, report.notes)
    if anchor.root_fingerprint.lower() != root.lower():
        problem = "the anchor was written for another root CA than this home's"
        return AuditReport(False, report.events, report.head_id, report.head_hash, 1, problem, report.notes)
    found = await registry.events(after_id=anchor.head_id - 1, limit=1) if anchor.head_id else []
    event = found[0] if found and found[0].id == anchor.head_id else None
    return expect_checkpoint(report, event, anchor.head_id, anchor.head_hash)


async def anchor_log(home: Home, registry: Registry, target: str, *, method: str = "PUT") -> Anchor:
    """Verify the log (against the anchor already at ``target``, if any) and write its head there.

    Raises:
        AuditChainBroken: the log does not verify, or does not extend the previous anchor.
        AnchorError: ``target`` cannot be read or written.
    """
    previous = await read_anchor(target)
    report = await _verify(home, registry, None, previous)
    if not report.ok:
        where = f" at event {report.first_bad_id}" if report.first_bad_id else ""
        raise AuditChainBroken(f"refusing to anchor a log that does not verify{where}: {report.problem}")
    anchor = Anchor(registry.instance_id, report.head_id, report.head_hash, timestamp(now_utc()),
                    root_fingerprint(home))
    await write_anchor(target, anchor, method=method)
    return anchor


def _is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _headers() -> dict[str, str]:
    token = os.environ.get(ANCHOR_TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


async def read_anchor(target: str) -> Anchor | None:
    """The anchor at ``target`` (a path or an http(s) URL), or None if there is none yet."""
    if not _is_url(target):
        path = Path(target)
        try:
            data = path.read_bytes()  # noqa: ASYNC240 - a few hundred bytes
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnchorError(f"cannot read audit anchor {path}: {os_error_text(exc)}") from exc
        return Anchor.parse(data, str(path))
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            answer = await client.get(target, headers=_headers())
    except httpx.HTTPError as exc:
        raise AnchorError(f"cannot read audit anchor {target}: {type(exc).__name__}: {exc}") from exc
    if answer.status_code == 404:
        return None
    if answer.status_code != 200:
        raise AnchorError(f"cannot read audit anchor {target}: HTTP {answer.status_code} {_excerpt(answer)}")
    return Anchor.parse(answer.content, target)


async def write_anchor(target: str, anchor: Anchor, *, method: str = "PUT") -> None:
    """Store ``anchor`` at ``target``: a file replaced atomically, or an HTTP PUT/POST that must answer 2xx."""
    body = anchor.to_bytes()
    if not _is_url(target):
        try:
            write_public(Path(target), body)
        except OSError as exc:
            raise AnchorError(f"cannot write audit anchor {target}: {os_error_text(exc)}") from exc
        return
    if method not in ("PUT", "POST"):
        raise AnchorError(f"anchor URLs are written with PUT or POST, not {method!r}")
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            answer = await client.request(method, target, content=body,
                                          headers={"Content-Type": "application/json", **_headers()})
    except httpx.HTTPError as exc:
        raise AnchorError(f"cannot write audit anchor to {target}: {type(exc).__name__}: {exc}") from exc
    if not 200 <= answer.status_code < 300:
        raise AnchorError(f"cannot write audit anchor to {target}: {method} answered HTTP {answer.status_code} "
                          f"{_excerpt(answer)}")


def _excerpt(answer: httpx.Response) -> str:
    text = " ".join(answer.text.split())[:200]
    return f"({text})" if text else ""
