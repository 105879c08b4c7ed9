"""``iotauth``: the operator command line (a thin layer over the library)."""

from __future__ import annotations

import os
import sys
import traceback

import click

from iotauth import __version__
from iotauth.cli import (
    audit,
    broker,
    ceremony,
    demo,
    devices,
    export,
    mosquitto,
    pki,
    provision,
    rabbitmq,
    rotation,
    serve,
    status,
)
from iotauth.cli.context import CliContext
from iotauth.cli.render import error
from iotauth.config import Home
from iotauth.errors import IotAuthError, ProfileMismatch, RegistryMissing
from iotauth.files import os_error_text


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="iotauth")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="IOTAUTH_HOME",
    help="State directory (CA, registry, iotauth.toml). Default: $IOTAUTH_HOME or ~/.local/share/iotauth.",
)
@click.option(
    "--registry",
    "registry_url",
    envvar="IOTAUTH_REGISTRY",
    help="Registry location. Default: registry.db in the home directory.",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, registry_url: str | None) -> None:
    """Per-device identities for IoT fleets: issue, provision, enforce, revoke."""
    ctx.obj = CliContext(Home.resolve(home), registry_url)


for command in (
    *pki.COMMANDS,
    *ceremony.COMMANDS,
    *devices.COMMANDS,
    *status.COMMANDS,
    audit.audit,
    *provision.COMMANDS,
    *broker.COMMANDS,
    *serve.COMMANDS,
    *rotation.COMMANDS,
    *export.COMMANDS,
    *mosquitto.COMMANDS,
    *demo.COMMANDS,
):
    cli.add_command(command)
export.export.add_command(rabbitmq.export_rabbitmq)


def message_for(exc: IotAuthError) -> str:
    """The one line the CLI prints for a domain error; where a flag fixes it, the line names the flag."""
    if isinstance(exc, ProfileMismatch):
        return f"{exc}; issue with --profile {exc.profile}"
    if isinstance(exc, RegistryMissing):
        return f"{exc}; run 'iotauth init' or check --home"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point: domain errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        # Without standalone mode click returns (not raises) the code of ctx.exit() / Exit.
        returned = cli.main(args=argv, prog_name="iotauth", standalone_mode=False)
    except IotAuthError as exc:
        error(message_for(exc))
        return 1
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        error("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a file the command had to write or read: name it and the real cause (ENOSPC...)
        where = f"{exc.filename}: " if exc.filename else ""
        error(f"{where}{os_error_text(exc)}")
        return 74  # EX_IOERR
    except Exception as exc:  # the last line of defence: report, never dump
        if os.environ.get("IOTAUTH_DEBUG"):
            traceback.print_exc()
        error(f"internal error: {type(exc).__name__}: {exc} (set IOTAUTH_DEBUG=1 for details)")
        return 70
    return returned if isinstance(returned, int) else 0


if __name__ == "__main__":
    sys.exit(main())
