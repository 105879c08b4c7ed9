"""``iotauth status``: the home's certificates, the fleet by status, what expires soon, the audit head."""

from __future__ import annotations

import click

from iotauth.certs import now_utc
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, table, warn
from iotauth.status import HomeStatus, home_status


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@pass_cli
def status(ctx: CliContext, as_json: bool) -> None:
    """Show CA and TLS certificate expiry, devices by status, devices expiring soon and the audit head.

    Reads only (no CA key is opened). Devices count as expiring when the newest of
    their active certificates ends within 7 or 30 days.
    """
    report: HomeStatus = run(ctx.with_registry(lambda registry: home_status(ctx.home, registry, now_utc())))
    if as_json:
        emit_json(report.as_dict())
        return
    fleet = report.fleet
    fields("home", {"home": report.home, "registry": report.registry})
    table("certificates of the home", ["name", "not after", "days left", "subject"],
          [(lt.name, lt.as_dict()["not_after"] or "-", lt.as_dict()["days_left"], lt.problem or lt.subject)
           for lt in report.lifetimes])
    table("registry", ["kind", *fleet.devices],
          [("devices", *(fleet.devices.values())),
           ("certificates", *(fleet.certificates.get(s, "") for s in fleet.devices))])
    expiring = {f"expiring within {days} days": count for days, count in fleet.expiring.items()}
    fields("device certificates", {**expiring, "lapsed (active, no valid certificate)": fleet.lapsed})
    if fleet.soonest:
        table("expiring soonest", ["device id", "not after"], [(e.device_id, e.not_after) for e in fleet.soonest])
    head = fleet.head
    fields("audit head", {"id": head.id, "time": head.ts, "kind": head.kind, "hash": head.hash}
           if head is not None else {"id": None})
    for lifetime in report.lifetimes:
        days = lifetime.days_left
        if lifetime.problem is not None:
            warn(f"{lifetime.name}: {lifetime.problem}")
        elif lifetime.expires_soon and days is not None:
            when = f"ends in {days:.1f} days" if days >= 0 else f"ENDED {-days:.1f} days ago"
            warn(f"{lifetime.name} {when} ({lifetime.as_dict()['not_after']})")


COMMANDS: tuple[click.Command, ...] = (status,)
