"""``iotauth demo``: the full lifecycle on emulated devices (the README's first command)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Group
from rich.live import Live

from iotauth.cli.render import LiveView, emit_json, err, line, mark, table, text_block
from iotauth.config import Home
from iotauth.errors import ConfigError

if TYPE_CHECKING:  # the demo pulls in the broker, paho and the station: load it only when it runs
    from iotauth.demo import DemoRun


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run in this (new or empty) directory. [default: a fresh temporary directory]",
)
@click.option("--devices", type=click.IntRange(3, 16), default=3, show_default=True, help="Emulated devices.")
@click.option("--keep", is_flag=True, help="Leave the home directory and the broker running until Ctrl-C.")
@click.option(
    "--rabbitmq",
    is_flag=True,
    help="The same lifecycle on a 3-node RabbitMQ cluster authorised by iotauth (needs rabbitmq-server).",
)
@click.option(
    "--mosquitto",
    is_flag=True,
    help="The same lifecycle on a managed Mosquitto kept in step by 'iotauth mosquitto follow' (needs mosquitto).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the step results as JSON.")
def demo(directory: Path | None, devices: int, keep: bool, rabbitmq: bool, mosquitto: bool, as_json: bool) -> None:
    """Run the whole lifecycle: CA, serial provisioning, mTLS broker, rotation over MQTT, live revocation.

    Exits non-zero if any step does not behave as described, so it doubles as a smoke test.
    The demo never touches your own iotauth home.
    """
    if rabbitmq and mosquitto:
        raise click.UsageError("choose one broker: --rabbitmq or --mosquitto")
    temporary = directory is None
    root = Path(tempfile.mkdtemp(prefix="iotauth-demo-")) if directory is None else directory.absolute()
    if root.exists() and any(root.iterdir()) and not temporary:
        raise ConfigError(f"{root} is not empty; give 'iotauth demo --dir' a new or empty directory")
    home = Home(root / "home")
    logging.getLogger("iotauth").setLevel(logging.ERROR)  # the steps report what matters; kicks are expected
    view = LiveView()
    run = asyncio.run(_run(home, devices, keep, view, quiet=as_json, rabbitmq=rabbitmq, mosquitto=mosquitto))
    if as_json:
        emit_json(
            {
                "ok": run.ok,
                "home": str(run.home),
                "facts": run.facts,
                "steps": [
                    {"name": s.name, "ok": s.ok, "detail": s.detail, "seconds": round(s.seconds, 3)} for s in run.steps
                ],
            }
        )
    else:
        _summary(run)
    if run.ok and temporary and not keep:
        shutil.rmtree(root, ignore_errors=True)
        if not as_json:
            line("the temporary home was removed; use --keep or --dir DIR to explore it", stderr=True)
    elif not run.ok:
        line(f"the demo's files are kept for inspection in {root}", stderr=True)
    if not run.ok:
        raise click.exceptions.Exit(1)


async def _run(
    home: Home, devices: int, keep: bool, view: LiveView, *, quiet: bool, rabbitmq: bool, mosquitto: bool
) -> DemoRun:
    from iotauth.demo import StepResult, run_demo
    from iotauth.demo.mosquitto import run_mosquitto_demo
    from iotauth.demo.rabbitmq import run_rabbitmq_demo

    stop = asyncio.Event() if keep else None
    live = Live(get_renderable=lambda: Group(view.render()), console=err, refresh_per_second=8, transient=True)
    provisioning = {"active": False}

    def on_step(step: StepResult) -> None:
        if provisioning["active"]:
            live.stop()
            provisioning["active"] = False
        if not quiet:
            mark(step.ok, step.name, aside=f"({step.seconds:.2f} s)", detail=step.detail)
        if keep and step.name == "audit log verifies" and step.ok:
            if rabbitmq:
                text_block("\nThe cluster keeps running (Ctrl-C to stop); its MQTTS ports are listed above.")
            else:
                _explain_keep(home)

    def on_progress(update: object) -> None:
        if not provisioning["active"] and not quiet:
            live.start()
            provisioning["active"] = True
        view.update(update)  # type: ignore[arg-type]

    loop = asyncio.get_running_loop()
    if stop is not None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    try:
        if rabbitmq:
            return await run_rabbitmq_demo(home, home.root.parent, devices=devices, on_step=on_step,
                                           on_progress=on_progress, keep=stop)
        if mosquitto:
            return await run_mosquitto_demo(home, devices=devices, on_step=on_step, on_progress=on_progress,
                                            keep=stop)
        return await run_demo(home, devices=devices, on_step=on_step, on_progress=on_progress, keep=stop)
    finally:
        if provisioning["active"]:
            live.stop()
        if stop is not None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)


def _explain_keep(home: Home) -> None:
    text_block(
        f"\nThe broker keeps running (Ctrl-C to stop). Explore with:\n"
        f"  export IOTAUTH_HOME={home.root}\n"
        f"  iotauth devices list; iotauth audit\n"
        f"  mosquitto_sub -h localhost -p $(grep '^port' {home.config_file} | cut -d= -f2 | tr -d ' ') "
        f"--cafile {home.root_cert} --cert {home.root / 'operator/ingest.crt'} "
        f"--key {home.root / 'operator/ingest.key'} -i ops-ingest -t 'devices/+/telemetry/#' -v\n",
    )


def _summary(run: DemoRun) -> None:
    table(
        "iotauth demo: " + ("every step behaved as described" if run.ok else "FAILED"),
        ["step", "result", "seconds", "detail"],
        [(s.name, "ok" if s.ok else "FAILED", f"{s.seconds:.2f}", s.detail) for s in run.steps],
    )
    total = sum(s.seconds for s in run.steps)
    line(f"total {total:.1f} s")


COMMANDS = (demo,)
