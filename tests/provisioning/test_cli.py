"""``iotauth provision`` as a real process: reports, exit codes, globs, ids, watch, and being killed."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotauth.config import Home
from iotauth.provisioning.report import REPORT_FIELDS
from iotauth.registry import CertificateRecord, open_registry
from tests.fixtures.devices import REPO, EmulatedDevice, EmulatorFactory

FAST = ["--timeout", "0.3", "--retries", "4", "--keygen-timeout", "2", "--baud", "1000000"]


def cli(home: Home, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotauth.cli.main", "--home", str(home.root), *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "IOTAUTH_OPERATOR": "line-op"},
    )


def spawn(home: Home, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "iotauth.cli.main", "--home", str(home.root), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO,
    )


def certificates(home: Home) -> list[CertificateRecord]:
    async def read() -> list[CertificateRecord]:
        async with await open_registry(home.registry_db) as registry:
            out: list[CertificateRecord] = []
            for device in await registry.list_devices():
                out += await registry.certificates_of(device.device_id)
            return out

    return asyncio.run(read())


def events(home: Home) -> list[Any]:
    async def read() -> list[Any]:
        async with await open_registry(home.registry_db) as registry:
            assert (await registry.verify_audit()).ok
            return await registry.events()

    return asyncio.run(read())


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_provision_two_ports_and_append_the_report(home: Home, emulator: EmulatorFactory, tmp_path: Path) -> None:
    boards = [emulator(), emulator()]
    report = tmp_path / "line.csv"
    first = cli(home, "provision", *(a for b in boards for a in ("--port", b.port)), "--report", str(report),
                "--station", "st-1", *FAST)
    assert first.returncode == 0, first.stderr
    assert "2 provisioned" in first.stderr
    summary = first.stdout.splitlines()  # piped: a plain table, a header and one line per port
    assert summary[0].split()[:3] == ["PORT", "RESULT", "DEVICE"] and len(summary) == 3
    assert all(line.split()[1] == "provisioned" for line in summary[1:])
    assert "Traceback" not in first.stderr
    again = cli(home, "provision", "--port", boards[0].port, "--report", str(report), "--station", "st-1", *FAST)
    assert again.returncode == 0, again.stderr

    lines = report.read_text().splitlines()
    assert lines[0] == ",".join(REPORT_FIELDS) and sum(1 for line in lines if line.startswith("device_id")) == 1
    table = rows(report)
    assert len(table) == 3
    by_hw = {r["hardware_id"]: r for r in table[:2]}
    for board in boards:
        row = by_hw[board.hardware_id]
        cert = board.certificate()
        assert cert is not None
        assert row["device_id"] == f"sensor-{board.hardware_id}" and row["port"] == board.port
        assert row["serial"] == format(cert.serial_number, "x") and len(row["fingerprint"]) == 64
        assert (row["station"], row["operator"], row["result"], row["error"]) == ("st-1", "line-op", "provisioned", "")
        assert row["started_at"] <= row["finished_at"]
    assert table[2]["result"] == "already-provisioned"


def test_json_output_report_and_exit_code_on_failure(home: Home, emulator: EmulatorFactory, tmp_path: Path) -> None:
    board = emulator()
    report = tmp_path / "line.json"
    run = cli(home, "provision", "--port", board.port, "--port", str(tmp_path / "missing-tty"), "--json",
              "--report", str(report), *FAST)
    assert run.returncode == 1
    data = json.loads(run.stdout)
    results = {r["port"]: r for r in data["results"]}
    assert results[board.port]["result"] == "provisioned" and data["failed"] == 1
    failed = results[str(tmp_path / "missing-tty")]
    assert failed["result"] == "failed" and "cannot open" in failed["error"]
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(line["result"] for line in lines) == ["failed", "provisioned"]
    assert all(set(line) == set(REPORT_FIELDS) for line in lines)


def test_glob_ports_and_ids_csv(home: Home, emulator: EmulatorFactory, tmp_path: Path) -> None:
    ports = tmp_path / "ports"
    ports.mkdir()
    boards = [emulator(), emulator()]
    for n, board in enumerate(boards):
        (ports / f"ttyEMU{n}").symlink_to(board.port)
    ids = tmp_path / "ids.csv"
    mapping = "".join(f"{b.hardware_id},meter-{n:03d}\n" for n, b in enumerate(boards))
    ids.write_text("hardware_id,device_id\n" + mapping)
    run = cli(home, "provision", "--port", str(ports / "ttyEMU*"), "--ids", str(ids), "--json", *FAST)
    assert run.returncode == 0, run.stderr
    got = {r["hardware_id"]: r["device_id"] for r in json.loads(run.stdout)["results"]}
    assert got == {b.hardware_id: f"meter-{n:03d}" for n, b in enumerate(boards)}


@pytest.mark.parametrize(("args", "message"), [
    (["--id-template", "x-{hardware_id.__class__}"], "may only use"),
    (["--id-template", "{hardware_id}/../x"], "bad device id"),
    (["--report", "out.txt"], ".csv, .json"),
    (["--profile", "nope"], "unknown profile"),
    (["--operator", "bad name\x1b"], "invalid operator"),
])
def test_bad_options_are_one_clear_line(home: Home, emulator: EmulatorFactory, args: list[str],
                                        message: str) -> None:
    board = emulator()
    run = cli(home, "provision", "--port", board.port, *args, *FAST)
    assert run.returncode == 1, run.stdout
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2


def test_concurrent_stations_append_to_one_report(home: Home, emulator: EmulatorFactory, tmp_path: Path) -> None:
    boards = [emulator() for _ in range(6)]
    report = tmp_path / "shared.csv"
    stations = [
        spawn(home, "provision", *(a for b in boards[i::2] for a in ("--port", b.port)), "--report", str(report),
              "--station", f"st-{i}", *FAST)
        for i in range(2)
    ]
    for station in stations:
        _out, err = station.communicate(timeout=90)
        assert station.returncode == 0, err
    lines = report.read_text().splitlines()
    assert lines.count(",".join(REPORT_FIELDS)) == 1 and lines[0] == ",".join(REPORT_FIELDS)
    table = rows(report)
    assert sorted(r["hardware_id"] for r in table) == sorted(b.hardware_id for b in boards)
    assert {r["station"] for r in table} == {"st-0", "st-1"}


@pytest.mark.parametrize("stall_at", ["put_cert", "read_back", "commit"])
def test_station_killed_mid_provisioning_resumes(stall_at: str, home: Home, emulator: EmulatorFactory,
                                                 tmp_path: Path) -> None:
    """SIGKILL the station while the board hangs; power-cycle the board; the next run resumes."""
    board = emulator(faults=[f"stall:{stall_at}"])
    station = spawn(home, "provision", "--port", board.port, "--timeout", "30", "--baud", "1000000")
    try:
        wait_for(lambda: any(c.status.value == "pending" for c in certificates(home)))
        if stall_at != "put_cert":
            wait_for(lambda: board.read("cert.bin") is not None)
        time.sleep(0.3)  # let the station reach the hanging request
        assert station.poll() is None
    finally:
        station.send_signal(signal.SIGKILL)
        station.wait(10)
    pending = certificates(home)
    assert [c.status.value for c in pending] == ["pending"]
    assert board.committed is None

    board.start()  # power cycle, same flash, no fault
    run = cli(home, "provision", "--port", board.port, "--json", *FAST)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)["results"][0]
    assert result["result"] == "provisioned" and result["resumed"] is True
    after = certificates(home)
    assert len(after) == 1 and after[0].serial == pending[0].serial and after[0].status.value == "active"
    assert board.committed == after[0].fingerprint
    keyed = [e for e in events(home) if e.kind == "provisioning.keyed"]
    assert keyed[-1].data.get("reused_certificate") == pending[0].serial


def test_watch_mode_provisions_hot_plugged_ports_until_interrupted(
    home: Home, emulator: EmulatorFactory, tmp_path: Path
) -> None:
    ports = tmp_path / "dev"
    ports.mkdir()
    report = tmp_path / "watch.csv"
    watcher = spawn(home, "provision", "--watch", "--port", str(ports / "tty*"), "--report", str(report), *FAST)
    try:
        boards: list[EmulatedDevice] = []
        for n in range(2):
            board = emulator()
            boards.append(board)
            (ports / f"tty{n}").symlink_to(board.port)
            wait_for(lambda n=n: report.exists() and len(rows(report)) == n + 1)
        time.sleep(1.2)  # a port that stays plugged in is not provisioned twice
        assert len(rows(report)) == 2
    finally:
        watcher.send_signal(signal.SIGINT)
        _out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "2 provisioned" in err
    assert sorted(r["hardware_id"] for r in rows(report)) == sorted(b.hardware_id for b in boards)


def test_a_port_where_nothing_answers_says_to_check_the_baud_rate(home: Home, tmp_path: Path) -> None:
    """A pty with nobody behind it is what a board listening at another baud rate looks like: silence."""
    controller, device = os.openpty()
    try:
        run = cli(home, "provision", "--port", os.ttyname(device), "--timeout", "0.1", "--retries", "3",
                  "--report", str(tmp_path / "line.csv"))
    finally:
        os.close(device)
        os.close(controller)
    assert run.returncode == 1
    failure = rows(tmp_path / "line.csv")[0]["error"]
    assert "no reply within" in failure and failure.endswith("after 3 attempts (check --baud and the cable)")
    assert "(check --baud and the cable)" in run.stderr  # the piped progress line says it too
