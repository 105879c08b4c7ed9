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


def test_no_merge_conflict_markers_are_committed() -> None:
    """A marker once slipped into scripts/install-system-deps.sh, which only CI runs: check every tracked file."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        return  # not a git checkout (an sdist): nothing to check
    markers = ("<<<<<<< ", ">>>>>>> ", "=======\n")
    bad = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if not path.is_file() or path.suffix in {".json", ".ods"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(keepends=True), 1):
            if line.startswith(markers[:2]) or line == markers[2]:
                bad.append(f"{name}:{number}")
    assert not bad, f"merge conflict markers: {bad}"
