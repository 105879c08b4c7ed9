"""Crash safety: the agent and the renewer are killed with SIGKILL at every step of a renewal.

Each crash is a real ``kill -9`` at a named step (``--crash-at``: the process
sends itself SIGKILL there, so the step is hit exactly, not by timing luck).
After the crash the same command is run again (for the renewer: restarted
while the agent keeps trying), and every test ends with the invariant the
issue asks for: the device has exactly one active certificate, and its state
directory holds that certificate and its key -- nothing half-promoted, no
journal left behind. A fleet test then kills the renewer repeatedly while
many devices renew at once.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_tools.agent import CRASH_POINTS
from iotauth.errors import ConnectRefused
from iotauth.rotation.service import CRASH_POINTS as RENEWER_CRASH_POINTS
from iotauth.testing import CredentialFiles
from tests.fixtures.broker import BrokerProcess, Pki, connect
from tests.fixtures.rotation import (
    RenewerProcess,
    agent,
    agent_process,
    holds_its_active_key,
    renewal_stack,
    state_dir,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Pki, RenewerProcess]]:
    with renewal_stack(tmp_path_factory.mktemp("crash"), start=False) as stack:
        yield stack


def running(renewer: RenewerProcess, *args: str) -> RenewerProcess:
    """The renewer, running with exactly ``args`` (restarted if it runs otherwise or not at all)."""
    alive = renewer.process is not None and renewer.process.poll() is None
    if alive and renewer.args == args:
        return renewer
    if alive:
        renewer.stop()
    renewer.args = args
    return renewer.start()


def works(broker: BrokerProcess, state: Path, device_id: str, prefix: str = "") -> bool:
    files = CredentialFiles(device_id, state / f"{prefix}fullchain.pem", state / f"{prefix}key.pem", state / "ca.pem")
    if not files.cert.exists() or not files.key.exists():
        return False
    try:
        with connect(broker.port, files) as client:
            return client.is_connected()
    except (ConnectRefused, ValueError, OSError):  # refused, or a key that does not match its certificate
        return False


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_the_agent_killed_at_each_step_finishes_with_one_working_identity(
        stack: tuple[BrokerProcess, Pki, RenewerProcess], tmp_path: Path, point: str) -> None:
    broker, pki, renewer = stack
    running(renewer)
    device_id = f"agent-crash-{point}"
    state = state_dir(tmp_path / "state", pki.issue(device_id), pki.home, broker.port)
    crashed = agent(state, "--crash-at", point, "renew")
    assert crashed.returncode == -9, f"never reached {point}: {crashed.stderr}"
    # Right after the crash the device can still get in: with its old identity, or (once the renewal is active)
    # with the new one the journal holds.
    assert works(broker, state, device_id) or works(broker, state, device_id, "next-"), point
    resumed = agent(state)
    assert resumed.returncode == 0, resumed.stderr
    holds_its_active_key(pki.home, device_id, state)
    assert works(broker, state, device_id)


@pytest.mark.parametrize("point", RENEWER_CRASH_POINTS)
def test_the_renewer_killed_at_each_step_loses_no_device(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                         tmp_path: Path, point: str) -> None:
    broker, pki, renewer = stack
    device_id = f"renewer-crash-{point}"
    state = state_dir(tmp_path / "state", pki.issue(device_id), pki.home, broker.port)
    running(renewer, "--crash-at", point)
    device = agent_process(state, "--timeout", "3", "--attempts", "20", "renew")
    try:
        assert renewer.wait_exit(60) == -9, renewer.output()
        running(renewer)  # a supervisor restarts it; the agent has kept trying meanwhile
        _, err = device.communicate(timeout=120)
    finally:
        if device.poll() is None:
            device.kill()
    assert device.returncode == 0, err
    holds_its_active_key(pki.home, device_id, state)
    assert works(broker, state, device_id)


def test_a_fleet_renews_while_the_renewer_is_killed_again_and_again(stack: tuple[BrokerProcess, Pki, RenewerProcess],
                                                                   tmp_path: Path) -> None:
    broker, pki, renewer = stack
    running(renewer)
    devices = {f"fleet-crash-{n}": state_dir(tmp_path / str(n), pki.issue(f"fleet-crash-{n}"), pki.home, broker.port)
               for n in range(12)}
    agents: dict[str, subprocess.Popen[str]] = {
        device_id: agent_process(state, "--timeout", "3", "--attempts", "30", "renew")
        for device_id, state in devices.items()
    }
    rng = random.Random(13)
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.2, 1.0))
            renewer.kill()
            time.sleep(rng.uniform(0.1, 0.5))
            running(renewer)
        for device_id, process in agents.items():
            _, err = process.communicate(timeout=180)
            assert process.returncode == 0, f"{device_id}: {err}"
    finally:
        for process in agents.values():
            if process.poll() is None:
                process.kill()
    for device_id, state in devices.items():
        holds_its_active_key(pki.home, device_id, state)
