"""Output for the CLI: rich tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

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
    err.print(f"[green]✓[/green] {message}", highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def error(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)


STATUS_STYLE = {"active": "green", "pending": "yellow", "suspended": "magenta", "revoked": "red"}


def status(value: str) -> str:
    style = STATUS_STYLE.get(value)
    return f"[{style}]{value}[/{style}]" if style else value
