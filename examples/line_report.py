"""Summarise a provisioning station report (the file 'iotauth provision --report' appends to).

    python examples/line_report.py line-1.csv [--json]

Reads CSV or JSON Lines, and prints what a shift lead wants to know: how many
boards passed, first-pass yield, why the others failed, per station, operator
and port, and how long a board took.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

PASSED = {"provisioned", "already-provisioned"}


def load(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _seconds(row: dict[str, str]) -> float | None:
    try:
        started = datetime.fromisoformat(row["started_at"])
        finished = datetime.fromisoformat(row["finished_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


def _by(rows: Iterable[dict[str, str]], key: str) -> dict[str, dict[str, int]]:
    table: dict[str, Counter[str]] = {}
    for row in rows:
        outcome = "passed" if row.get("result") in PASSED else "failed"
        table.setdefault(row.get(key) or "?", Counter())[outcome] += 1
    return {name: {"passed": c["passed"], "failed": c["failed"]} for name, c in sorted(table.items())}


def summarise(rows: list[dict[str, str]]) -> dict[str, Any]:
    passed = [r for r in rows if r.get("result") in PASSED]
    failed = [r for r in rows if r.get("result") not in PASSED]
    attempts = Counter(r.get("hardware_id") or "?" for r in rows)
    first_pass = sum(1 for r in passed if attempts[r.get("hardware_id") or "?"] == 1)
    durations = sorted(d for d in (_seconds(r) for r in passed) if d is not None)
    times = sorted(r["started_at"] for r in rows if r.get("started_at"))
    return {
        "rows": len(rows),
        "boards": len(attempts),
        "devices_provisioned": len({r.get("device_id") for r in passed}),
        "failed_attempts": len(failed),
        "first_pass_yield": round(first_pass / len(attempts), 3) if attempts else None,
        "failure_reasons": dict(Counter(r.get("error") or "unknown" for r in failed).most_common()),
        "by_station": _by(rows, "station"),
        "by_operator": _by(rows, "operator"),
        "by_port": _by(rows, "port"),
        "seconds_per_board": {
            "median": round(statistics.median(durations), 3) if durations else None,
            "p95": round(durations[int(0.95 * (len(durations) - 1))], 3) if durations else None,
        },
        "from": times[0] if times else None,
        "to": times[-1] if times else None,
    }


def show(summary: dict[str, Any]) -> None:
    print(
        f"{summary['devices_provisioned']} device(s) provisioned from {summary['boards']} board(s); "
        f"{summary['failed_attempts']} failed attempt(s); first-pass yield {summary['first_pass_yield']}"
    )
    print(
        f"time per board: median {summary['seconds_per_board']['median']} s, "
        f"p95 {summary['seconds_per_board']['p95']} s"
        f" ({summary['from']} .. {summary['to']})"
    )
    for title in ("by_station", "by_operator", "by_port"):
        print(f"{title.replace('_', ' ')}:")
        for name, counts in summary[title].items():
            print(f"  {name}: {counts['passed']} passed, {counts['failed']} failed")
    if summary["failure_reasons"]:
        print("failure reasons:")
        for reason, count in summary["failure_reasons"].items():
            print(f"  {count} x {reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Summarise an iotauth station report.")
    parser.add_argument("report", type=Path, help="CSV or JSON Lines file written by 'iotauth provision --report'")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    try:
        rows = load(args.report)
    except (OSError, ValueError, csv.Error) as exc:
        print(f"error: cannot read report {args.report}: {exc}", file=sys.stderr)
        return 1
    summary = summarise(rows)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        show(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
