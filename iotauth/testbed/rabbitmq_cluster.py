"""A throw-away RabbitMQ cluster on loopback, run from what ``iotauth export rabbitmq`` wrote.

Shared by the test suite (one cluster per session), ``iotauth demo --rabbitmq``
and ``benchmarks/cluster_auth.py``, so all three run the exported
configuration itself, unchanged, in the layout the README recommends: each
node reads the directory named by ``RABBITMQ_CONFIG_FILES`` (RabbitMQ 3.10
loads every ``*.conf`` in it, in name order, a later key overriding an
earlier one), holding ``10-iotauth.conf``, a link to the exported
``rabbitmq.conf``, and ``20-node.conf`` with the node's own lines (listener
ports, cluster peer discovery, logs); ``advanced.config`` and
``enabled_plugins`` are the exported files.

How the nodes are run (measured on Debian 12's ``rabbitmq-server`` 3.10.8):

* ``/usr/lib/rabbitmq/bin/rabbitmq-server`` directly, not the ``/usr/sbin``
  wrappers (they ``su rabbitmq`` and reset ``HOME``, losing the cookie);
* everything under one temporary directory: a shared Erlang cookie, an empty
  ``rabbitmq-env.conf`` (the host's is ignored), and per node its own name,
  ports, ``RABBITMQ_MNESIA_BASE`` and log directory;
* our own ``epmd`` on a private port, bound to loopback, as a child process
  (an ``epmd`` started by ``erl`` daemonises and outlives the test run);
* ports picked at random *below* the kernel's ephemeral range, so no outgoing
  connection can take a node's port between picking and binding it;
* the seed node starts first; the others start once its database is up and
  join it through classic-config peer discovery (starting all three at once
  crashed the seed with ``incompatible_feature_flags``);
* RabbitMQ 3.10's MQTT client-id Raft cluster sometimes misses a member when
  two nodes join at once (its ``ra:add_member`` failure is ignored):
  :meth:`RabbitCluster.wait_cluster` checks the membership on every node and
  adds a missing member itself.

Stopping is ``SIGKILL`` of each node's process group (0.05 s; a graceful stop
takes ~6 s and the data directory is thrown away anyway).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBIT_BIN / "rabbitmq-server"
CTL = RABBIT_BIN / "rabbitmqctl"
BOOT_TIMEOUT = 120.0


def rabbitmq_available() -> bool:
    """Whether Debian's ``rabbitmq-server`` (and Erlang's ``epmd``) are installed here."""
    return SERVER.exists() and CTL.exists() and _epmd() is not None


def _epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
    return str(candidates[-1]) if candidates else None


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int, low: int = 20000) -> list[int]:
    """``count`` distinct ports free right now, below the ephemeral range (see the module docstring)."""
    high = min(_ephemeral_floor(), 32768) - 1
    rng = random.SystemRandom()
    picked: list[int] = []
    while len(picked) < count:
        port = rng.randrange(low, high)
        if port in picked:
            continue
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - the check RabbitMQ's own listeners will make
            picked.append(port)
    return picked


def port_open(port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout):
        return True
    return False


@dataclass
class RabbitNode:
    index: int
    short: str
    directory: Path
    mqtt_port: int
    management_port: int
    dist_port: int
    process: subprocess.Popen[bytes] | None = None
    log_mark: int = 0

    @property
    def name(self) -> str:
        return f"{self.short}@localhost"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def log_since_start(self) -> str:
        with contextlib.suppress(OSError), open(self.log_file, "rb") as log:
            log.seek(self.log_mark)
            return log.read().decode(errors="replace")
        return ""


class ClusterError(RuntimeError):
    """The cluster did not start or re-form; the message carries the nodes' log tails."""


