"""``iotauth mosquitto follow DIR``: keep a managed Mosquitto in step with the registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from iotauth.authority import Authority
from iotauth.cli.context import CliContext, pass_cli, run


@click.group()
def mosquitto() -> None:
    """Run Mosquitto under iotauth's control (see 'iotauth export mosquitto --managed')."""


@mosquitto.command("follow")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--restart-command",
    help="How to restart Mosquitto when it lost iotauth's state (or for a change too large for its control "
    "API), e.g. 'systemctl restart mosquitto'. Run without a shell. Without it, the follower rebuilds the "
    "state file and tells you to restart Mosquitto.",
)
@click.option("--poll-interval", type=click.FloatRange(min=0.005), default=0.05, show_default=True,
              help="Seconds between registry change-feed polls (SQLite; PostgreSQL wakes it at once).")
@click.option("--reconcile-every", type=click.FloatRange(min=1.0), default=600.0, show_default=True,
              help="Seconds between full comparisons of Mosquitto's state with the registry.")
@click.option("--rebuild-threshold", type=click.IntRange(min=1), default=600, show_default=True,
              help="With --restart-command: rebuild and restart instead of sending more control commands "
              "than this (each rewrites Mosquitto's whole state file).")
@click.option("--metrics-bind", metavar="[HOST:]PORT",
              help="Prometheus metrics of the follower at http://HOST:PORT/metrics (PORT alone: 127.0.0.1 only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line on stdout once Mosquitto is in step.")
@click.option("-v", "--verbose", is_flag=True, help="Also log every reconcile.")
@pass_cli
def follow(
    ctx: CliContext,
    directory: Path,
    restart_command: str | None,
    poll_interval: float,
    reconcile_every: float,
    rebuild_threshold: int,
    metrics_bind: str | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Follow the registry: kick revoked and suspended devices, sync rights, reconcile Mosquitto.

    DIR is a directory written by 'iotauth export mosquitto --managed'. The
    follower needs the home the export was made from (its credentials and the
    CA key, to sign CRLs: set IOTAUTH_CA_PASSPHRASE if the key is encrypted).
    SIGINT/SIGTERM stop it; SIGHUP (or saving iotauth.toml) reloads the topic policies.
    """
    from iotauth.export.managed.follower import FollowerOptions
    from iotauth.export.managed.service import build_follower
    from iotauth.export.metrics import mosquitto_follower_metrics
    from iotauth.metrics import MetricsExporter, exporting
    from iotauth.metrics import metrics_bind as metrics_address

    if metrics_bind is not None:
        metrics_address(metrics_bind)  # a bad address is one line before anything starts

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("iotauth").setLevel(logging.INFO if verbose else logging.WARNING)
    command = shlex.split(restart_command) if restart_command else None
    refresh = max(5.0, ctx.settings().crl_next_update.total_seconds() / 2)  # well before nextUpdate
    options = FollowerOptions(poll_interval=poll_interval, reconcile_every=reconcile_every,
                              crl_refresh_every=refresh, rebuild_threshold=rebuild_threshold)

    exporters: list[MetricsExporter] = []

    def ready(status: dict[str, Any]) -> None:
        if exporters and exporters[0].address is not None:
            status = {**status, "metrics": "{}:{}".format(*exporters[0].address)}
        if as_json:
            sys.stdout.write(json.dumps(status, sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            click.echo(f"in step: {status['devices']} devices in Mosquitto (pid {status['mosquitto_pid']}), "
                       f"following the registry from event {status['event_id']}", err=True)

    async def work(authority: Authority) -> None:
        follower = build_follower(ctx.home, authority, directory, restart_command=command, options=options,
                                  on_ready=ready)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            if task is not None:
                loop.add_signal_handler(signum, task.cancel)
        loop.add_signal_handler(signal.SIGHUP, lambda: follower.check_policies(force=True))
        with contextlib.suppress(asyncio.CancelledError):
            async with exporting(metrics_bind, mosquitto_follower_metrics(follower)) as exporter:
                exporters[:] = [exporter] if exporter is not None else []
                await follower.run()

    run(ctx.with_authority(work))


COMMANDS: tuple[click.Command, ...] = (mosquitto,)
