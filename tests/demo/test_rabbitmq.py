"""``iotauth demo --rabbitmq``'s steps, run on the session's RabbitMQ cluster (one cluster per test session).

The demo sets up the same deployment itself (:class:`iotauth.testbed.rabbitmq.RabbitDeployment`,
as the fixture does); here its lifecycle runs against the fixture's: real boards
provisioned over serial into the fixture's home, devices on nodes 1 and 2, the
operator on node 3, a refused cross-topic publish, a revocation that drops the
live session and whose reconnect TLS refuses.
"""

from __future__ import annotations

import asyncio

from iotauth.demo.rabbitmq import run_rabbitmq_demo
from tests.fixtures.rabbitmq import RabbitDeployment

EXPECTED_STEPS = [
    "initialise the CA and registry for RabbitMQ",
    "start 3 emulated devices on pseudo-terminals",
    "provision them in parallel over serial",
    "start a 3-node RabbitMQ cluster authorised by iotauth serve",
    "each device publishes telemetry with its own certificate",
    "a device publishing to another device's topic is refused",
    "the operator revokes sensor-DEMO-0003: live session on node 1 dropped, reconnect refused",
    "audit log verifies",
]


def test_the_demo_lifecycle_runs_on_the_rabbitmq_cluster(rabbit: RabbitDeployment) -> None:
    run = asyncio.run(run_rabbitmq_demo(rabbit.home, rabbit.work, deployment=rabbit))
    assert [(step.name, step.ok) for step in run.steps] == [(name, True) for name in EXPECTED_STEPS], run.steps
    revoked = run.steps[-2].detail
    assert "CERTIFICATE_REVOKED" in revoked and "kicked through the management API: audit event #" in revoked
    assert run.facts["revocation_to_disconnect_ms"] < 15_000  # generous: benchmarks/cluster_auth.py measures it
    assert rabbit.connections("sensor-DEMO-0003") == 0
