"""JSON from untrusted sources, bounded *before* it is parsed.

``json.loads`` recurses once per nesting level: 2 KB of ``[`` is enough to
exhaust the interpreter's stack and turn a request into a 500 with a
RecursionError. Catching that error afterwards is not a defence (the parser
has already done the damage, and other parsers fail differently), so the
size and the nesting depth are measured first, by a linear scan that skips
string contents, and only a document within both bounds reaches the parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # after the opening quote: linear, no backtracking


class JsonRefused(ValueError):
    """A JSON document over a bound (size, depth) or not UTF-8; the message says which."""


def nesting_depth(text: str, limit: int) -> int:
    """The deepest ``[``/``{`` nesting in ``text`` (strings skipped), stopping as soon as it exceeds ``limit``."""
    depth = deepest = 0
    position = 0
    while (found := _STRUCTURE.search(text, position)) is not None:
        char = found.group()
        if char == '"':
            rest = _STRING_REST.match(text, found.end())
            if rest is None:  # an unterminated string: the parser will say so
                return deepest
            position = rest.end()
            continue
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        else:
            depth -= 1
        position = found.end()
    return deepest


def loads(data: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse ``data`` as UTF-8 JSON if it is at most ``max_bytes`` long and ``max_depth`` deep.

    Raises:
        JsonRefused: over a bound, or not UTF-8.
        json.JSONDecodeError: not valid JSON (a ValueError too).
    """
    if len(data) > max_bytes:
        raise JsonRefused(f"JSON document too large: {len(data)} bytes (at most {max_bytes})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"JSON document is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    if nesting_depth(text, max_depth) > max_depth:
        raise JsonRefused(f"JSON document nested deeper than {max_depth} levels")
    return json.loads(text)
