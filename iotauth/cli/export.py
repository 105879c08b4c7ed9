"""``iotauth export mosquitto``."""

from __future__ import annotations

from pathlib import Path

import click

from iotauth.authority import Authority
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, line, success, warn
from iotauth.config import parse_bind
from iotauth.export import mosquitto
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
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def export_mosquitto(
    ctx: CliContext, directory: Path, bind: str, run_as: str | None, reload_pid: int | None, watch: bool, as_json: bool
) -> None:
    """Write a complete Mosquitto configuration that 'mosquitto -c DIR/mosquitto.conf' runs as is."""
    host, port = parse_bind(bind, 8883)
    settings = ctx.settings()
    policies = PolicySet.from_profiles(settings.profiles.values())

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
        data = {
            "config": str(files.config),
            "ca": str(files.ca),
            "certfile": str(files.certificate),
            "keyfile": str(files.key),
            "crlfile": str(files.crl),
            "acl_file": str(files.acl),
            "listener": f"{host}:{port}",
            "reloaded_pid": reload_pid,
        }
        if as_json:
            emit_json(data)
        else:
            success(f"Mosquitto configuration written to {files.directory}")
            fields("files", data)

    run(ctx.with_authority(work, signing_optional=True))


COMMANDS = (export,)
