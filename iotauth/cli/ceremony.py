"""``iotauth ceremony``: what only the root key signs -- a new issuing CA, and the root's CRL."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import click

from iotauth.authority import operator_actor
from iotauth.ceremony import REVOCATION_REASONS, sign_arl, sign_issuing
from iotauth.cli.context import CliContext, pass_cli, run
from iotauth.cli.render import emit_json, fields, success, warn
from iotauth.errors import PkiError

ROOT_KEY_HELP = (
    "The root key: the encrypted file 'init --offline-root' exported (its passphrase from "
    "$IOTAUTH_ROOT_PASSPHRASE or --root-passphrase-file), or a pkcs11:/file: key URI. "
    "[default: [ca] root_key_uri, unless the root is offline]"
)


def _root_key(ctx: CliContext, given: str | None) -> str:
    if given is not None:
        return given
    uri = ctx.settings().ca.root_key_uri
    if uri == "offline":
        raise PkiError("the root of this home is offline: pass --root-key FILE (what 'init --offline-root' exported)")
    return uri


@click.group()
def ceremony() -> None:
    """Root ceremonies: sign a new issuing CA (a rollover) or the root's CRL, with the offline root key."""


@ceremony.command("sign-issuing")
@click.option("--root-key", metavar="FILE|URI", help=ROOT_KEY_HELP)
@click.option("--root-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the exported root key's passphrase. [default: $IOTAUTH_ROOT_PASSPHRASE]")
@click.option("--issuing-key-uri", metavar="URI",
              help="pkcs11: URI of the new issuing key (created, or adopted). [default: a new ca/issuing.key]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def sign_issuing_command(ctx: CliContext, root_key: str | None, root_passphrase_file: Path | None,
                         issuing_key_uri: str | None, as_json: bool) -> None:
    """Sign a new issuing CA; the previous one stays trusted until it expires (restart brokers and serve)."""
    result = run(sign_issuing(ctx.home, _root_key(ctx, root_key), passphrase_file=root_passphrase_file,
                              issuing_key_uri=issuing_key_uri, actor=operator_actor(), registry=ctx.registry_url))
    if as_json:
        emit_json(asdict(result))
        return
    success(f"issuing CA {result.generation} in place; the previous one ({result.previous_serial}) stays trusted "
            f"until {result.previous_expires}")
    fields("Rollover", asdict(result))
    if result.crl_error:
        warn(f"CRL not republished: {result.crl_error}; run 'iotauth crl'")
    warn("restart 'iotauth broker' and 'iotauth serve' so they trust the new issuing CA")


@ceremony.command("crl")
@click.option("--root-key", metavar="FILE|URI", help=ROOT_KEY_HELP)
@click.option("--root-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the exported root key's passphrase. [default: $IOTAUTH_ROOT_PASSPHRASE]")
@click.option("--revoke", "revoke", multiple=True, metavar="SERIAL",
              help="Serial (hex) of a previous issuing CA to revoke (repeatable).")
@click.option("--reason", type=click.Choice(sorted(REVOCATION_REASONS)), default="superseded", show_default=True)
@click.option("--next-update-days", type=click.FloatRange(min=1), default=365.0, show_default=True,
              help="How long the root's CRL stays valid: sign the next one before then.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def crl_command(ctx: CliContext, root_key: str | None, root_passphrase_file: Path | None, revoke: tuple[str, ...],
                reason: str, next_update_days: float, as_json: bool) -> None:
    """Sign the root's CRL (the ARL): the issuing CAs the root has revoked, to ca/root-crl.pem and .der."""
    result = run(sign_arl(ctx.home, _root_key(ctx, root_key), passphrase_file=root_passphrase_file, revoke=revoke,
                          reason=reason, next_update=timedelta(days=next_update_days), actor=operator_actor(),
                          registry=ctx.registry_url))
    data = {**asdict(result), "path": str(result.path)}
    if as_json:
        emit_json(data)
        return
    success(f"root CRL #{result.number} with {len(result.revoked)} revoked issuing CA(s) written to {result.path}")


COMMANDS = (ceremony,)
