"""``audit``, ``audit verify`` and ``audit anchor``."""

from __future__ import annotations

import click

from iotauth.auditing import anchor_log, verify_log
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, success, table, warn
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
@click.option("--anchor", "anchor_target", metavar="FILE|URL",
              help="Also require the head recorded by 'iotauth audit anchor' to be in the log, unchanged.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def verify(ctx: CliContext, expect_head: str | None, anchor_target: str | None, as_json: bool) -> None:
    """Recompute the audit chain and check its genesis against the home's CA; exit 1 if it does not verify."""
    report = run(ctx.with_registry(
        lambda reg: verify_log(ctx.home, reg, expected_head=expect_head, anchor_target=anchor_target)))
    if as_json:
        emit_json(report.as_dict())
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    for note in report.notes:
        warn(note)
    if not report.ok:
        where = f" at event {report.first_bad_id}" if report.first_bad_id else ""
        raise AuditChainBroken(
            f"audit log does not verify{where}: {report.problem} ({report.events} event(s) verified before it)"
        )
    success(f"audit log verified: {report.events} events, head #{report.head_id}"
            + (f", extends the anchor at {anchor_target}" if anchor_target else ""))
    fields("chain head", {"id": report.head_id, "hash": report.head_hash})


@audit.command()
@click.argument("target", metavar="FILE|URL")
@click.option("--method", type=click.Choice(["PUT", "POST"]), default="PUT", show_default=True,
              help="HTTP method for a URL target.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def anchor(ctx: CliContext, target: str, method: str, as_json: bool) -> None:
    """Verify the log and write its head to FILE or URL, outside the home (run it from cron).

    The log must extend the anchor already at the target. A URL is written with
    PUT (or POST) and read back with GET; $IOTAUTH_ANCHOR_TOKEN, if set, is sent
    as a bearer token. Check later with 'iotauth audit verify --anchor FILE|URL'.
    """
    written = run(ctx.with_registry(lambda reg: anchor_log(ctx.home, reg, target, method=method)))
    data = {"target": target, "head_id": written.head_id, "head_hash": written.head_hash,
            "registry_instance": written.registry_instance, "anchored_at": written.anchored_at}
    if as_json:
        emit_json(data)
        return
    success(f"audit head #{written.head_id} anchored to {target}")
    fields("anchor", data)
