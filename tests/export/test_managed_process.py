"""The follower signals only the Mosquitto that runs its export, whatever the (Mosquitto-writable) pid file says."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from iotauth.errors import MosquittoUnavailable
from iotauth.export.managed.process import MosquittoProcess, started_with
from iotauth.testing import free_port, mosquitto_binary, wait_listening


@pytest.fixture
def base(reachable_dir: Path) -> Path:
    return reachable_dir


def run_mosquitto(base: Path, relative: bool) -> tuple[subprocess.Popen[bytes], Path, Path]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (make test does)")
    port, state = free_port(), base / "state"
    state.mkdir(mode=0o777, exist_ok=True)
    state.chmod(0o777)  # Mosquitto writes its pid file after dropping to its own account
    config = base / "mosquitto.conf"
    config.write_text(f"pid_file {state / 'mosquitto.pid'}\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
    argv = [binary, "-c", "mosquitto.conf" if relative else str(config)]
    process = subprocess.Popen(argv, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_listening(port)
    return process, config, state / "mosquitto.pid"


@pytest.mark.parametrize("relative", [False, True])
def test_the_running_mosquitto_of_this_configuration_is_found_and_reloaded(base: Path, relative: bool) -> None:
    process, config, pid_file = run_mosquitto(base, relative)
    try:
        found = MosquittoProcess(config, pid_file)
        assert found.pid() == process.pid
        assert found.reload() == process.pid
        assert process.poll() is None  # SIGHUP reloads, it does not stop Mosquitto
        assert MosquittoProcess(base / "other.conf", pid_file).pid() is None  # another configuration
    finally:
        process.terminate()
        process.wait(10)


def test_a_tampered_pid_file_names_no_one(base: Path) -> None:
    pid_file = base / "mosquitto.pid"
    config = base / "mosquitto.conf"
    config.write_text("")
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for content in (str(bystander.pid), str(os.getpid()), "1", "-5", "abc", ""):
            pid_file.write_text(content)
            process = MosquittoProcess(config, pid_file)
            assert process.pid() is None, content
            with pytest.raises(MosquittoUnavailable):
                process.reload()
        assert bystander.poll() is None  # never hung up
        assert not started_with(bystander.pid, config)
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()


def test_restart_commands_report_failure_instead_of_hanging(base: Path) -> None:
    process = MosquittoProcess(base / "c", base / "p")
    assert asyncio.run(process.restart()) is False  # none configured
    assert asyncio.run(MosquittoProcess(base / "c", base / "p", ["false"]).restart()) is False
    assert asyncio.run(MosquittoProcess(base / "c", base / "p", ["/no/such/tool"]).restart()) is False
    assert asyncio.run(MosquittoProcess(base / "c", base / "p", ["sleep", "5"]).restart(timeout=0.2)) is False
    assert asyncio.run(MosquittoProcess(base / "c", base / "p", ["true"]).restart()) is True
