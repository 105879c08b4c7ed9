"""A RabbitMQ cluster authorised by iotauth, set up the way an operator does it, as processes.

For an initialised home with ``[rabbitmq] enabled``:

1. ``iotauth serve`` (TLS) on loopback;
2. ``iotauth export rabbitmq`` (``--user rabbitmq`` when run as root: the nodes
   run as that account, as Debian's package does, so the key hand-over and
   the export's permission check are real);
3. three nodes from the exported files (:mod:`iotauth.testbed.rabbitmq_cluster`);
4. ``iotauth export rabbitmq --watch``, the follower that rewrites the CRL and
   kicks revoked devices through every node's management API.

``iotauth demo --rabbitmq``, the test suite's session fixture and
``benchmarks/cluster_auth.py`` all use it, so they exercise the same commands.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from iotauth.config import Home
from iotauth.errors import ConfigError
from iotauth.rabbitmq import ADMIN_USER
from iotauth.testbed.rabbitmq_cluster import RabbitCluster, rabbitmq_available
from iotauth.testing import end_process, free_port

IOTAUTH = [sys.executable, "-m", "iotauth.cli.main"]
FOLLOWING = "following the registry from event"


def node_account() -> str:
    """'rabbitmq' when we are root and it exists (as the package runs it), else ourselves."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam("rabbitmq").pw_name
    return pwd.getpwuid(os.geteuid()).pw_name


class Follower:
    """``iotauth export rabbitmq --watch`` as a process, its output in a file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, metrics_port: int | None = None) -> None:
        self.process = process
        self.log = log
        self.metrics_port = metrics_port
        """Where its Prometheus metrics are served (``http://127.0.0.1:PORT/metrics``)."""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise ConfigError(f"the follower exited ({self.process.returncode}): {self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise ConfigError(f"no {text!r} from the follower: {self.output()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        end_process(self.process)


class RabbitDeployment:
    """serve, the export, a 3-node cluster and the follower for ``home``; files and logs under ``work``.

    ``work`` must be searchable by the nodes' account (mode 0755 when they run as ``rabbitmq``).
    """

    def __init__(self, home: Home, work: Path, *, nodes: int = 3) -> None:
        self.home = home
        self.work = work
        self.account = node_account()
        self.port = free_port()
        self.serve_url = f"https://127.0.0.1:{self.port}"
        self.export_dir = work / "rabbitmq"
        (work / "cluster").mkdir(parents=True, exist_ok=True)
        self.cluster = RabbitCluster(self.export_dir, nodes, base_dir=work / "cluster",
                                     run_as=self.account if os.geteuid() == 0 else None)
        self.serve: subprocess.Popen[bytes] | None = None
        self.follower: Follower | None = None
        self.timings: dict[str, float] = {}

    def iotauth(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run an ``iotauth`` command on this home (a separate process, like an operator's shell)."""
        result = subprocess.run([*IOTAUTH, "--home", str(self.home.root), *args], capture_output=True, text=True,  # noqa: S603
                                timeout=timeout, env={**os.environ, **(env or {})}, check=False)
        if check and result.returncode != 0:
            raise ConfigError(f"iotauth {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def start(self) -> RabbitDeployment:
        """Everything, in the operator's order; on failure everything started so far is stopped."""
        if not rabbitmq_available():
            raise ConfigError("RabbitMQ is not installed: apt-get install rabbitmq-server")
        started = time.monotonic()
        try:
            self.serve = self._serve()
            self.iotauth("export", "rabbitmq", "--out", str(self.export_dir), "--serve-url", self.serve_url,
                         "--user", self.account)
            cluster_started = time.monotonic()
            self.cluster.start()
            self.timings["cluster_start_s"] = round(time.monotonic() - cluster_started, 2)
            self.follower = self.start_follower()
        except BaseException:
            self.stop()
            raise
        self.timings["setup_s"] = round(time.monotonic() - started, 2)
        return self

    def _serve(self) -> subprocess.Popen[bytes]:
        log = self.work / "serve.log"
        process = subprocess.Popen(  # noqa: S603 - this interpreter, our own arguments
            [*IOTAUTH, "--home", str(self.home.root), "serve", "--bind", f"127.0.0.1:{self.port}", "-v"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115 - the child keeps it
        )
        context = ssl.create_default_context(cafile=str(self.home.chain_file))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"iotauth serve exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.serve_url}/healthz", verify=context, timeout=2).status_code == 200:
                    return process
            time.sleep(0.1)
        process.kill()
        raise ConfigError("iotauth serve did not start")

    def stop_serve(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.serve.wait(10)

    def restart_serve(self) -> None:
        """serve again on the same address (RabbitMQ's auth_http paths name it)."""
        self.stop_serve()
        self.serve = self._serve()

    def start_follower(self, env: dict[str, str] | None = None, wait: bool = True) -> Follower:
        """``iotauth export rabbitmq --watch`` kicking through every node; ``wait``: until it follows."""
        log = self.work / f"follower-{time.monotonic_ns()}.log"
        urls = [arg for url in self.cluster.management_urls() for arg in ("--management-url", url)]
        metrics_port = free_port()
        process = subprocess.Popen(  # noqa: S603 - this interpreter, our own arguments
            [*IOTAUTH, "--home", str(self.home.root), "export", "rabbitmq", "--out", str(self.export_dir),
             "--serve-url", self.serve_url, "--user", self.account, "--watch", *urls,
             "--metrics-bind", str(metrics_port)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},  # noqa: SIM115
        )
        follower = Follower(process, log, metrics_port)
        if wait:
            follower.wait_for(FOLLOWING)
        return follower

    def management(self, node: int = 0) -> httpx.Client:
        """The management API of one node, as iotauth's management identity."""
        secret = self.home.rabbitmq_admin_secret.read_text().strip()
        return httpx.Client(base_url=self.cluster.nodes[node].management_url, auth=(ADMIN_USER, secret), timeout=10)

    def connections(self, username: str, node: int = 0) -> int:
        """How many connections ``username`` has anywhere in the cluster (connection tracking: no stats lag)."""
        with self.management(node) as api:
            answer = api.get(f"/api/connections/username/{username}")
            answer.raise_for_status()
            return len(answer.json())

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.cluster.stop()
        self.stop_serve()
