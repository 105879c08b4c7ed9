"""``audit`` and ``audit verify``."""

from __future__ import annotations

import click

from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, success, table
from iotauth.errors import AuditChainBroken


@click.group(invoke_without_command=True)
@click.option("--since", help="Only events at or after this ISO 8601 UTC time (e.g. 2026-11-29T00:00:00Z).")
@click.option("--device", "device_id", help="Only events about this device.")
@click.option("--limit", type=click.IntRange(min=1), help="Show only the last N matching events.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, since: str | None, device_id: str | None, limit: int | None, as_json: bool) -> None:
    """Show the hash-chained audit log (or check it with 'audit verify')."""
    if ctx.invoked_subcommand is not None:
        return
    cli_ctx: CliContext = ctx.obj
    events = run(cli_ctx.with_registry(lambda reg: reg.events(since=since, device_id=device_id)))
    if limit is not None:
        events = events[-limit:]
    if as_json:
        emit_json([e.as_dict() for e in events])
        return
    table(
        f"{len(events)} event(s)",
        ["id", "time", "kind", "actor", "device", "details"],
        [(e.id, e.ts, e.kind, e.actor, e.device_id, _summary(e.data)) for e in events],
    )


def _summary(data: dict[str, object]) -> str:
    def short(value: object) -> str:
        text = str(value)
        return text[:12] + "…" if len(text) > 40 and all(c in "0123456789abcdef" for c in text) else text

    return ", ".join(f"{k}={short(v)}" for k, v in sorted(data.items()) if k != "public_key_sha256")[:200]


@audit.command()
@click.option("--expect-head", help="Also require the chain head hash to equal this (a value you kept elsewhere).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def verify(ctx: CliContext, expect_head: str | None, as_json: bool) -> None:
    """Recompute the audit chain; exit 1 and name the first bad event if anything was altered."""
    report = run(ctx.with_registry(lambda reg: reg.verify_audit(expect_head)))
    if as_json:
        emit_json(report.as_dict())
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    if not report.ok:
        where = f" at event {report.first_bad_id}" if report.first_bad_id else ""
        raise AuditChainBroken(
            f"audit log does not verify{where}: {report.problem} ({report.events} event(s) verified before it)"
        )
    success(f"audit log verified: {report.events} events, head #{report.head_id}")
    fields("chain head", {"id": report.head_id, "hash": report.head_hash})
