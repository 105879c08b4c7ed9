"""Identity values: one validator, an alphabet that cannot smuggle separators or wildcards."""

from __future__ import annotations

import pytest

from iotauth.errors import InvalidIdentity
from iotauth.identity import (
    device_id_from_spiffe,
    spiffe_id,
    validate_device_id,
    validate_hardware_id,
    validate_trust_domain,
)


@pytest.mark.parametrize("value", ["a", "sensor-0001", "A.b_c-d", "_x", "9" * 64, "dev.1", "x..y"])
def test_device_id_accepts_safe_values(value: str) -> None:
    assert validate_device_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "a/b",
        "+",
        "#",
        "dev+1",
        "dev#",
        "",
        "x" * 65,
        ".hidden",
        "-flag",
        "a b",
        "$SYS",
        "dev\x00x",
        "dev\n",
        "sensor-1\n",
        "dеv",  # Cyrillic "е" look-alike
        "ｄｅｖ",  # fullwidth look-alikes
        "dev\u200b",  # zero-width space
        "../etc",
        "a:b",
    ],
)
def test_device_id_rejects_unsafe_values(value: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        validate_device_id(value)
    assert "device id" in str(info.value)
    assert "\x00" not in str(info.value)


@pytest.mark.parametrize("value", [None, 12, b"dev"])
def test_device_id_rejects_non_text(value: object) -> None:
    with pytest.raises(InvalidIdentity, match="must be text"):
        validate_device_id(value)


def test_hardware_id_allows_mac_style_but_not_separators() -> None:
    assert validate_hardware_id("AA:BB:CC:00:11:22") == "AA:BB:CC:00:11:22"
    for bad in ("AA/BB", "+", "", "x" * 65, ":lead"):
        with pytest.raises(InvalidIdentity):
            validate_hardware_id(bad)


def test_spiffe_round_trip_and_foreign_domain() -> None:
    uri = spiffe_id("factory.test", "sensor-1")
    assert uri == "spiffe://factory.test/device/sensor-1"
    assert device_id_from_spiffe(uri, "factory.test") == "sensor-1"
    with pytest.raises(InvalidIdentity):
        device_id_from_spiffe(uri, "other.test")
    with pytest.raises(InvalidIdentity):
        device_id_from_spiffe("spiffe://factory.test/device/a/b", "factory.test")
    with pytest.raises(InvalidIdentity):
        device_id_from_spiffe("spiffe://factory.test.evil/device/x", "factory.test")


@pytest.mark.parametrize("value", ["Factory.test", "-x.test", "a..b", "x/y", ""])
def test_trust_domain_must_be_lower_case_dns(value: str) -> None:
    with pytest.raises(InvalidIdentity):
        validate_trust_domain(value)
