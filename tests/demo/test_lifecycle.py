"""``iotauth demo``: the README's first command is also a smoke test, and its checks can fail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from iotauth.config import Home
from iotauth.demo import TRUST_DOMAIN, run_demo
from iotauth.registry import CertificateStatus
from tests.fixtures import iotauth_executable
from tests.fixtures.rotation import certificates

EXPECTED_STEPS = [
    "initialise the CA and registry",
    "start 3 emulated devices on pseudo-terminals",
    "provision them in parallel over serial",
    "start the mTLS broker",
    "each device publishes telemetry with its own certificate",
    "a device publishing to another device's topic is refused",
    "the operator orders sensor-DEMO-0001 to renew: it renews over MQTT, the old certificate is refused",
    "the operator revokes sensor-DEMO-0003: live session dropped, reconnect refused",
    "audit log verifies",
]


def test_demo_runs_every_step(tmp_path: Path) -> None:
    result = subprocess.run(
        [iotauth_executable(), "demo", "--dir", str(tmp_path / "d"), "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert [step["name"] for step in report["steps"]] == EXPECTED_STEPS
    assert all(step["ok"] for step in report["steps"])
    assert report["facts"]["devices"] == ["sensor-DEMO-0001", "sensor-DEMO-0002", "sensor-DEMO-0003"]
    assert report["facts"]["revocation_to_disconnect_ms"] < 5000  # generous: the benchmark measures it properly
    rows = (Path(report["facts"]["report"])).read_text().splitlines()
    assert len(rows) == 4 and all(",provisioned," in row for row in rows[1:])
    rotation = report["facts"]["rotation"]
    assert rotation["device"] == "sensor-DEMO-0001" and rotation["old_certificate"] == "Not authorized"
    assert "certificate.issued (operator)" in report["steps"][6]["detail"]
    assert "certificate.activated (via confirm)" in report["steps"][6]["detail"]
    assert "certificate.revoked (superseded)" in report["steps"][6]["detail"]
    home = Home(tmp_path / "d" / "home")  # the demo's own registry: the renewal is there, and only it is active
    active = [c for c in certificates(home, "sensor-DEMO-0001") if c.status is CertificateStatus.ACTIVE]
    assert [c.serial for c in active] == [rotation["serial"]]


async def test_demo_fails_when_the_broker_lets_a_device_write_to_another(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.root.mkdir(parents=True)
    home.config_file.write_text(  # a deliberately wrong policy: any device may publish any telemetry
        f'trust_domain = "{TRUST_DOMAIN}"\n[broker]\nport = 8883\n'
        '[profiles.default]\npublish = ["devices/+/telemetry/#"]\nsubscribe = ["devices/{device_id}/commands/#"]\n'
        '[profiles.ingest]\nsubscribe = ["devices/+/telemetry/#"]\n'
    )
    run = await run_demo(home)
    assert not run.ok
    failed = [step for step in run.steps if not step.ok]
    assert [step.name for step in failed] == ["a device publishing to another device's topic is refused"]
    assert "was delivered" in failed[0].detail


async def test_demo_fails_when_the_device_cannot_renew(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.root.mkdir(parents=True)
    home.config_file.write_text(  # one request a minute per device: the renewal's confirmation is refused
        f'trust_domain = "{TRUST_DOMAIN}"\n[broker]\nport = 8883\n[rotation]\nmax_requests_per_minute = 1\n'
        '[profiles.default]\npublish = ["devices/{device_id}/telemetry/#", "devices/{device_id}/rotation/request"]\n'
        'subscribe = ["devices/{device_id}/commands/#", "devices/{device_id}/rotation/response"]\n'
        '[profiles.ingest]\nsubscribe = ["devices/+/telemetry/#"]\n'
    )
    run = await run_demo(home)
    assert not run.ok
    failed = [step for step in run.steps if not step.ok]
    assert [step.name for step in failed] == [EXPECTED_STEPS[6]]
    assert "the device agent failed" in failed[0].detail and "rate-limited" in failed[0].detail
