"""Every command in the README works as written.

``sh`` blocks are run, in order, in one bash session in a fresh directory
(exactly as a reader would paste them). ``console`` blocks hold commands that
need hardware, run forever or change the machine (``make test``); for those,
every ``iotauth`` subcommand and option they use must exist, and every
``make`` target must be in the Makefile.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import iotauth_executable

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[str]:
    return [body for language, body in BLOCK.findall(README) if language == kind]


@pytest.mark.timeout(300)
def test_shell_blocks_run_as_written(tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(blocks("sh"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for variable in ("IOTAUTH_HOME", "IOTAUTH_REGISTRY", "IOTAUTH_CA_PASSPHRASE"):
        env.pop(variable, None)
    env["PYTHONPATH"] = str(ROOT)  # 'python -m firmware_tools.emulator' from a checkout
    # A session of its own: whatever a failed block leaves running in the background (a broker holding the
    # output pipes and the README's ports) is killed with it, so a failure is reported instead of hanging.
    with subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as shell:
        try:
            stdout, stderr = shell.communicate(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)
    assert shell.returncode == 0, f"README shell blocks failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr


def _commands(kind: str, program: str) -> list[list[str]]:
    found = []
    for body in blocks(kind):
        for line in body.replace("\\\n", " ").splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith(program + " "):
                found.append(shlex.split(command))
    return found


@pytest.mark.parametrize("argv", _commands("console", "iotauth"), ids=lambda argv: " ".join(argv[:3]))
def test_console_iotauth_commands_exist(argv: list[str]) -> None:
    words = [a for a in argv[1:] if not a.startswith("-")]
    # The subcommand path is the leading words that are commands; options must appear in its --help.
    path: list[str] = []
    for word in words:
        probe = subprocess.run(
            [iotauth_executable(), *path, word, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            break
        path.append(word)
        help_text = probe.stdout
    assert path, f"no iotauth subcommand in {argv}"
    for option in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(option)}[\s,=]", help_text), f"'iotauth {' '.join(path)}' has no {option}"


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for argv in _commands("console", "make"):
        assert re.search(rf"^{re.escape(argv[1])}:", makefile, re.M), f"Makefile has no target {argv[1]}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in blocks("console")[0]
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()
