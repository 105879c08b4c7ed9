"""Output for the CLI: rich tables for people, JSON for scripts, one-line errors, live provisioning lines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from iotauth.provisioning.results import STEP_COUNT, Progress, ProvisionResult

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def emit_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (never through rich, so it stays parseable)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if v is None else str(v) for v in row))
    out.print(grid)


def fields(title: str, data: Mapping[str, Any]) -> None:
    grid = Table(title=title, show_header=False, box=None, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in data.items():
        grid.add_row(key, "" if value is None else str(value))
    out.print(grid)


def success(message: str) -> None:
    err.print(f"[green]✓[/green] {escape(message)}", highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True)  # messages name [tables]


STATUS_STYLE = {"active": "green", "pending": "yellow", "suspended": "magenta", "revoked": "red"}


def status(value: str) -> str:
    style = STATUS_STYLE.get(value)
    return f"[{style}]{value}[/{style}]" if style else value


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
                escape(port),
                escape(row.get("hardware_id") or ""),
                escape(row.get("device_id") or ""),
                f"{number}/{STEP_COUNT} {step.label}" if step is not None else "",
                ProgressBar(total=STEP_COUNT, completed=max(done, 0), width=20),
                f"{end - row['started']:.1f}s",
                Text(state, style=_STATE_STYLE.get(state, "")),
            )
        return grid
