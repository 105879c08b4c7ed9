"""``iotauth demo --mosquitto``: the same lifecycle on a managed Mosquitto.

The steps of :mod:`iotauth.demo.lifecycle` with Mosquitto in the broker's
place: ``iotauth export mosquitto --managed`` into the demo's directory, the
real ``mosquitto`` on it (restarted if it exits, as systemd would) and
``iotauth mosquitto follow`` as its own process, through the runners the test
suite uses (:mod:`iotauth.testing`). What differs, and is checked as such:

* Mosquitto drops a publish outside a device's rights without a word to
  iotauth's log, so the cross-topic step checks that it was never delivered;
* revocation: the follower publishes a CRL, proves it loaded with a canary,
  then kicks the session (its ``mosquitto.session.kicked`` record says so);
  the reconnect is refused at the TLS handshake;
* rotation: Mosquitto never asks iotauth about a connect, so the device's
  confirmation is what activates its renewal; the old certificate is then
  refused at the TLS handshake too. Identities issued during the run (the
  operator's, the renewer's) are used once the follower has synced them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from iotauth.config import Home
from iotauth.demo.lifecycle import WAIT, Demo, DemoRun, StepResult, run_steps
from iotauth.errors import ConnectRefused, DemoFailed
from iotauth.export.managed.layout import export_managed
from iotauth.policy import PolicySet
from iotauth.provisioning.results import Progress
from iotauth.registry import EventKind
from iotauth.testing import CredentialFiles, FollowerRunner, MosquittoRunner, MqttClient, free_port, mosquitto_binary


class MosquittoDemo(Demo):
    """The demo's steps against a managed Mosquitto and its follower."""

    def __init__(self, home: Home, devices: int, on_step: Callable[[StepResult], None],
                 on_progress: Callable[[Progress], None]) -> None:
        super().__init__(home, devices, on_step, on_progress)
        self.mosquitto: MosquittoRunner | None = None
        self.follower: FollowerRunner | None = None

    async def start_broker(self) -> None:
        assert self.authority is not None
        async with self.step("start Mosquitto under iotauth's control (managed) and its follower") as note:
            if mosquitto_binary() is None:
                raise DemoFailed("Mosquitto is not installed (Debian: apt-get install mosquitto)")
            root = self.home.root.parent
            if os.geteuid() == 0:  # Mosquitto started as root reads its files as 'mosquitto': let it reach them
                await asyncio.to_thread(root.chmod, 0o755)
            admin_port = free_port()
            policies = PolicySet.from_profiles(self.authority.settings.profiles.values())
            done = await export_managed(self.home, self.authority, policies, root / "mosquitto",
                                        device_bind=("127.0.0.1", self.port), admin_bind=("127.0.0.1", admin_port))
            self.mosquitto = MosquittoRunner(done.files.config, [self.port, admin_port], root / "mosquitto.log",
                                             supervise=True)
            await asyncio.to_thread(self.mosquitto.start)
            restart = f"sh -c 'kill -TERM \"$(cat {done.files.pid})\"'"
            self.follower = FollowerRunner(self.home.root, done.files.directory, "--restart-command", restart)
            try:
                await asyncio.to_thread(self.follower.start)
            except RuntimeError as exc:
                raise DemoFailed(str(exc)) from exc
            note.append(f"127.0.0.1:{self.port}, dynamic-security plugin kept in step by 'iotauth mosquitto follow' "
                        f"(Mosquitto pid {self.mosquitto.pid})")
            self.run.facts["broker"] = f"mosquitto 127.0.0.1:{self.port}"

    async def identity_ready(self, device_id: str, after: int) -> None:
        """An identity issued now (the operator's, the renewer's): the follower gives it its client and role first."""
        assert self.registry is not None
        deadline = asyncio.get_running_loop().time() + WAIT
        while asyncio.get_running_loop().time() < deadline:
            events = await self.registry.events(after_id=after, device_id=device_id)
            if any(e.kind == EventKind.MOSQUITTO_DEVICE_SYNCED for e in events):
                return
            await asyncio.sleep(0.05)
        raise DemoFailed(f"the follower did not sync {device_id} within {WAIT:.0f} s")

    async def refusal_evidence(self, attacker: str) -> str:
        return "Mosquitto's dynamic-security ACL dropped it"

    async def supersession_enforced(self, device_id: str, after: int) -> str:
        """The follower's CRL refuses the superseded certificate (proven), then its kick: its record says so."""
        assert self.registry is not None
        deadline = asyncio.get_running_loop().time() + WAIT
        while asyncio.get_running_loop().time() < deadline:
            for event in await self.registry.events(after_id=after, device_id=device_id):
                if event.kind == EventKind.MOSQUITTO_SESSION_KICKED and event.data.get("crl_proven"):
                    return f" (CRL proven in force, then the old sessions kicked: audit #{event.id})"
            await asyncio.sleep(0.05)
        raise DemoFailed(f"the follower did not enforce {device_id}'s renewal within {WAIT:.0f} s")

    async def revocation_evidence(self, target: str) -> str:
        kicked = await self._wait_for_event(EventKind.MOSQUITTO_SESSION_KICKED, target)
        return f" (CRL proven in force before the kick: audit event #{kicked})"

    async def refusal_of(self, files: CredentialFiles, port: int) -> str:
        """Mosquitto refuses a certificate its CRL lists in the TLS handshake, before any CONNACK."""
        client = MqttClient(port, files)
        self.clients.append(client)
        try:
            await asyncio.to_thread(client.connect, WAIT)
        except ConnectRefused as exc:
            return "refused at the TLS handshake" if exc.code is None else f"CONNACK {exc.code}"
        raise DemoFailed(f"{files.device_id} connected with credentials that must be refused")

    async def close(self) -> None:
        await super().close()
        for runner in (self.follower, self.mosquitto):
            if runner is not None:
                await asyncio.to_thread(runner.stop)


async def run_mosquitto_demo(
    home: Home,
    *,
    devices: int = 3,
    on_step: Callable[[StepResult], None] = lambda _step: None,
    on_progress: Callable[[Progress], None] = lambda _progress: None,
    keep: asyncio.Event | None = None,
) -> DemoRun:
    """Every step on a managed Mosquitto; stop at the first failure."""
    return await run_steps(MosquittoDemo(home, devices, on_step, on_progress), keep)
