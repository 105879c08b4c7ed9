"""``iotauth renewer`` (the renewal service) and ``iotauth rotate`` (ask devices to renew now)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from iotauth.authority import operator_actor
from iotauth.certs import now_utc
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, err, line, success, table, warn
from iotauth.config import parse_bind
from iotauth.errors import IotAuthError
from iotauth.metrics import metrics_bind as metrics_address
from iotauth.registry import Registry
from iotauth.rotation.orders import Ordered, Progress, ProgressWatch, choose_devices, order_rotation, parse_duration


@click.command()
@click.option("--broker", "broker_address", metavar="HOST:PORT",
              help="The MQTT-over-TLS broker the devices use. [default: [broker] host and port of iotauth.toml]")
@click.option("--cafile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Trust anchors for the broker's server certificate. [default: the home's ca/chain.pem]")
@click.option("--workers", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Messages decided at once.")
@click.option("--metrics-bind", metavar="[HOST:]PORT",
              help="Prometheus metrics of the renewer at http://HOST:PORT/metrics (PORT alone: 127.0.0.1 only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line on stdout once connected.")
@click.option("-v", "--verbose", count=True, help="-v: log every renewal.")
@click.option("--crash-at", hidden=True, help="Testing: die with SIGKILL at this step (received, issued, activated, "
              "answered).")
@pass_cli
def renewer(ctx: CliContext, broker_address: str | None, cafile: Path | None, workers: int, metrics_bind: str | None,
            as_json: bool, verbose: int, crash_at: str | None) -> None:
    """Run the renewal service: devices renew their certificates over MQTT, on any broker.

    It connects to the broker as an ordinary client with its own certificate
    (profile 'renewer', issued and renewed by itself), answers requests on
    devices/+/rotation/request, and tells devices ordered by 'iotauth rotate'
    to renew. It holds the CA key ($IOTAUTH_CA_PASSPHRASE or the token PIN as
    for 'iotauth issue'). SIGINT/SIGTERM stop it.
    """
    from iotauth.rotation.service import RenewerOptions, Started, serve

    ctx.home.require_initialised()
    settings = ctx.settings()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("iotauth").setLevel(logging.DEBUG if verbose else logging.INFO)  # -v: every renewal (debug)
    broker = parse_bind(broker_address, settings.broker_port) if broker_address else None
    if metrics_bind is not None:
        metrics_address(metrics_bind)  # a bad address is a usage error before anything starts
    options = RenewerOptions(home=ctx.home, registry=ctx.registry_url, broker=broker, cafile=cafile, workers=workers,
                             metrics_bind=metrics_bind, crash_at=crash_at)

    def started(info: Started) -> None:
        if as_json:
            sys.stdout.write(json.dumps(info.as_dict()) + "\n")
            sys.stdout.flush()

    run(serve(options, on_started=started))


@click.command()
@click.argument("device_ids", nargs=-1)
@click.option("--profile", help="Every active device of this profile.")
@click.option("--expiring-within", "expiring", metavar="DURATION",
              help="Every device whose active certificate ends within DURATION (30d, 12h, 2w).")
@click.option("--wait", is_flag=True, help="Show progress until every device renewed (or --timeout, or Ctrl-C).")
@click.option("--timeout", type=click.FloatRange(min=0), default=0, help="With --wait: give up after this many "
              "seconds (0: never).")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def rotate(ctx: CliContext, device_ids: tuple[str, ...], profile: str | None, expiring: str | None, wait: bool,
           timeout: float, as_json: bool) -> None:
    """Ask devices to renew their certificates now, whatever their renewal window says.

    Records one rotation order per device (audited); the running 'iotauth
    renewer' tells each device on devices/<id>/commands/rotate. An order stays
    open until the device's renewal is activated. Exit code with --wait: 0 when
    every device renewed, 1 otherwise.
    """
    if not device_ids and profile is None and expiring is None:
        raise click.UsageError("name devices, or choose them with --profile or --expiring-within")
    within = parse_duration(expiring) if expiring is not None else None
    settings = ctx.settings()
    if profile is not None:
        settings.profile(profile)  # an unknown profile is an error, not an empty order

    async def order(registry: Registry) -> Ordered:
        chosen = await choose_devices(registry, device_ids, profile, within, now_utc(),
                                      renewer_id=settings.rotation.renewer_id)
        if not chosen:
            raise IotAuthError("no device matches: nothing to rotate")
        return await order_rotation(registry, chosen, actor=operator_actor())

    ordered = run(ctx.with_registry(order))
    report: dict[str, Any] = {"ordered": [o.device_id for o in ordered.orders], "skipped": ordered.skipped}
    if not wait:
        if as_json:
            emit_json(report)
            return
        success(f"asked {len(ordered.orders)} device(s) to renew; 'iotauth renewer' delivers the orders")
        _skipped(ordered.skipped)
        return
    holder: list[Progress] = []
    try:
        run(ctx.with_registry(lambda registry: _watch(registry, ordered, timeout, holder, not as_json)))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    progress = holder[-1] if holder else None
    summary = progress.summary() if progress is not None else {}
    report.update(summary, interrupted=interrupted)
    if as_json:
        emit_json(report)
    else:
        _render_summary(report, ordered)
    if interrupted:
        raise click.exceptions.Exit(130)
    if progress is None or not progress.done:
        raise click.exceptions.Exit(1)


async def _watch(registry: Registry, ordered: Ordered, limit: float, holder: list[Progress], show: bool) -> None:
    watch = ProgressWatch(registry, ordered)
    holder.append(watch.progress)
    started = time.monotonic()
    shown = 0.0
    while True:
        progress = await watch.poll()
        now = time.monotonic()
        if show and (progress.done or now - shown >= (1.0 if err.is_terminal else 5.0)):
            shown = now
            counts = progress.counts()
            line(f"requested {len(progress.state)} · renewed {counts['renewed']} · issued {counts['issued']} "
                 f"· refused {counts['refused']} · waiting {counts['waiting']} ({now - started:.0f} s)", stderr=True)
        if progress.done or (limit and now - started >= limit):
            return
        await asyncio.sleep(0.5)


def _skipped(skipped: dict[str, str]) -> None:
    if skipped:
        warn(f"{len(skipped)} device(s) not ordered: " + ", ".join(f"{d} ({why})" for d, why in
                                                                  sorted(skipped.items())[:20]))


def _render_summary(report: dict[str, Any], ordered: Ordered) -> None:
    renewed = report.get("renewed", 0)
    total = len(ordered.orders)
    said = (f"{renewed} of {total} device(s) renewed; issued, not yet switched: {report.get('issued', 0)}; "
            f"refused: {report.get('refused', 0)}; no answer yet: {report.get('waiting', 0)}")
    if renewed == total:
        success(said)
    else:
        warn(said + (" (interrupted)" if report.get("interrupted") else ""))
    refusals = report.get("refusals", {})
    if refusals:
        table("refused", ["device id", "code"], sorted(refusals.items())[:50])
    _skipped(ordered.skipped)


COMMANDS: tuple[click.Command, ...] = (renewer, rotate)
