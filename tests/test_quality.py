"""The code stays lint-clean (ruff, broad rule set) and type-checks strictly (mypy --strict)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff() -> None:
    result = _run("ruff", "check", "iotauth", "firmware_tools", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run("mypy", "iotauth", "firmware_tools")
    assert result.returncode == 0, result.stdout + result.stderr
