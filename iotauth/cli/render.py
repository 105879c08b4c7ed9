"""Output for the CLI: tables for a terminal, plain aligned columns for pipes, JSON for scripts, one-line errors.

Two readers, two shapes, chosen by whether stdout is a terminal (as ``kubectl``,
``gh`` and ``docker ps`` do):

* **A terminal** gets Rich tables with a title and colours.
* **A pipe or a file** (``iotauth devices list | cat``, ``iotauth audit | less``)
  gets plain columns: an upper-case header line, then exactly one line per row,
  columns aligned with spaces, nothing wrapped or cut, no box drawing and no
  colour codes; key/value sections are ``key  value`` lines. ``--json`` stays
  the format for programs.

Nothing printed here is ever read as Rich markup: every value and every
message becomes a :class:`rich.text.Text` (styles come only from this module),
so ``[profiles]`` or ``[emqx] base_url`` in an error survives as written. Control
characters in values (a client id in an audit record is attacker-chosen) are
shown escaped (``\\x1b``), so a value can neither break a row in two nor send
escape sequences to the operator's terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from iotauth.provisioning.results import STEP_COUNT, Progress, ProvisionResult

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_sections = {"printed": False}


def emit_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (never through rich, so it stays parseable)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def printable(value: object) -> str:
    """``value`` as one line of text: control and other non-printing characters escaped (``\\n``, ``\\x1b``)."""
    text = "" if value is None else value.plain if isinstance(value, Text) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def cell(value: object) -> Text:
    """A table cell: plain text (never markup), keeping the style of a :class:`Text` from :func:`status`."""
    if isinstance(value, Text):
        return Text(printable(value), style=value.style)
    return Text(printable(value))


def plain_columns(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a table for a pipe: an upper-case header, one line per row, columns aligned, nothing cut."""
    grid = [[printable(c).upper() for c in columns], *([printable(v) for v in row] for row in rows)]
    widths = [max(cell_len(line[i]) for line in grid) for i in range(len(columns))]
    lines = []
    for line in grid:
        padded = [value + " " * (widths[i] - cell_len(value)) for i, value in enumerate(line[:-1])]
        lines.append("  ".join([*padded, line[-1]]).rstrip())
    return lines


def _section() -> None:
    """A blank line between two sections printed for a pipe (``devices show``: fields, then two tables)."""
    if _sections["printed"]:
        out.print()
    _sections["printed"] = True


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A Rich table at a terminal; plain aligned columns (no title) otherwise."""
    if not out.is_terminal:
        _section()
        for line in plain_columns(columns, rows):
            out.print(Text(line), crop=False, overflow="ignore")
        return
    grid = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(cell(v) for v in row))
    out.print(grid)


def fields(title: str, data: Mapping[str, Any]) -> None:
    """Key/value lines, aligned and never wrapped (a fingerprint stays on its line); the title at a terminal only."""
    keys = [printable(k) for k in data]
    width = max((cell_len(k) for k in keys), default=0)
    terminal = out.is_terminal
    if terminal:
        out.print(Text(printable(title), style="bold italic"))
    else:
        _section()
    for key, value in zip(keys, data.values(), strict=True):
        line = Text(key + " " * (width - cell_len(key) + 2), style="bold" if terminal else "")
        line.append_text(cell(value))
        out.print(line, crop=False, overflow="ignore")


def line(message: str, *, stderr: bool = False) -> None:
    """One line of information, printed as written."""
    (err if stderr else out).print(Text(printable(message)), crop=False, overflow="ignore")


def text_block(message: str) -> None:
    """Several lines of guidance on stderr (each printed as written)."""
    for part in message.split("\n"):
        err.print(Text(printable(part)), crop=False, overflow="ignore")


def _say(mark: str, style: str, message: str) -> None:
    err.print(Text.assemble((mark, style), " ", printable(message)), crop=False, overflow="ignore")


def success(message: str) -> None:
    _say("✓", "green", message)


def warn(message: str) -> None:
    _say("warning:", "yellow", message)


def error(message: str) -> None:
    _say("error:", "red", message)


def mark(ok: bool, message: str, *, aside: str = "", detail: str = "") -> None:
    """``✓``/``✗`` and a message on stderr, then a dimmed aside (a duration) and a detail."""
    parts: list[str | tuple[str, str]] = [("✓", "green") if ok else ("✗", "red"), " ", printable(message)]
    if aside:
        parts += [" ", (printable(aside), "dim")]
    if detail:
        parts += ["  ", printable(detail)]
    err.print(Text.assemble(*parts), crop=False, overflow="ignore")


STATUS_STYLE = {"active": "green", "pending": "yellow", "suspended": "magenta", "revoked": "red"}


def status(value: str) -> Text:
    """A device or certificate status, coloured at a terminal."""
    return Text(value, style=STATUS_STYLE.get(value, ""))


_STATE_STYLE = {"running": "cyan", "done": "cyan", "failed": "red", "provisioned": "green",
                "already-provisioned": "green"}


class LiveView:
    """One line per port: hardware id, device id, step, progress, elapsed time, state."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}

    def update(self, progress: Progress) -> None:
        row = self._rows.setdefault(progress.port, {"started": time.monotonic(), "finished": None})
        if row["finished"] is not None:  # a new board on a watched port
            row.update(started=time.monotonic(), finished=None)
        row.update(step=progress.step, state=progress.state, hardware_id=progress.hardware_id,
                   device_id=progress.device_id, detail=progress.detail)
        if progress.state == "failed":
            row["finished"] = time.monotonic()

    def finish(self, result: ProvisionResult) -> None:
        row = self._rows.setdefault(result.port, {"started": time.monotonic()})
        row.update(state=result.result, finished=time.monotonic(), step=result.step,
                   hardware_id=result.hardware_id, device_id=result.device_id, detail=result.error or "")

    def render(self) -> Table:
        grid = Table(title="provisioning", header_style="bold", expand=False)
        for column in ("port", "hardware id", "device id", "step", "", "elapsed", "state"):
            grid.add_column(column, overflow="fold")
        for port, row in sorted(self._rows.items()):
            step = row.get("step")
            number = int(step) if step is not None else 0
            done = number if row.get("state") in ("done", "provisioned", "already-provisioned") else number - 1
            if row.get("state") in ("provisioned", "already-provisioned"):
                done = STEP_COUNT
            end = row.get("finished") or time.monotonic()
            state = str(row.get("state", "waiting"))
            grid.add_row(
                cell(port),
                cell(row.get("hardware_id")),
                cell(row.get("device_id")),
                cell(f"{number}/{STEP_COUNT} {step.label}" if step is not None else ""),
                ProgressBar(total=STEP_COUNT, completed=max(done, 0), width=20),
                cell(f"{end - row['started']:.1f}s"),
                Text(state, style=_STATE_STYLE.get(state, "")),
            )
        return grid
