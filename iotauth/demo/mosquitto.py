"""The demo on Mosquitto: a managed export in the demo's directory, the real broker and its follower.

The same runners the test suite uses (:mod:`iotauth.testing`): ``mosquitto -c``
on the exported configuration, restarted if it exits (as systemd would), and
``iotauth mosquitto follow`` as its own process, as an operator would run them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from iotauth.authority import Authority
from iotauth.config import Home
from iotauth.errors import DemoFailed
from iotauth.export.managed.layout import export_managed
from iotauth.policy import PolicySet
from iotauth.testing import FollowerRunner, MosquittoRunner, free_port, mosquitto_binary


@dataclass
class ManagedMosquitto:
    mosquitto: MosquittoRunner
    follower: FollowerRunner

    @property
    def pid(self) -> int:
        return self.mosquitto.pid

    @classmethod
    async def start(cls, home: Home, authority: Authority, port: int) -> ManagedMosquitto:
        if mosquitto_binary() is None:
            raise DemoFailed("Mosquitto is not installed (Debian: apt-get install mosquitto)")
        root = home.root.parent
        if os.geteuid() == 0:  # Mosquitto started as root reads its files as 'mosquitto': let it reach them
            root.chmod(0o755)
        admin_port = free_port()
        policies = PolicySet.from_profiles(authority.settings.profiles.values())
        done = await export_managed(home, authority, policies, root / "mosquitto",
                                    device_bind=("127.0.0.1", port), admin_bind=("127.0.0.1", admin_port))
        runner = MosquittoRunner(done.files.config, [port, admin_port], root / "mosquitto.log", supervise=True)
        await asyncio.to_thread(runner.start)
        restart = f"sh -c 'kill -TERM \"$(cat {done.files.pid})\"'"
        follower = FollowerRunner(home.root, done.files.directory, "--restart-command", restart)
        try:
            await asyncio.to_thread(follower.start)
        except RuntimeError as exc:
            runner.stop()
            raise DemoFailed(str(exc)) from exc
        return cls(runner, follower)

    def stop(self) -> None:
        self.follower.stop()
        self.mosquitto.stop()
