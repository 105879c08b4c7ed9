"""The demo's rotation step: an operator orders a renewal, the device renews over MQTT as it would in the field.

The parts are the real ones: ``iotauth renewer`` (its service, in the demo's
process, connected to the demo's broker with its own certificate),
``iotauth rotate`` run as its own process, and the reference device agent
(``python -m firmware_tools.agent --state DIR renew``) on the emulated
board's state directory, as firmware would run it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.errors import DemoFailed
from iotauth.registry import EventKind, Registry
from iotauth.rotation.service import RenewerOptions, RenewerService, ensure_identity
from iotauth.testing import CredentialFiles

ACTOR = "demo-renewer"
AGENT_TIMEOUT = 120.0


async def start_renewer(authority: Authority, home: Home, port: int) -> RenewerService:
    """``iotauth renewer``'s service on the demo's broker; returns once its subscription to requests is granted."""
    identity = await ensure_identity(authority, home, ACTOR)
    service = RenewerService(RenewerOptions(home, broker=("127.0.0.1", port)), authority, identity, ACTOR)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    return service


async def renewer_identity(authority: Authority, home: Home) -> str:
    """Issue the renewer's own identity now (a broker that must learn of it first can be waited for)."""
    return (await ensure_identity(authority, home, ACTOR)).device_id


async def order(home: Home, device_id: str) -> None:
    """``iotauth rotate DEVICE`` in its own process, as an operator runs it."""
    command = [sys.executable, "-m", "iotauth.cli.main", "--home", str(home.root), "rotate", device_id, "--json"]
    done = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, errors = await done.communicate()
    if done.returncode != 0 or device_id not in json.loads(out or b"{}").get("ordered", []):
        raise DemoFailed(f"'iotauth rotate' failed: {errors.decode().strip() or out.decode().strip()}")


async def run_agent(state: Path) -> str:
    """``python -m firmware_tools.agent --state DIR renew`` on a board's directory; the new serial."""
    command = [sys.executable, "-m", "firmware_tools.agent", "--state", str(state), "--timeout", "15", "renew"]
    done = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, errors = await asyncio.wait_for(done.communicate(), AGENT_TIMEOUT)
    except TimeoutError:
        done.kill()
        await done.wait()
        raise DemoFailed(f"the device agent did not finish within {AGENT_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        last = (errors.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise DemoFailed(f"the device agent failed: {last}")
    return str(json.loads(out)["serial"])


class OldIdentity:
    """A copy of a board's identity before it renews (key 0600, in a private temporary directory), to show
    that the broker refuses it afterwards; removed when the step ends."""

    def __init__(self, device_id: str, state: Path) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="iotauth-demo-old-"))
        for name in ("fullchain.pem", "ca.pem"):
            shutil.copyfile(state / name, self.directory / name)
        key = self.directory / "key.pem"
        key.touch(mode=0o600)
        key.write_bytes((state / "key.pem").read_bytes())
        self.files = CredentialFiles(device_id, self.directory / "fullchain.pem", key, self.directory / "ca.pem")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class RotationTrail:
    """The audit records of one renewal: issued (with its trigger), activated (and how), the old one revoked."""

    issued: int
    trigger: str
    activated: int
    via: str
    superseded: int

    def describe(self) -> str:
        return (f"audit #{self.issued} certificate.issued ({self.trigger}), #{self.activated} certificate.activated "
                f"(via {self.via}), #{self.superseded} certificate.revoked (superseded)")


async def trail(registry: Registry, device_id: str, after: int, serial: str) -> RotationTrail:
    """The renewal's audit records; :class:`DemoFailed` if one is missing."""
    found: dict[str, tuple[int, dict[str, object]]] = {}
    for event in await registry.events(after_id=after, device_id=device_id):
        data = dict(event.data)
        if event.kind == EventKind.CERTIFICATE_ISSUED and data.get("serial") == serial:
            found["issued"] = (event.id, data)
        elif event.kind == EventKind.CERTIFICATE_ACTIVATED and data.get("serial") == serial:
            found["activated"] = (event.id, data)
        elif event.kind == EventKind.CERTIFICATE_REVOKED and data.get("superseded_by") == serial:
            found["superseded"] = (event.id, data)
    missing = {"issued", "activated", "superseded"} - found.keys()
    if missing:
        raise DemoFailed(f"the audit log lacks the renewal's {', '.join(sorted(missing))} record")
    return RotationTrail(found["issued"][0], str(found["issued"][1].get("trigger", "?")), found["activated"][0],
                         str(found["activated"][1].get("via", "?")), found["superseded"][0])
