"""``iotauth export rabbitmq`` (registered under ``export`` by :mod:`iotauth.cli.main`)."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import httpx

from iotauth.authority import Authority
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, line, success, warn
from iotauth.config import parse_bind
from iotauth.export import rabbitmq
from iotauth.export.metrics import rabbitmq_follower_metrics
from iotauth.export.rabbitmq_follow import RabbitmqFollower, RabbitmqKicker
from iotauth.metrics import exporting
from iotauth.rabbitmq import ensure_admin_secret


@click.command("rabbitmq")
@click.option(
    "--out",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for rabbitmq.conf, advanced.config, enabled_plugins, ca.pem, server.crt/key and crl/.",
)
@click.option("--mqtt-bind", default="0.0.0.0:8883", show_default=True, help="MQTTS listener HOST:PORT.")
@click.option(
    "--management-bind", default="127.0.0.1:15672", show_default=True, help="Management API listener HOST:PORT."
)
@click.option("--serve-url", help="'iotauth serve' as RabbitMQ reaches it. [default: https:// on [serve] bind]")
@click.option(
    "--user",
    "account",
    default=rabbitmq.DEFAULT_ACCOUNT,
    show_default=True,
    help="The account RabbitMQ runs as: gets the key (when run as root); every file is checked readable by it.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running: rewrite crl/ after each change and before nextUpdate, and kick revoked or suspended "
    "devices off the cluster through the management API.",
)
@click.option(
    "--management-url",
    "management_urls",
    multiple=True,
    help="Management API to kick through (repeatable). [default: [rabbitmq] management_urls, else --management-bind]",
)
@click.option("--metrics-bind", metavar="[HOST:]PORT",
              help="With --watch: Prometheus metrics of the follower at http://HOST:PORT/metrics (PORT alone: "
              "127.0.0.1 only).")
@click.option("-v", "--verbose", is_flag=True, help="Log every kick attempt.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def export_rabbitmq(
    ctx: CliContext,
    directory: Path,
    mqtt_bind: str,
    management_bind: str,
    serve_url: str | None,
    account: str,
    watch: bool,
    management_urls: tuple[str, ...],
    metrics_bind: str | None,
    verbose: bool,
    as_json: bool,
) -> None:
    """Write RabbitMQ's configuration for MQTTS with certificate login, authorised by 'iotauth serve'."""
    if metrics_bind is not None and not watch:
        raise click.UsageError("--metrics-bind goes with --watch")
    settings = ctx.settings()
    management = parse_bind(management_bind, 15672)
    options = rabbitmq.ExportOptions(
        mqtt=parse_bind(mqtt_bind, 8883),
        management=management,
        serve_url=serve_url or rabbitmq.default_serve_url(settings),
        account=account or None,
    )
    urls = management_urls or settings.rabbitmq.management_urls or (_local_url(*management),)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def work(authority: Authority) -> None:
        if authority.signing_unavailable is not None:
            warn(f"using the last published CRL ({authority.signing_unavailable}); RabbitMQ refuses every "
                 "device once it expires")
        result = await rabbitmq.export(ctx.home, authority, settings, directory, options)
        report(result)
        if not watch:
            return
        async with httpx.AsyncClient(timeout=5.0) as client:
            kicker = RabbitmqKicker(urls, ensure_admin_secret(ctx.home, settings.rabbitmq), client)
            follower = RabbitmqFollower(
                ctx.home,
                authority,
                result.files,
                kicker,
                refresh_every=max(60.0, settings.crl_next_update.total_seconds() / 2),
                on_report=line,
            )
            async with exporting(metrics_bind, rabbitmq_follower_metrics(follower)):
                await follower.run()

    def report(result: rabbitmq.ExportResult) -> None:
        files = result.files
        data = {
            "rabbitmq.conf": str(files.config),
            "advanced.config": str(files.advanced),
            "enabled_plugins": str(files.plugins),
            "crl": str(result.crl_file),
            "crl_next_update": result.crl_next_update.isoformat() if result.crl_next_update else None,
            "mqtts": f"{options.mqtt[0]}:{options.mqtt[1]}",
            "serve_url": options.serve_url,
            "readable_by": result.account_checked,
            "unusable_devices": list(result.unusable_devices),
            "kick_via": list(urls) if watch else None,
        }
        if result.unusable_devices:
            warn(f"{len(result.unusable_devices)} active device(s) have '.' in their id and are refused on RabbitMQ: "
                 + ", ".join(result.unusable_devices[:10]))
        if as_json:
            emit_json(data)
        else:
            success(f"RabbitMQ configuration written to {files.directory}")
            fields("files", data)

    run(ctx.with_authority(work, signing_optional=True))


def _local_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"
