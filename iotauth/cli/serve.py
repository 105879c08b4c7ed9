"""``iotauth serve`` and ``iotauth serve token``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, warn
from iotauth.http.access import new_token, token_digest


@click.group(invoke_without_command=True)
@click.option("--bind", help="HOST:PORT to listen on. [default: [serve] bind in iotauth.toml, 127.0.0.1:8443]")
@click.option("--no-tls", is_flag=True, help="Plain HTTP (for a TLS-terminating proxy). Disables the admin API.")
@click.option(
    "--certfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TLS certificate chain. [default: the broker server certificate from 'iotauth init']",
)
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Log every decision.")
@click.pass_context
def serve(
    ctx: click.Context, bind: str | None, no_tls: bool, certfile: Path | None, keyfile: Path | None, verbose: bool
) -> None:
    """Run the HTTP service: EMQX and mosquitto-go-auth authorizer, CRL, OCSP, admin API.

    Admin tokens come from [serve] admin_token_sha256 in iotauth.toml or from
    $IOTAUTH_ADMIN_TOKENS (comma-separated). There are no default credentials.
    """
    if ctx.invoked_subcommand is not None:
        return
    from iotauth.http.server import ServeOptions
    from iotauth.http.server import serve as run_service

    cli_ctx: CliContext = ctx.obj
    cli_ctx.home.require_initialised()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if no_tls:
        warn("serving plain HTTP: put it behind a TLS-terminating proxy; the admin API is disabled")
    tokens = tuple(t.strip() for t in os.environ.get("IOTAUTH_ADMIN_TOKENS", "").split(",") if t.strip())
    options = ServeOptions(bind=bind, tls=not no_tls, certfile=certfile, keyfile=keyfile, admin_tokens=tokens)
    run(run_service(cli_ctx.home, cli_ctx.registry_url, options))


@serve.command("token")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
def token(ctx: CliContext, as_json: bool) -> None:
    """Generate an admin API token; put its sha256 into [serve] admin_token_sha256."""
    value = new_token()
    data = {"token": value, "sha256": token_digest(value)}
    if as_json:
        emit_json(data)
        return
    fields("admin token (shown once; store it in your secret manager)", data)
    click.echo(f'\nAdd to {ctx.home.config_file}:\n[serve]\nadmin_token_sha256 = ["{data["sha256"]}"]', err=True)


COMMANDS = (serve,)
