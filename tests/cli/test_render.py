"""What the CLI prints: plain aligned columns into a pipe, tables at a terminal, and text that is never markup."""

from __future__ import annotations

import ast
import io
import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from rich.console import Console

from iotauth.cli import render
from tests.fixtures import iotauth_executable
from tests.fixtures.cli import CsrFactory, iotauth, one_line_error

BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters


def issue_devices(home: Path, tmp_path: Path, csr_factory: CsrFactory, ids: list[tuple[str, str]]) -> None:
    for device_id, hardware_id in ids:
        csr = tmp_path / f"{device_id}.csr"
        csr.write_bytes(csr_factory()[1].public_bytes(serialization.Encoding.PEM))
        iotauth(home, "issue", device_id, "--csr", str(csr), "--hardware-id", hardware_id, "--out", os.devnull)


def column_starts(header: str) -> list[int]:
    """Where each column of a plain header starts (columns are separated by two or more spaces)."""
    return [0, *(m.end() for m in re.finditer(r" {2,}", header))]


def test_a_piped_device_list_is_plain_aligned_columns(cli_home: Path, tmp_path: Path, csr_factory: CsrFactory) -> None:
    ids = [("s1", "HW-1"), ("sensor-with-a-much-longer-id-0042", "aa-bb"), ("mid-length-7", "HW-0000000000000000007")]
    issue_devices(cli_home, tmp_path, csr_factory, ids)
    iotauth(cli_home, "suspend", "s1")
    listed = iotauth(cli_home, "devices", "list").stdout  # stdout is a pipe here
    assert not BOX.search(listed) and "\x1b" not in listed
    lines = listed.splitlines()
    assert len(lines) == 1 + len(ids), listed  # a header, then one line per device: nothing wrapped
    header = lines[0]
    assert header.split()[:3] == ["DEVICE", "ID", "HARDWARE"]
    starts = column_starts(header)
    assert len(starts) == 5
    for row in lines[1:]:
        for start in starts[1:]:
            assert row[start - 2:start] == "  " and row[start] != " ", (header, row)
    by_id = {row.split()[0]: row.split() for row in lines[1:]}
    assert set(by_id) == {i for i, _ in ids}
    assert by_id["s1"][1:4] == ["HW-1", "default", "suspended"]


def test_a_piped_audit_log_and_device_show_keep_one_line_per_row(cli_home: Path, tmp_path: Path,
                                                                 csr_factory: CsrFactory) -> None:
    issue_devices(cli_home, tmp_path, csr_factory, [("sensor-1", "HW-1")])
    events = json.loads(iotauth(cli_home, "audit", "--json").stdout)
    audit = iotauth(cli_home, "audit").stdout
    assert not BOX.search(audit)
    assert len(audit.splitlines()) == 1 + len(events)
    assert audit.splitlines()[0].split() == ["ID", "TIME", "KIND", "ACTOR", "DEVICE", "DETAILS"]
    shown = iotauth(cli_home, "devices", "show", "sensor-1").stdout
    assert not BOX.search(shown)
    fingerprint = json.loads(iotauth(cli_home, "devices", "show", "sensor-1", "--json").stdout)["certificates"][0][
        "fingerprint"]
    assert any(line.split()[:1] == ["SERIAL"] for line in shown.splitlines())
    assert any(fingerprint[:23] in line for line in shown.splitlines())


def test_init_never_wraps_a_fingerprint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = iotauth(home, "init", "--trust-domain", "factory.test", env={"COLUMNS": "40"})
    fingerprints = json.loads(iotauth(home, "audit", "--json").stdout)[0]["data"]
    printed = result.stdout.splitlines()
    root = next(line for line in printed if line.startswith("root_fingerprint"))
    assert root.split() == ["root_fingerprint", fingerprints["root_fingerprint"]]
    assert any(line.split()[-1] == fingerprints["issuing_fingerprint"] for line in printed)


def test_a_terminal_gets_a_table(cli_home: Path, tmp_path: Path, csr_factory: CsrFactory) -> None:
    issue_devices(cli_home, tmp_path, csr_factory, [("sensor-1", "HW-1")])
    controller, terminal = pty.openpty()
    env = {**os.environ, "IOTAUTH_HOME": str(cli_home), "COLUMNS": "200", "TERM": "xterm"}
    try:
        done = subprocess.run([iotauth_executable(), "devices", "list"], stdout=terminal, stderr=subprocess.PIPE,
                              env=env, timeout=60, check=False)
        os.close(terminal)
        terminal = -1
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the other side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert done.returncode == 0, done.stderr
    shown = b"".join(chunks).decode()
    assert BOX.search(shown) and "1 device(s)" in shown and "sensor-1" in shown


# -- text is never markup ----------------------------------------------------------------------


def test_a_broken_profiles_table_is_reported_with_its_brackets(cli_home: Path) -> None:
    config = cli_home / "iotauth.toml"
    text = config.read_text().replace("[profiles.", "[unused.")
    config.write_text('profiles = "oops"\n' + text)
    one_line_error(iotauth(cli_home, "broker", "--bind", "127.0.0.1:0", ok=False), "[profiles] must be a table")


def test_the_emqx_push_error_keeps_its_table_names(cli_home: Path) -> None:
    config = cli_home / "iotauth.toml"
    config.write_text(config.read_text().replace('# base_url = "http://emqx:18083"', 'base_url = "http://127.0.0.1:9"'))
    one_line_error(iotauth(cli_home, "serve", "--bind", "127.0.0.1:0", env={"IOTAUTH_ADMIN_TOKENS": "t"}, ok=False),
                   "[emqx] base_url is set: also set [emqx] api_key")


MARKUP = "[bold]not bold[/bold] [/profiles] [red] \\[x] [link=http://x]y[/link]"


@pytest.mark.parametrize("say", [render.error, render.warn, render.success, render.text_block])
def test_messages_print_markup_as_written(say: object, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=buffer, soft_wrap=True, highlight=False, width=40))
    say(MARKUP)  # type: ignore[operator]
    assert MARKUP in buffer.getvalue() and buffer.getvalue().count("\n") == 1


@pytest.mark.parametrize("terminal", [True, False])
def test_tables_and_fields_print_values_as_written(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, soft_wrap=True, highlight=False, width=400, force_terminal=terminal,
                      color_system=None)
    monkeypatch.setattr(render, "out", console)
    render.table("t", ["a", "b"], [(MARKUP, render.status("revoked")), ("line\nbreak\x1b[2J", None)])
    render.fields("f", {"key [x]": MARKUP, "k": "tab\there"})
    printed = buffer.getvalue()
    assert printed.count(MARKUP) == 2 and "key [x]" in printed
    assert "\x1b" not in printed and "line\\nbreak\\x1b[2J" in printed and "tab\\there" in printed
    if not terminal:
        assert printed.splitlines()[:3] == [f"A{' ' * (len(MARKUP) + 1)}B", f"{MARKUP}  revoked",
                                            "line\\nbreak\\x1b[2J"]


def test_the_station_line_and_demo_steps_are_not_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(render, "err", Console(file=buffer, soft_wrap=True, highlight=False, width=40))
    render.mark(False, "/dev/ttyUSB0 [x]", aside="(1.0 s)", detail=MARKUP)
    assert buffer.getvalue() == f"✗ /dev/ttyUSB0 [x] (1.0 s)  {MARKUP}\n"


def test_cli_commands_print_only_through_render() -> None:
    """Every line a command prints goes through render.py, which never reads markup: no console.print elsewhere."""
    cli = Path(render.__file__).parent
    offenders = []
    for path in sorted(cli.glob("*.py")):
        if path.name == "render.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
