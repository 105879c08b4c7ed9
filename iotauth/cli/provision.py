"""``iotauth provision``: run the provisioning line on one or more serial ports.

Thin: parse the options, call :func:`iotauth.provisioning.line.run_line`,
render a live line per port while it runs, then a summary table (or JSON).
Never prompts: an existing report is appended to, a failed board is
reported, and the exit status is 1 if any board failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from pathlib import Path

import click
from rich.console import Group
from rich.live import Live

from iotauth.authority import Authority, operator_actor
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import LiveView, emit_json, err, mark, success, table, warn
from iotauth.provisioning.line import LineOutcome, LineRequest, run_line
from iotauth.provisioning.report import append_report, report_format
from iotauth.provisioning.results import ProvisionResult
from iotauth.provisioning.session import RetryPolicy
from iotauth.provisioning.station import StationConfig


def _line(result: ProvisionResult) -> None:
    """Progress for logs and pipes: one line per finished board."""
    elapsed = (result.finished_at - result.started_at).total_seconds()
    mark(result.ok, f"{result.port} {result.hardware_id or '-'} {result.device_id or '-'} {result.result} "
                    f"({elapsed:.1f}s){': ' + result.error if result.error else ''}")


def _summary(outcome: LineOutcome) -> None:
    table(
        "provisioning summary",
        ("port", "result", "device id", "hardware id", "serial", "reason"),
        [(r.port, r.result, r.device_id, r.hardware_id, (r.serial or "")[:16], r.error) for r in outcome.results],
    )
    counts = {kind: sum(1 for r in outcome.results if r.result == kind)
              for kind in ("provisioned", "already-provisioned", "failed")}
    message = f"{counts['provisioned']} provisioned, {counts['already-provisioned']} already provisioned, " \
              f"{counts['failed']} failed"
    (warn if counts["failed"] else success)(message)


@click.command("provision")
@click.option("--port", "ports", multiple=True, required=True, metavar="DEV",
              help="Serial port or glob (e.g. '/dev/ttyUSB*'); repeatable. All ports run concurrently.")
@click.option("--profile", default="default", show_default=True, help="Profile to issue under.")
@click.option("--id-template", help="Device id template, e.g. 'sensor-{hardware_id|safe}' (default: iotauth.toml).")
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="CSV with hardware_id,device_id columns, or one device id per line.")
@click.option("--host-keygen", is_flag=True, help="Generate keys on the host (devices that cannot make keys).")
@click.option("--force", is_flag=True, help="Re-provision committed devices; their old certificate is revoked.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Append one traceability row per device to FILE.csv or FILE.json (JSON Lines).")
@click.option("--operator", help="Operator name for the journal and report (default: login user).")
@click.option("--station", "station_name", help="Station name (default: host name).")
@click.option("--baud", type=click.IntRange(300, 16_000_000), default=115200, show_default=True)
@click.option("--rtscts", is_flag=True, help="Use RTS/CTS hardware flow control.")
@click.option("--timeout", "reply_timeout", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
              help="Seconds to wait for each reply (plus its wire time).")
@click.option("--retries", type=click.IntRange(1, 20), default=4, show_default=True,
              help="Attempts per request before the device is FAILED.")
@click.option("--keygen-timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True,
              help="Extra seconds allowed for on-device key generation.")
@click.option("--watch", is_flag=True, help="Provision each newly plugged port until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_cli
def provision(cli: CliContext, ports: tuple[str, ...], profile: str, id_template: str | None,
              ids_file: Path | None, host_keygen: bool, force: bool, report_path: Path | None,
              operator: str | None, station_name: str | None, baud: int, rtscts: bool, reply_timeout: float,
              retries: int, keygen_timeout: float, watch: bool, as_json: bool) -> None:
    """Provision devices on serial ports: key, certificate, config, proof, commit."""
    if id_template and ids_file:
        raise click.UsageError("use either --id-template or --ids, not both")
    if report_path is not None:
        report_format(report_path)
    config = StationConfig(
        station=station_name or socket.gethostname().split(".")[0] or "station",
        operator=operator or operator_actor(),
        profile=profile,
        host_keygen=host_keygen,
        force=force,
        baudrate=baud,
        rtscts=rtscts,
        policy=RetryPolicy(attempts=retries, timeout=reply_timeout, keygen_timeout=keygen_timeout),
    )
    request = LineRequest(tuple(ports), config, id_template, ids_file, watch)
    view = LiveView()
    interactive = err.is_terminal and not as_json

    async def on_result(result: ProvisionResult) -> None:
        view.finish(result)
        if not interactive and not as_json:
            _line(result)
        if report_path is not None:
            await asyncio.to_thread(append_report, report_path, [result.as_row()])

    async def work(authority: Authority) -> LineOutcome:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if watch:
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        live = Live(get_renderable=lambda: Group(view.render()), console=err, refresh_per_second=8,
                    transient=False) if interactive else contextlib.nullcontext()
        with live:
            return await run_line(authority, request, on_progress=view.update, on_result=on_result, stop=stop)

    outcome = run(cli.with_authority(work))
    if as_json:
        emit_json({
            "results": [r.as_dict() for r in outcome.results],
            "expired_pending": [c.serial for c in outcome.expired],
            "failed": outcome.failed,
        })
    else:
        if outcome.expired:
            warn(f"revoked {len(outcome.expired)} pending certificate(s) older than the pending TTL (superseded)")
        _summary(outcome)
    if outcome.failed:
        click.get_current_context().exit(1)


COMMANDS: tuple[click.Command, ...] = (provision,)
