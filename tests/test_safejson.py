"""JSON from untrusted sources is measured before it is parsed: no input reaches the recursive parser too deep."""

from __future__ import annotations

import json

import pytest

from iotauth.safejson import JsonRefused, loads, nesting_depth


def test_the_reported_document_is_refused_before_parsing() -> None:
    with pytest.raises(JsonRefused, match="nested deeper than 16 levels"):
        loads(b"[" * 1000 + b"]" * 1000, max_bytes=16384, max_depth=16)
    with pytest.raises(JsonRefused, match="nested deeper"):  # far beyond what the recursive parser survives
        loads(b"[" * 60000, max_bytes=65536, max_depth=16)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('{"a": [1, {"b": []}]}', 4),
        ('{"a": "[[[[[[[[[["}', 1),  # brackets in strings do not count
        ('["\\"[[[[", "\\\\", [[]]]', 3),  # nor after escaped quotes and backslashes
        ('"just a string"', 0),
        ("[[[", 3),
        ('["unterminated [[[[', 1),
    ],
)
def test_depth_skips_strings(text: str, depth: int) -> None:
    assert nesting_depth(text, 100) == depth


def test_bounds_and_encoding() -> None:
    assert loads(b'{"clientid": "sensor-1", "topic": "a/[b]/{c}"}', max_bytes=100, max_depth=1) == {
        "clientid": "sensor-1", "topic": "a/[b]/{c}"}
    with pytest.raises(JsonRefused, match="too large: 101 bytes"):
        loads(b" " * 101, max_bytes=100, max_depth=1)
    with pytest.raises(JsonRefused, match="not UTF-8"):
        loads(b'{"a": "\xff"}', max_bytes=100, max_depth=1)
    with pytest.raises(json.JSONDecodeError):
        loads(b"{not json", max_bytes=100, max_depth=1)
