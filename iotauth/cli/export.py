"""``iotauth export mosquitto``."""

from __future__ import annotations

from pathlib import Path

import click

from iotauth.authority import Authority
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, line, success, warn
from iotauth.config import parse_bind
from iotauth.export import mosquitto
from iotauth.export.managed.layout import ManagedFiles
from iotauth.policy import PolicySet


@click.group()
def export() -> None:
    """Export the CA, CRL and topic policies for another broker."""


@export.command("mosquitto")
@click.option(
    "--out",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for mosquitto.conf, ca.pem, server.crt/key, crl.pem and acl (absolute paths inside).",
)
@click.option("--bind", default="0.0.0.0:8883", show_default=True, help="Listener HOST:PORT for mosquitto.conf.")
@click.option("--user", "run_as", help="Mosquitto's 'user' option (the account it drops privileges to).")
@click.option("--reload-pid", type=int, help="Send SIGHUP to this Mosquitto process after exporting.")
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: re-export the CRL/ACL after each revocation and before "
    "the CRL's nextUpdate, then reload (with --reload-pid).",
)
@click.option(
    "--managed",
    is_flag=True,
    help="Managed mode: the dynamic-security plugin instead of an ACL file, kept in step (and live sessions "
    "kicked) by 'iotauth mosquitto follow DIR'.",
)
@click.option("--admin-bind", default="127.0.0.1:1884", show_default=True,
              help="--managed: the follower's control listener (loopback only).")
@click.option("--plugin", help="--managed: path of mosquitto_dynamic_security.so. [default: found in /usr/lib]")
@click.option("--reset-state", is_flag=True,
              help="--managed: write the dynamic-security state and the follower's credentials afresh "
              "(with Mosquitto stopped; a running one keeps its own).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def export_mosquitto(
    ctx: CliContext,
    directory: Path,
    bind: str,
    run_as: str | None,
    reload_pid: int | None,
    watch: bool,
    managed: bool,
    admin_bind: str,
    plugin: str | None,
    reset_state: bool,
    as_json: bool,
) -> None:
    """Write a complete Mosquitto configuration that 'mosquitto -c DIR/mosquitto.conf' runs as is."""
    host, port = parse_bind(bind, 8883)
    settings = ctx.settings()
    policies = PolicySet.from_profiles(settings.profiles.values())
    if managed:
        if watch or reload_pid is not None:
            raise click.UsageError("--managed is kept in step by 'iotauth mosquitto follow DIR', not --watch")
        admin = parse_bind(admin_bind, 1884)
        run(ctx.with_authority(
            lambda authority: _managed(authority, ctx, policies, directory, (host, port), admin, run_as, plugin,
                                       reset_state, as_json),
            signing_optional=True,
        ))
        return
    if reset_state or plugin:
        raise click.UsageError("--plugin and --reset-state need --managed")

    async def work(authority: Authority) -> mosquitto.ExportedFiles:
        if authority.signing_unavailable is not None:
            warn(f"using the last published CRL ({authority.signing_unavailable})")
        registry = authority.registry
        files = await mosquitto.export(ctx.home, registry, authority, policies, directory, host, port, run_as)
        if reload_pid is not None:
            mosquitto.reload_broker(reload_pid)
        report(files)
        if watch:
            refresh = max(60.0, settings.crl_next_update.total_seconds() / 2)
            await mosquitto.watch(
                ctx.home,
                registry,
                authority,
                policies,
                files,
                host,
                port,
                reload_pid,
                refresh,
                run_as,
                lambda reason: line(f"re-exported ({reason})"),
            )
        return files

    def report(files: mosquitto.ExportedFiles) -> None:
        data = {**_common(files), "acl_file": str(files.acl), "listener": f"{host}:{port}",
                "reloaded_pid": reload_pid}
        if as_json:
            emit_json(data)
        else:
            success(f"Mosquitto configuration written to {files.directory}")
            fields("files", data)

    run(ctx.with_authority(work, signing_optional=True))


def _common(files: mosquitto.ExportedFiles | ManagedFiles) -> dict[str, str]:
    """The files both modes write, as the report names them."""
    return {"config": str(files.config), "ca": str(files.ca), "certfile": str(files.certificate),
            "keyfile": str(files.key), "crlfile": str(files.crl)}


async def _managed(
    authority: Authority,
    ctx: CliContext,
    policies: PolicySet,
    directory: Path,
    device: tuple[str, int],
    admin: tuple[str, int],
    run_as: str | None,
    plugin: str | None,
    reset_state: bool,
    as_json: bool,
) -> None:
    from iotauth.export.managed.layout import export_managed

    if authority.signing_unavailable is not None:
        warn(f"using the last published CRL ({authority.signing_unavailable})")
    done = await export_managed(ctx.home, authority, policies, directory, device_bind=device, admin_bind=admin,
                                user=run_as, plugin=plugin, reset_state=reset_state)
    files = done.files
    data = {
        **_common(files),
        "dynamic_security": str(files.state),
        "state_written": done.state_written,
        "devices": done.devices,
        "listener": f"{device[0]}:{device[1]}",
        "control": f"{admin[0]}:{admin[1]}",
        "plugin": done.settings.plugin,
    }
    if as_json:
        emit_json(data)
        return
    success(f"managed Mosquitto configuration written to {files.directory}")
    fields("files", data)
    if not done.state_written:
        warn("kept the existing dynamic-security state (Mosquitto owns it); --reset-state writes it afresh")
    line(f"next: mosquitto -c {files.config}   and   iotauth mosquitto follow {files.directory}")


COMMANDS = (export,)