class RabbitCluster:
    """``size`` RabbitMQ nodes on 127.0.0.1 forming one cluster, configured from ``config_dir``.

    Args:
        config_dir: the output of ``iotauth export rabbitmq`` (rabbitmq.conf,
            advanced.config, enabled_plugins).
        size: number of nodes (3: the MQTT plugin's Raft cluster keeps a
            quorum with one node down).
        base_dir: where node data and logs go (default: a new temporary
            directory, removed by :meth:`stop` unless a boot failed).
        run_as: run the nodes (and rabbitmqctl) as this account through
            ``runuser``, as a packaged RabbitMQ runs: the exported files must
            then be readable by it. ``None``: as the current user.
    """

    def __init__(self, config_dir: Path, size: int = 3, base_dir: Path | None = None, prefix: str = "rmq",
                 run_as: str | None = None) -> None:
        self.config_dir = config_dir.absolute()
        self.run_as = run_as
        self._own_base = base_dir is None
        self.base = base_dir or Path(tempfile.mkdtemp(prefix="iotauth-rabbitmq-"))
        self.home = self.base / "home"
        self.epmd_port = free_ports(1)[0]
        self.epmd: subprocess.Popen[bytes] | None = None
        ports = free_ports(3 * size)
        self.nodes = []
        for i in range(size):
            short = f"{prefix}-{chr(ord('a') + i)}"
            mqtt, management, dist = ports[3 * i: 3 * i + 3]
            self.nodes.append(RabbitNode(i, short, self.base / short, mqtt, management, dist))
        self.failed = False
        self.repairs: list[str] = []
        self.timings: dict[str, float] = {}

    # -- files and environment ---------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        })
        return env

    def _node_environment(self, node: RabbitNode) -> dict[str, str]:
        env = self._environment()
        env.update({
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.directory / "log"),
            "RABBITMQ_CONFIG_FILES": str(node.directory / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.config_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.config_dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(node.directory / "beam.pid"),
            # distribution on loopback only; never let erl start (and daemonise) an epmd of its own
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false",
        })
        return env

    def node_config(self, node: RabbitNode) -> str:
        """This node's own lines, read after the exported rabbitmq.conf (later keys win)."""
        lines = [
            f"# node {node.name} (iotauth.testbed); 10-iotauth.conf is iotauth's export",
            f"mqtt.listeners.ssl.default = 127.0.0.1:{node.mqtt_port}",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {node.management_port}",
            "log.file.level = info",
            "log.console = false",
            "cluster_formation.peer_discovery_backend = classic_config",
        ]
        if node.index > 0:
            # Joiners list only the seed: a blank node listing other blank nodes may join one of them before
            # that one joined the seed. The seed lists nobody, so it boots at once.
            lines += [
                f"cluster_formation.classic_config.nodes.1 = {self.nodes[0].name}",
                "cluster_formation.discovery_retry_limit = 240",
                "cluster_formation.discovery_retry_interval = 250",
            ]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
            cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")
        for node in self.nodes:
            (node.directory / "log").mkdir(parents=True, exist_ok=True)
            (node.directory / "mnesia").mkdir(parents=True, exist_ok=True)
            conf_d = node.directory / "conf.d"
            conf_d.mkdir(parents=True, exist_ok=True)
            exported = conf_d / "10-iotauth.conf"
            exported.unlink(missing_ok=True)
            exported.symlink_to(self.config_dir / "rabbitmq.conf")
            (conf_d / "20-node.conf").write_text(self.node_config(node))
        if self.run_as:
            subprocess.run(["chown", "-R", f"{self.run_as}:", str(self.base)], check=True)  # noqa: S603,S607
            self.base.chmod(0o755)

    def _command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """``argv`` as run by ``run_as`` (runuser keeps no environment: it is passed through env(1))."""
        if not self.run_as:
            return argv, env
        return ["runuser", "-u", self.run_as, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv], {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        }

    # -- processes ---------------------------------------------------------------------------

    def start(self) -> RabbitCluster:
        """Start every node and wait until they form one cluster (10-20 s on 2 busy cores)."""
        started = time.monotonic()
        atexit.register(self.kill)  # a crashed test run must not leave beam.smp or epmd behind
        try:
            self._write_files()
            self._start_epmd()
            self.start_node(0)
            self._wait_log(self.nodes[0], "Running boot step routing_ready")
            for node in self.nodes[1:]:
                self.start_node(node.index)
            for node in self.nodes:
                self.wait_node(node.index)
            self.wait_cluster()
        except BaseException:
            self.failed = True
            self.kill()
            raise
        self.timings["start_s"] = time.monotonic() - started
        return self

    def _start_epmd(self) -> None:
        epmd = _epmd()
        if epmd is None:
            raise ClusterError("epmd not found: install rabbitmq-server (it brings Erlang)")
        log = open(self.base / "epmd.log", "ab")  # noqa: SIM115 - the child keeps it open
        argv, env = self._command([epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"], self._environment())
        self.epmd = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not port_open(self.epmd_port):
            if self.epmd.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.02)

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        with contextlib.suppress(OSError):
            node.log_mark = node.log_file.stat().st_size
        out = open(node.directory / "stdout.log", "ab")  # noqa: SIM115 - the child keeps it open
        argv, env = self._command([str(SERVER)], self._node_environment(node))
        node.process = subprocess.Popen(  # noqa: S603 - fixed binary
            argv, env=env, cwd=node.directory, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_node(self, index: int, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the node has started every plugin and its MQTT and management listeners accept."""
        node = self.nodes[index]
        self._wait_log(node, "Server startup complete", timeout)
        deadline = time.monotonic() + timeout
        while not (port_open(node.mqtt_port) and port_open(node.management_port)):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} started but its listeners are closed\n{self.tail(node)}")
            time.sleep(0.05)
        return time.monotonic()

    def _wait_log(self, node: RabbitNode, needle: str, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in node.log_since_start():
            if not node.running:
                self.failed = True
                raise ClusterError(f"{node.name} exited while booting\n{self.tail(node)}")
            if time.monotonic() > deadline:
                self.failed = True
                raise ClusterError(f"{node.name}: no {needle!r} after {timeout:.0f} s\n{self.tail(node)}")
            time.sleep(0.05)

    def tail(self, node: RabbitNode, lines: int = 25) -> str:
        text = node.log_since_start().splitlines()
        errors = [line for line in text if "[error]" in line or "BOOT FAILED" in line][:20]
        stdout = ""
        with contextlib.suppress(OSError):
            stdout = "\n".join((node.directory / "stdout.log").read_text(errors="replace").splitlines()[-lines:])
        return "\n".join([*errors, "...", *text[-lines:], "--- stdout:", stdout])

    def wait_cluster(self, timeout: float = 60.0, repair_after: float = 4.0) -> None:
        """Every running node is in one cluster and in the MQTT client-id Raft cluster with one leader.

        RabbitMQ 3.10's ``mqtt_node`` ignores a failed ``ra:add_member``
        (seen as ``cluster_change_not_permitted`` when two nodes join at
        once): such a node boots but never joins the client-id cluster. If the
        membership is still incomplete after ``repair_after`` seconds, ask the
        leader to add the missing members.
        """
        live = [n for n in self.nodes if n.running]
        want = "[" + ",".join(f"'{n.name}'" for n in sorted(live, key=lambda n: n.name)) + "]"
        check = (
            f"W = {want}, R = lists:usort(rabbit_nodes:all_running()), "
            "Ms = [rpc:call(N, ra, members, [{mqtt_node, N}], 5000) || N <- W], "
            "Ok = [L || {ok, M, L} <- Ms, W -- [N || {_, N} <- M] =:= []], "
            "{R =:= W, length(Ok) =:= length(W) andalso length(lists:usort(Ok)) =:= 1}."
        )
        repair = (
            f"W = {want}, {{ok, M, L}} = ra:members({{mqtt_node, node()}}, 5000), "
            "[{N, ra:add_member(L, {mqtt_node, N}, 5000)} || N <- W -- [X || {_, X} <- M]]."
        )
        started = time.monotonic()
        repaired = False
        last = ""
        while time.monotonic() < started + timeout:
            last = self.eval(live[0].index, check, check=False)
            if last == "{true,true}":
                return
            if last.startswith("{true,") and not repaired and time.monotonic() - started > repair_after:
                self.repairs.append(self.eval(live[0].index, repair, check=False))
                repaired = True
            time.sleep(0.3)
        self.failed = True
        raise ClusterError(f"cluster did not form: {last}; repairs: {self.repairs}")

    def ctl(
        self, index: int, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        env = self._environment()
        env["RABBITMQ_CTL_ERL_ARGS"] = "-start_epmd false"
        argv, env = self._command([str(CTL), "-n", self.nodes[index].name, *args], env)
        result = subprocess.run(  # noqa: S603 - fixed binary, our own arguments
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} -> {result.returncode}: {result.stderr.strip()}")
        return result

    def eval(self, index: int, expression: str, check: bool = True) -> str:
        result = self.ctl(index, "eval", expression, check=check)
        return (result.stdout + (result.stderr if result.returncode else "")).strip()

    def management_urls(self) -> list[str]:
        return [node.management_url for node in self.nodes]

    def mqtt_ports(self) -> list[int]:
        return [node.mqtt_port for node in self.nodes]

    # -- stopping ----------------------------------------------------------------------------

    def stop_node(self, index: int) -> None:
        """Kill one node (SIGKILL to its process group: the script, beam.smp and its helpers)."""
        self._kill(self.nodes[index].process)

    def restart_node(self, index: int) -> None:
        """Start a stopped node again on its own data directory and wait until it is back in the cluster."""
        self.stop_node(index)
        self.start_node(index)
        self.wait_node(index)
        self.wait_cluster()

    @staticmethod
    def _kill(process: subprocess.Popen[bytes] | None) -> None:
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)

    def kill(self) -> None:
        for node in self.nodes:
            self._kill(node.process)
        self._kill(self.epmd)
        atexit.unregister(self.kill)

    def stop(self) -> None:
        """Kill every node and epmd; remove the data unless a boot failed (kept for the post-mortem)."""
        self.kill()
        if self._own_base and not self.failed:
            shutil.rmtree(self.base, ignore_errors=True)

    def beam_pids(self) -> Sequence[int]:
        """The ``beam.smp`` process of each running node (for CPU accounting)."""
        pids: list[int] = []
        for node in self.nodes:
            if node.running:
                pid_file = node.directory / "beam.pid"
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(pid_file.read_text().strip()))
        return pids

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
