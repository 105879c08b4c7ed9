"""``devices list|show``, ``revoke``, ``suspend`` and ``resume``."""

from __future__ import annotations

import sys
from typing import Any

import click

from iotauth.authority import Authority, CrlRefresh, StatusChange, certificate_pem, operator_actor
from iotauth.certs import now_utc
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, line, status, success, table, warn
from iotauth.registry import DeviceStatus, Registry, RevocationReason
from iotauth.rotation.orders import expiring_rows, parse_duration


@click.group()
def devices() -> None:
    """Inspect the device registry."""


@devices.command("list")
@click.option("--status", "status_filter", type=click.Choice([s.value for s in DeviceStatus]))
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many devices.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def list_devices(ctx: CliContext, status_filter: str | None, limit: int | None, as_json: bool) -> None:
    """List devices, optionally only those with one status."""
    chosen = DeviceStatus(status_filter) if status_filter else None
    found = run(ctx.with_registry(lambda reg: reg.list_devices(chosen, limit)))
    if as_json:
        emit_json([d.as_dict() for d in found])
        return
    table(
        f"{len(found)} device(s)",
        ["device id", "hardware id", "profile", "status", "updated"],
        [(d.device_id, d.hardware_id, d.profile, status(d.status.value), d.updated_at) for d in found],
    )


@devices.command("expiring")
@click.option("--within", default="30d", show_default=True, metavar="DURATION",
              help="Active certificates ending within this long from now: 30d, 12h, 2w.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def expiring_devices(ctx: CliContext, within: str, as_json: bool) -> None:
    """List active devices whose active certificate ends soon (renew them with 'iotauth rotate')."""
    horizon = parse_duration(within)
    now = now_utc()
    found = run(ctx.with_registry(lambda reg: reg.expiring(now + horizon)))
    rows = expiring_rows(found, now)
    if as_json:
        emit_json(rows)
        return
    table(f"{len(rows)} certificate(s) ending within {within}", ["device id", "profile", "serial", "not after",
                                                                  "days left"],
          [(r["device_id"], r["profile"], r["serial"], r["not_after"], r["days_left"]) for r in rows])


@devices.command("show")
@click.argument("device_id")
@click.option("--events", "event_limit", default=20, show_default=True, help="Recent audit events to show.")
@click.option("--pem", "as_pem", is_flag=True,
              help="Print only the device's current certificate as PEM (the newest unrevoked one).")
@click.option("--serial", help="With --pem: this certificate of the device instead.")
@click.option("--fullchain", is_flag=True, help="With --pem: append the issuing CA certificate.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def show_device(ctx: CliContext, device_id: str, event_limit: int, as_pem: bool, serial: str | None,
                fullchain: bool, as_json: bool) -> None:
    """Show one device, its certificates and its recent audit events (or, with --pem, its certificate)."""
    if as_pem:
        sys.stdout.write(run(ctx.with_registry(
            lambda reg: certificate_pem(reg, device_id, serial, ctx.home.issuing_cert if fullchain else None))))
        return
    if serial is not None or fullchain:
        raise click.UsageError("--serial and --fullchain go with --pem")

    async def work(reg: Registry) -> dict[str, Any]:
        device = await reg.get_device(device_id)
        certs = await reg.certificates_of(device_id)
        events = await reg.events(device_id=device_id)
        return {
            "device": device.as_dict(),
            "certificates": [c.as_dict() for c in certs],
            "events": [e.as_dict() for e in events[-event_limit:]],
        }

    data = run(ctx.with_registry(work))
    if as_json:
        emit_json(data)
        return
    fields(f"device {device_id}", {**data["device"], "status": status(data["device"]["status"])})
    table(
        "certificates",
        ["serial", "status", "not after", "fingerprint (sha256)", "revoked", "reason"],
        [
            (
                c["serial"],
                status(c["status"]),
                c["not_after"],
                c["fingerprint"][:23] + "…",
                c["revoked_at"],
                c["revocation_reason"],
            )
            for c in data["certificates"]
        ],
    )
    table(
        "recent events",
        ["id", "time", "kind", "actor"],
        [(e["id"], e["ts"], e["kind"], e["actor"]) for e in data["events"]],
    )


@click.command()
@click.argument("device_id")
@click.option(
    "--reason",
    type=click.Choice([r.value for r in RevocationReason]),
    default=RevocationReason.UNSPECIFIED.value,
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def revoke(ctx: CliContext, device_id: str, reason: str, as_json: bool) -> None:
    """Revoke DEVICE_ID permanently: every certificate, live sessions dropped, CRL refreshed."""
    done = run(ctx.with_authority(
        lambda authority: authority.revoke_device(
            device_id, RevocationReason(reason), actor=operator_actor(), publish_to=ctx.home
        ),
        signing_optional=True,
    ))
    serials = [c.serial for c in done.certificates]
    if as_json:
        emit_json({"device_id": device_id, "reason": reason, "revoked_serials": serials, "crl": _crl_note(done.crl)})
        return
    if serials:
        success(f"revoked {device_id} ({reason}): {len(serials)} certificate(s) " + ", ".join(serials))
    else:
        success(f"{device_id} was already revoked; nothing changed")
    _report_crl(done.crl)


def _crl_note(refresh: CrlRefresh | None) -> str | None:
    if refresh is None:
        return None
    if refresh.published is None:
        return f"CRL not refreshed ({refresh.error}); run 'iotauth crl' with the CA key unlocked (passphrase or PIN)"
    return f"CRL #{refresh.published.number} published to {refresh.path}"


def _report_crl(refresh: CrlRefresh | None) -> None:
    note = _crl_note(refresh)
    if refresh is not None and refresh.published is None:
        warn(str(note))
    elif note:
        line(note)


def _status_command(name: str, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @click.argument("device_id")
    @click.option("--json", "as_json", is_flag=True)
    @pass_cli
    def command(ctx: CliContext, device_id: str, as_json: bool) -> None:
        async def work(authority: Authority) -> StatusChange:
            if name == "suspend":
                return await authority.suspend_device(device_id, actor=operator_actor(), publish_to=ctx.home)
            return await authority.resume_device(device_id, actor=operator_actor(), publish_to=ctx.home)

        done = run(ctx.with_authority(work, signing_optional=True))
        if as_json:
            emit_json({**done.device.as_dict(), "crl": _crl_note(done.crl)})
            return
        success(f"{device_id} is now {done.device.status.value}")
        _report_crl(done.crl)

    return command


suspend = _status_command("suspend", "Suspend DEVICE_ID: live sessions are dropped and connects refused.")
resume = _status_command("resume", "Resume a suspended DEVICE_ID.")

COMMANDS = (devices, revoke, suspend, resume)
