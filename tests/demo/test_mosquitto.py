"""``iotauth demo --mosquitto``: the same lifecycle on a managed Mosquitto and its follower, checked step by step."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tests.fixtures.cli import operator_cli

EXPECTED_STEPS = [
    "initialise the CA and registry",
    "start 3 emulated devices on pseudo-terminals",
    "provision them in parallel over serial",
    "start Mosquitto under iotauth's control (managed) and its follower",
    "each device publishes telemetry with its own certificate",
    "a device publishing to another device's topic is refused",
    "the operator orders sensor-DEMO-0001 to renew: it renews over MQTT, the old certificate is refused",
    "the operator revokes sensor-DEMO-0003: live session dropped, reconnect refused",
    "audit log verifies",
]


def test_the_demo_lifecycle_runs_on_managed_mosquitto() -> None:
    # Not under pytest's private tree: Mosquitto started as root reads its files as 'mosquitto'.
    parent = Path(tempfile.mkdtemp(prefix="iotauth-demo-test-"))
    parent.chmod(0o755)
    try:
        result = operator_cli(parent / "no-home", "demo", "--mosquitto", "--dir", str(parent / "d"), "--json")
        report = json.loads(result.stdout)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert [step["name"] for step in report["steps"]] == EXPECTED_STEPS
    refusal, rotation, revocation = (report["steps"][n]["detail"] for n in (5, 6, 7))
    assert "not delivered; Mosquitto's dynamic-security ACL dropped it" in refusal
    assert "the old one: refused at the TLS handshake (CRL proven in force, then the old sessions kicked" in rotation
    assert "certificate.activated (via confirm)" in rotation  # Mosquitto never asks iotauth: the device confirms
    assert report["facts"]["rotation"]["device"] == "sensor-DEMO-0001"
    assert "CRL proven in force before the kick" in revocation and "refused at the TLS handshake" in revocation
    assert report["facts"]["broker"].startswith("mosquitto ")
