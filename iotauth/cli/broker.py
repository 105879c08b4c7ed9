"""``iotauth broker``: run the mTLS-enforcing MQTT broker."""

from __future__ import annotations

import json
import logging
import sys

import click

from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import warn


@click.command()
@click.option("--bind", help="HOST:PORT of the MQTT-over-TLS listener. [default: 0.0.0.0:<[broker] port>, 8883]")
@click.option("--ws-bind", help="HOST:PORT of an MQTT-over-secure-WebSocket listener (off by default).")
@click.option(
    "--fail-open",
    is_flag=True,
    help="DANGEROUS: if the registry cannot be read, admit clients on their certificate alone "
    "(revocations made meanwhile are not enforced). Default: fail closed.",
)
@click.option("--poll-interval", type=click.FloatRange(min=0.005), default=0.05, show_default=True,
              help="Seconds between registry change-feed polls (revocation latency).")
@click.option("--registry-grace", type=click.FloatRange(min=0.0), default=10.0, show_default=True,
              help="Seconds live sessions survive a registry outage before they are dropped.")
@click.option("--durable-accept-audit", is_flag=True,
              help="Commit each accept record to the audit log before CONNACK (one commit per connect). "
              "Default: group-committed within 50 ms; no one is admitted while records cannot be written.")
@click.option("--engine", type=click.Choice(["iotauth", "amqtt"]), default="iotauth", show_default=True,
              help="The MQTT engine behind the mTLS gate. 'amqtt' is for amqtt plugin users: identity, policy and "
              "revocation are enforced by the same gate and guard; amqtt's own gaps (keep-alive, QoS redelivery, "
              "limits after authentication) remain.")
@click.option("--metrics-bind", metavar="[HOST:]PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no authentication). "
              "PORT alone listens on 127.0.0.1 only. Off by default.")
@click.option("--json", "as_json", is_flag=True, help="Print the listening addresses as one JSON line on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: also log every accepted connect.")
@pass_cli
def broker(
    ctx: CliContext,
    bind: str | None,
    ws_bind: str | None,
    fail_open: bool,
    poll_interval: float,
    registry_grace: float,
    durable_accept_audit: bool,
    engine: str,
    metrics_bind: str | None,
    as_json: bool,
    verbose: int,
) -> None:
    """Run the MQTT broker: mTLS identity, topic ACLs from iotauth.toml, live revocation.

    Devices connect with their iotauth certificate and a client id equal to
    their device id. SIGINT/SIGTERM stop it cleanly; SIGHUP (or editing
    iotauth.toml) reloads the topic policies for live sessions too.
    """
    from iotauth.broker.runtime import BrokerOptions
    from iotauth.broker.server import Started, serve

    serving = serve
    if engine == "amqtt":  # loaded only when asked for: the native broker never imports amqtt
        from iotauth.broker.amqtt_host import serve_options

        serving = serve_options

    ctx.home.require_initialised()
    settings = ctx.settings()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("iotauth").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("amqtt", "transitions", "websockets"):
        logging.getLogger(name).setLevel(logging.INFO if verbose > 1 else logging.ERROR)
    if fail_open:
        warn("--fail-open: while the registry is unreadable, revoked and suspended devices may connect")
    options = BrokerOptions(
        home=str(ctx.home.root),
        registry=ctx.registry_url,
        bind=bind or f":{settings.broker_port}",
        ws_bind=ws_bind,
        fail_open=fail_open,
        poll_interval=poll_interval,
        registry_grace=registry_grace,
        durable_accept=durable_accept_audit,
        metrics_bind=metrics_bind,
    )

    def started(info: Started) -> None:
        if as_json:
            listening = {name: f"{host}:{port}" for name, (host, port) in info.addresses.items()}
            sys.stdout.write(json.dumps({"listening": listening}) + "\n")
            sys.stdout.flush()

    run(serving(options, on_started=started))


COMMANDS: tuple[click.Command, ...] = (broker,)
