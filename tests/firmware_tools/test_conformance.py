"""``python -m firmware_tools.conformance`` against the reference device, and against devices that break a rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware_tools.emulator import VIOLATIONS
from tests.fixtures.devices import EmulatorFactory

REPO = Path(__file__).resolve().parents[2]


def conformance(port: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware_tools.conformance", "--port", port, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def report(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run.stdout)
    return data


@pytest.mark.parametrize("args", [(), ("--max-payload", "64"), ("--no-keygen",),
                                  ("--no-put-key", "--key-types", "p256")],
                         ids=["default", "64-byte payloads", "host keys only", "keygen only, p256 only"])
def test_the_reference_device_passes(emulator: EmulatorFactory, args: tuple[str, ...]) -> None:
    board = emulator(args=list(args))
    run = conformance(board.port, "--json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    result = report(run)
    assert result["failed"] == 0 and result["passed"] >= 45
    assert result["device"]["hardware_id"] == board.hardware_id
    skipped = [r for r in result["results"] if r["status"] == "skip"]
    assert all("does not hold" in r["message"] for r in skipped)


# Each deliberate violation, and a case that must catch it with a message a firmware developer can act on.
CAUGHT = {
    "cache": ("a retransmit is answered from the cache, not executed", "was executed again"),
    "precedence": ("UNSUPPORTED before LOCKED", "expected ERROR UNSUPPORTED, got ERROR LOCKED"),
    "keep-buffer": ("CONFIG refused: port 0", "expected ERROR BAD_OFFSET, got ERROR BAD_PAYLOAD"),
}


@pytest.mark.parametrize("rule", sorted(VIOLATIONS))
def test_a_device_that_breaks_a_rule_fails_with_a_clear_message(emulator: EmulatorFactory, rule: str) -> None:
    board = emulator(args=["--violate", rule])
    run = conformance(board.port)
    assert run.returncode == 1, run.stdout[-3000:]
    case, message = CAUGHT[rule]
    lines = run.stdout.splitlines()
    failing = lines.index(next(line for line in lines if line.startswith("FAIL") and case in line))
    assert "PROTOCOL.md" in lines[failing] and message in lines[failing + 1]
    assert lines[-1].startswith("conformance: ") and " 0 failed" not in lines[-1]


def test_an_unreachable_port_is_one_clear_line(tmp_path: Path) -> None:
    run = conformance(str(tmp_path / "no-such-tty"))
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot open") and run.stderr.count("\n") == 1
