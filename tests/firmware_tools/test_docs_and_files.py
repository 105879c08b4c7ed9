"""The files a provisioned emulator holds are the files the docs name: README, the emulator, the example client."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import firmware_tools.emulator as emulator_module
from firmware_tools.emulator import Flash
from iotauth.provisioning.station import Station
from tests.fixtures.devices import EmulatorFactory

REPO = Path(__file__).resolve().parents[2]
FILE_NAME = re.compile(r"`+([\w.-]+\.(?:pem|json|key|crt|der))`+")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start: end if end > 0 else len(text)]


def test_the_docs_name_exactly_the_emulators_exports() -> None:
    exports = set(Flash.EXPORTS)
    docstring = emulator_module.__doc__ or ""
    assert set(FILE_NAME.findall(docstring)) == exports
    readme = _section((REPO / "README.md").read_text(), "## For the firmware developer")
    named = set(FILE_NAME.findall(readme)) - {"frames.json", "messages.json", "objects.json", "behaviour.json"}
    assert named == exports, f"README names {sorted(named)}, the emulator writes {sorted(exports)}"
    sensor = (REPO / "examples" / "sensor.py").read_text()
    assert set(re.findall(r'"([\w.-]+\.(?:pem|json))"', sensor)) <= exports


async def test_a_provisioned_emulator_holds_every_documented_file(
        emulator: EmulatorFactory, station_factory: Callable[..., Station]) -> None:
    board = emulator()
    assert (await station_factory().provision(board.port)).ok
    present = {p.name for p in board.state.iterdir()}
    assert set(Flash.EXPORTS) <= present, sorted(set(Flash.EXPORTS) - present)
