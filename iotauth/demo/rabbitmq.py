"""``iotauth demo --rabbitmq``: the same lifecycle on a 3-node RabbitMQ cluster authorised by iotauth.

The steps of :mod:`iotauth.demo.lifecycle` with RabbitMQ in the broker's place:
a home made for RabbitMQ (device ids without ``.``), the boards provisioned
over serial as before, then :class:`~iotauth.testbed.rabbitmq.RabbitDeployment`
(``iotauth serve``, ``iotauth export rabbitmq``, three nodes, and the
follower). Devices spread over the nodes and the operator reads on the third,
so every message crosses the cluster. What differs, and is checked as such:

* RabbitMQ 3.10 answers a refused PUBLISH by closing the connection (it has
  no per-message refusal in MQTT 3.1.1), so the cross-topic step checks that
  the connection was closed and the message never delivered;
* revocation: the follower rewrites the CRL, then kicks the device through
  the management API; the reconnect is refused at the TLS handshake
  (``certificate revoked``), and the kick is in the audit log.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from iotauth.authority import open_authority
from iotauth.bootstrap import initialise_home
from iotauth.broker.mqtt import Connect, encode_connect
from iotauth.config import Home
from iotauth.demo.lifecycle import TRUST_DOMAIN, WAIT, Demo, DemoRun, StepResult, connect, run_steps
from iotauth.errors import DemoFailed
from iotauth.provisioning.results import Progress
from iotauth.registry import EventKind, open_registry
from iotauth.testbed.rabbitmq import RabbitDeployment
from iotauth.testing import MqttClient


class RabbitDemo(Demo):
    """The demo's steps against a RabbitMQ cluster; ``deployment``: one already running for ``home``."""

    def __init__(self, home: Home, work: Path, devices: int, on_step: Callable[[StepResult], None],
                 on_progress: Callable[[Progress], None], deployment: RabbitDeployment | None = None) -> None:
        super().__init__(home, devices, on_step, on_progress)
        self.work = work
        self.deployment = deployment
        self.own_deployment = deployment is None

    def nodes(self) -> RabbitDeployment:
        if self.deployment is None:
            raise DemoFailed("the RabbitMQ cluster is not running")
        return self.deployment

    def device_port(self, index: int) -> int:
        return self.nodes().cluster.nodes[index % 2].mqtt_port  # nodes 1 and 2; the operator is on node 3

    def operator_port(self) -> int:
        return self.nodes().cluster.nodes[-1].mqtt_port

    async def initialise(self) -> None:
        async with self.step("initialise the CA and registry for RabbitMQ") as note:
            if self.own_deployment:
                await initialise_home(self.home, TRUST_DOMAIN, ["localhost", "127.0.0.1"], passphrase=None,
                                      rabbitmq=True, actor="demo")
            self.registry = await open_registry(self.home.registry_db)
            self.authority = await open_authority(self.home, self.registry)
            if not self.authority.settings.rabbitmq.enabled:
                raise DemoFailed(f"{self.home.config_file} does not enable [rabbitmq]")
            note.append("[rabbitmq] enabled: device ids use A-Z a-z 0-9 _ - ('.' is a level break in RabbitMQ)")

    async def start_broker(self) -> None:
        async with self.step("start a 3-node RabbitMQ cluster authorised by iotauth serve") as note:
            if self.deployment is None:
                self.deployment = RabbitDeployment(self.home, self.work)
                await asyncio.to_thread(self.deployment.start)
            cluster = self.nodes().cluster
            ports = ", ".join(str(node.mqtt_port) for node in cluster.nodes)
            note.append(f"MQTTS on 127.0.0.1:{ports}; serve at {self.nodes().serve_url}; the follower kicks "
                        f"through every node's management API ({self.nodes().timings.get('cluster_start_s', 0):.0f} s"
                        " to form)")
            self.run.facts["rabbitmq_nodes"] = [node.name for node in cluster.nodes]

    foreign_publish_qos = 0  # RabbitMQ closes the connection instead of acknowledging
    rotates = False  # renewal over MQTT is run end to end on iotauth broker and managed Mosquitto (tests/rotation)

    async def sender_after_refusal(self, attacker: str, client: MqttClient) -> MqttClient:
        """RabbitMQ 3.10 answers a refused PUBLISH by closing the connection; the device reconnects."""
        try:
            await asyncio.to_thread(client.wait_disconnected, WAIT)
        except TimeoutError:
            raise DemoFailed(f"{attacker} is still connected after publishing to another device's topic") from None
        again = self.boards[0].client(attacker, self.device_port(0))
        self.clients.append(again)
        if not await connect(again):
            raise DemoFailed(f"{attacker} could not reconnect: {again.connack_reason}")
        return again

    async def refusal_evidence(self, attacker: str) -> str:
        return "RabbitMQ closed the connection (serve answered deny)"

    def revocation_step(self, target: str) -> str:
        node = (len(self.device_ids) - 1) % 2 + 1
        return f"the operator revokes {target}: live session on node {node} dropped, reconnect refused"

    async def revocation_evidence(self, target: str) -> str:
        kicked = await self._wait_for_event(EventKind.RABBITMQ_SESSION_KICKED, target)
        return f" (kicked through the management API: audit event #{kicked})"

    async def reconnect_refusal(self, target: str) -> str:
        return await asyncio.to_thread(self._reconnect_refusal, len(self.device_ids) - 1, target)

    def _reconnect_refusal(self, index: int, device_id: str) -> str:
        """How the revoked device's reconnect (its own files, a raw TLS socket) was refused; raises if it got in."""
        state = self.boards[index].emulator.state
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        context.load_cert_chain(str(state / "fullchain.pem"), str(state / "key.pem"))
        try:
            with socket.create_connection(("127.0.0.1", self.device_port(index)), timeout=WAIT) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(encode_connect(Connect(device_id, True, 30)))
                answer = tls.recv(4)
        except ssl.SSLError as exc:
            return f"refused at the TLS handshake ({exc.reason}: the CRL lists the certificate)"
        except OSError as exc:
            return f"connection closed ({type(exc).__name__})"
        if len(answer) == 4 and answer[0] == 0x20 and answer[3] != 0:
            return f"CONNACK {answer[3]}"
        if not answer:
            return "connection closed before CONNACK"
        raise DemoFailed(f"{device_id} reconnected after revocation")

    async def close(self) -> None:
        await super().close()
        if self.own_deployment and self.deployment is not None:
            await asyncio.to_thread(self.deployment.stop)


async def run_rabbitmq_demo(
    home: Home,
    work: Path,
    *,
    devices: int = 3,
    on_step: Callable[[StepResult], None] = lambda _step: None,
    on_progress: Callable[[Progress], None] = lambda _progress: None,
    keep: asyncio.Event | None = None,
    deployment: RabbitDeployment | None = None,
) -> DemoRun:
    """Every step on RabbitMQ; stop at the first failure. ``deployment``: use a running one for ``home``."""
    if deployment is None and os.geteuid() == 0:
        await asyncio.to_thread(work.chmod, 0o755)  # the nodes run as 'rabbitmq' and read the export under it
    return await run_steps(RabbitDemo(home, work, devices, on_step, on_progress, deployment), keep)
