"""``iotauth export mosquitto`` against the real Mosquitto broker and its command-line clients."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from iotauth.authority import Authority, open_authority
from iotauth.certs import pem
from iotauth.config import Home, load_settings
from iotauth.export.mosquitto import export, reload_broker, render_acl
from iotauth.pki.keys import PrivateKey, private_key_pem
from iotauth.policy import PolicySet
from iotauth.registry import Registry, RevocationReason
from iotauth.testing import free_port
from tests.fixtures import iotauth_executable

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def test_acl_rendering_narrows_other_profiles() -> None:
    from iotauth.config import parse_settings

    settings = parse_settings(
        {
            "trust_domain": "x.test",
            "profiles": {
                "ingest": {"publish": ["devices/+/commands/#"], "subscribe": ["devices/+/telemetry/#"]},
                "reader": {"publish": [], "subscribe": ["devices/{device_id}/commands/#"]},
            },
        }
    )
    acl = render_acl(PolicySet.from_profiles(settings.profiles.values()), {"ingest": ["svc-1"], "reader": ["ro-1"]})
    assert (
        "pattern write devices/%u/telemetry/#\npattern write devices/%u/state\n"
        "pattern write devices/%u/rotation/request\npattern read devices/%u/commands/#\n"
        "pattern read devices/%u/rotation/response\n"
        in acl
    )
    assert "user svc-1\ntopic write devices/+/commands/#\ntopic read devices/+/telemetry/#\n" in acl
    # 'reader' may not publish what the default patterns would grant it, but keeps its own read right.
    reader = acl.split("user ro-1\n")[1]
    assert "topic deny devices/ro-1/telemetry/#" in reader and "topic deny devices/ro-1/state" in reader
    assert "topic deny devices/ro-1/commands/#" not in reader


@dataclass
class Identity:
    device_id: str
    cert: Path
    key: Path


@pytest.fixture
async def identities(authority: Authority, csr_factory: CsrFactory, tmp_path: Path) -> dict[str, Identity]:
    made = {}
    for device_id, profile in (("sensor-1", "default"), ("sensor-2", "default"), ("svc-ingest", "ingest")):
        key, csr = csr_factory()
        issued = await authority.issue(csr, device_id, profile, actor="op")
        made[device_id] = Identity(device_id, tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key")
        made[device_id].cert.write_bytes(pem(issued.certificate))
        made[device_id].key.write_bytes(private_key_pem(key, None))
    return made


@dataclass
class Mosquitto:
    port: int
    process: subprocess.Popen[bytes]
    home: Home
    directory: Path

    def args(self, who: Identity) -> list[str]:
        return [
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--cafile",
            str(self.home.chain_file),
            "--cert",
            str(who.cert),
            "--key",
            str(who.key),
            "-i",
            who.device_id,
        ]

    def publish(self, who: Identity, topic: str, message: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mosquitto_pub", *self.args(who), "-t", topic, "-m", message, "-q", "1", "-d"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    def subscribe(self, who: Identity, topic_filter: str) -> Subscriber:
        # stdbuf: mosquitto_sub block-buffers stdout when it is a pipe.
        proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", *self.args(who), "-t", topic_filter, "-v", "-q", "1", "-d"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        subscriber = Subscriber(proc)
        try:
            subscriber.wait_for("SUBACK")
        except AssertionError:
            subscriber.stop()  # never leave a client running behind a failed test
            raise
        return subscriber


class Subscriber:
    """A running mosquitto_sub whose output is collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output:
                return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen; output: {self.output!r}")

    def settle(self, seconds: float = 1.0) -> str:
        time.sleep(seconds)
        return self.output

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
async def mosquitto(
    home: Home, registry: Registry, identities: dict[str, Identity], tmp_path: Path
) -> Iterator[Mosquitto]:
    port = free_port()
    # Not under pytest's tmp tree: Mosquitto started as root reads these files as its own account.
    base = Path(tempfile.mkdtemp(prefix="iotauth-mosquitto-"))
    base.chmod(0o755)
    directory = base / "export"
    authority = await open_authority(home, registry)
    await export(
        home,
        registry,
        authority,
        PolicySet.from_profiles(load_settings(home).profiles.values()),
        directory,
        "127.0.0.1",
        port,
    )
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(directory / "mosquitto.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    for _ in range(100):
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"mosquitto exited: {output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield Mosquitto(port, process, home, directory)
    process.terminate()
    process.wait(timeout=10)
    shutil.rmtree(base, ignore_errors=True)


async def test_devices_stay_within_their_topics(mosquitto: Mosquitto, identities: dict[str, Identity]) -> None:
    ingest = mosquitto.subscribe(identities["svc-ingest"], "devices/+/telemetry/#")
    snooper = mosquitto.subscribe(identities["sensor-2"], "devices/+/commands/#")  # Mosquitto 2.0 grants the SUBACK
    try:
        assert mosquitto.publish(identities["sensor-1"], "devices/sensor-1/telemetry/t", "genuine").returncode == 0
        mosquitto.publish(identities["sensor-1"], "devices/sensor-2/telemetry/t", "spoofed")
        mosquitto.publish(identities["svc-ingest"], "devices/sensor-1/commands/reboot", "for-sensor-1")
        mosquitto.publish(identities["svc-ingest"], "devices/sensor-2/commands/reboot", "for-sensor-2")
        ingest.wait_for("genuine")
        snooper.wait_for("for-sensor-2")
        seen_by_ingest = ingest.settle()
        seen_by_snooper = snooper.settle()
    finally:
        ingest.stop()
        snooper.stop()
    assert "devices/sensor-1/telemetry/t genuine" in seen_by_ingest
    assert "spoofed" not in seen_by_ingest
    assert "for-sensor-2" in seen_by_snooper
    assert "for-sensor-1" not in seen_by_snooper  # delivery is filtered by the read ACL


async def test_revocation_refuses_new_connections_after_export_and_reload(
    mosquitto: Mosquitto, home: Home, registry: Registry, identities: dict[str, Identity]
) -> None:
    control = mosquitto.publish(identities["sensor-1"], "devices/sensor-1/state", "before")
    assert control.returncode == 0 and "received CONNACK (0)" in control.stdout
    # No other sensor-1 connection while this one is live: the client id is the CN, so it would take over.
    live = mosquitto.subscribe(identities["sensor-1"], "devices/sensor-1/commands/#")
    try:
        await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
        authority = await open_authority(home, registry)
        await export(
            home,
            registry,
            authority,
            PolicySet.from_profiles(load_settings(home).profiles.values()),
            mosquitto.directory,
            "127.0.0.1",
            mosquitto.port,
        )
        reload_broker(mosquitto.process.pid)
        time.sleep(1.0)
        assert mosquitto.publish(identities["sensor-2"], "devices/sensor-2/state", "others fine").returncode == 0

        # The documented Mosquitto gap, measured: the session that was connected before the revocation
        # is still connected after the reload and still receives its commands.
        mosquitto.publish(identities["svc-ingest"], "devices/sensor-1/commands/x", "still-delivered")
        live.wait_for("still-delivered")
        assert live.proc.poll() is None
        assert live.output.count("sending CONNECT") == 1  # never reconnected: the same session all along
    finally:
        live.stop()
    refused = mosquitto.publish(identities["sensor-1"], "devices/sensor-1/state", "after")
    # TLS 1.3 reports the server's "certificate revoked" alert only once the client writes, so the
    # client's error text varies; what matters is that no CONNACK ever arrives.
    assert refused.returncode != 0
    assert "CONNACK" not in refused.stdout


def test_cli_export_writes_a_runnable_configuration(home: Home, identities: dict[str, Identity]) -> None:
    base = Path(tempfile.mkdtemp(prefix="iotauth-export-"))  # pytest's tree is private to root: Mosquitto's
    base.chmod(0o755)  # own account could not read it, and the export would (rightly) refuse
    out = base / "cli-export"
    result = subprocess.run(
        [
            iotauth_executable(),
            "--home",
            str(home.root),
            "export",
            "mosquitto",
            "--out",
            str(out),
            "--bind",
            "127.0.0.1:18999",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = (out / "mosquitto.conf").read_text()
    for line in (
        "listener 18999 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"cafile {out / 'ca.pem'}",
        f"crlfile {out / 'crl.pem'}",
        f"acl_file {out / 'acl'}",
        f"keyfile {out / 'server.key'}",
        f"certfile {out / 'server.crt'}",
    ):
        assert line in config
    assert oct((out / "server.key").stat().st_mode)[-3:] == "600"
    assert "user svc-ingest" in (out / "acl").read_text()
    shutil.rmtree(base, ignore_errors=True)


async def test_watch_refreshes_the_crl_and_reloads_mosquitto_after_a_revocation(
    mosquitto: Mosquitto, home: Home, registry: Registry, identities: dict[str, Identity]
) -> None:
    assert mosquitto.publish(identities["sensor-2"], "devices/sensor-2/state", "before").returncode == 0
    watcher = subprocess.Popen(
        [
            iotauth_executable(),
            "--home",
            str(home.root),
            "export",
            "mosquitto",
            "--out",
            str(mosquitto.directory),
            "--bind",
            f"127.0.0.1:{mosquitto.port}",
            "--reload-pid",
            str(mosquitto.process.pid),
            "--watch",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(2.0)  # the initial export and reload
        serial = int(x509.load_pem_x509_certificate(identities["sensor-2"].cert.read_bytes()).serial_number)
        await registry.revoke("sensor-2", RevocationReason.KEY_COMPROMISE, actor="op")
        crl_file = mosquitto.directory / "crl.pem"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            crl = x509.load_pem_x509_crl(crl_file.read_bytes())
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the watched export never published the revocation")
        time.sleep(1.0)  # SIGHUP follows the export
        refused = mosquitto.publish(identities["sensor-2"], "devices/sensor-2/state", "after")
        assert refused.returncode != 0 and "CONNACK" not in refused.stdout
        assert watcher.poll() is None
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=20)
    assert "re-exported (device.revoked sensor-2)" in output or "re-exported (certificate.revoked" in output, output
