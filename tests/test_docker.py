"""docker/: what can be checked without a Docker engine (none runs on CI machines).

The Dockerfile's sources exist, the entrypoint is valid shell, every iotauth
command the image or compose file runs exists with the options they pass, and
the compose services use the image the Dockerfile builds.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures import iotauth_executable

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IOTAUTH = iotauth_executable()


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def help_text(*subcommand: str) -> str:
    result = subprocess.run([IOTAUTH, *subcommand, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"iotauth {' '.join(subcommand)} does not exist: {result.stderr}"
    return result.stdout


def assert_command_exists(argv: list[str]) -> None:
    """``argv`` is an iotauth command line: its subcommand and each --option must be known."""
    subcommand = argv[0]
    options = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
    text = help_text(subcommand)
    for option in options:
        assert re.search(rf"(^|\s){re.escape(option)}[\s,=]", text), f"'iotauth {subcommand}' has no {option}"


def test_copied_sources_exist() -> None:
    copies = [args for kind, args in dockerfile_instructions() if kind == "COPY"]
    assert copies
    for args in copies:
        for source in shlex.split(args)[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_image_runs_as_non_root_with_a_state_volume() -> None:
    instructions = dict(dockerfile_instructions())
    assert instructions["USER"].strip() not in ("root", "0")
    assert "/var/lib/iotauth" in instructions["VOLUME"]
    assert "IOTAUTH_HOME=/var/lib/iotauth" in instructions["ENV"].replace(" ", "")


def test_entrypoint_is_valid_shell_and_its_commands_exist() -> None:
    script = DOCKER / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "iotauth init" in text and "--trust-domain" in text and "--server-name" in text
    assert_command_exists(["init", "--trust-domain", "--server-name"])
    instructions = dict(dockerfile_instructions())
    assert "iotauth-entrypoint" in instructions["ENTRYPOINT"]
    assert_command_exists(__import__("json").loads(instructions["CMD"]))


@pytest.fixture(scope="module")
def compose() -> dict[str, object]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_use_the_built_image(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict) and {"broker", "station"} <= set(services)
    built = [s for s in services.values() if "build" in s]
    assert len(built) == 1 and built[0]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / built[0]["build"]["context"] / built[0]["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    image = built[0]["image"]
    assert all(service["image"] == image for service in services.values())


def test_compose_commands_exist(compose: dict[str, object]) -> None:
    services = compose["services"]
    assert isinstance(services, dict)
    for service in services.values():
        assert_command_exists(service["command"])


def test_station_gets_serial_devices_and_shares_the_home(compose: dict[str, object]) -> None:
    station = compose["services"]["station"]  # type: ignore[index]
    assert all(device.startswith("/dev/tty") for device in station["devices"])
    assert "dialout" in station["group_add"]
    broker_volumes = compose["services"]["broker"]["volumes"]  # type: ignore[index]
    assert station["volumes"] == broker_volumes
