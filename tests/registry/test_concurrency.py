"""Several processes share one registry: issuance from two at once, and crash durability."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from iotauth.config import Home
from iotauth.registry import open_registry

ISSUER = textwrap.dedent(
    """
    import asyncio, sys
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from iotauth.authority import open_authority
    from iotauth.config import Home
    from iotauth.pki.keys import generate_private_key
    from iotauth.registry import open_registry

    async def main(home, url, prefix, count):
        home = Home(__import__("pathlib").Path(home))
        async with await open_registry(url) as reg:
            authority = await open_authority(home, reg)
            csrs = [x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                    .sign(generate_private_key(), hashes.SHA256()) for _ in range(count)]
            print("ready", flush=True)
            sys.stdin.readline()  # start together
            for start in range(0, count, 10):
                await asyncio.gather(*[authority.issue(c, f"{prefix}-{start + n}", actor=prefix)
                                       for n, c in enumerate(csrs[start:start + 10])])
            print("done", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


def _spawn(home: Home, url: str, prefix: str, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ISSUER, str(home.root), url, prefix, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


async def test_two_processes_issue_at_once_and_the_chain_holds(home: Home, registry_url: str) -> None:
    async with await open_registry(registry_url) as reg:  # create the schema first (PostgreSQL starts empty)
        initial = len(await reg.events())
    procs = [_spawn(home, registry_url, prefix, 150) for prefix in ("line-a", "line-b")]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and "done" in out
    async with await open_registry(registry_url) as reg:
        devices = await reg.list_devices()
        report = await reg.verify_audit()
        actors = {e.actor for e in await reg.events()}
    assert len(devices) == 300
    assert report.ok and report.events == initial + 2 * 300
    assert {"line-a", "line-b"} <= actors


CRASHER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from iotauth.authority import open_authority
    from iotauth.config import Home
    from iotauth.pki.keys import generate_private_key
    from iotauth.registry import open_registry

    async def main(home, url):
        home = Home(__import__("pathlib").Path(home))
        reg = await open_registry(url)
        authority = await open_authority(home, reg)
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
            generate_private_key(), hashes.SHA256())
        issued = await authority.issue(csr, "crash-1", actor="crasher")
        print(issued.record.serial, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # die the instant the certificate is in hand

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_returned_certificate_survives_a_crash(home: Home, registry_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, str(home.root), registry_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    serial = proc.stdout.strip()
    assert serial
    async with await open_registry(registry_url) as reg:
        assert (await reg.get_certificate(serial)).device_id == "crash-1"
        assert (await reg.verify_audit()).ok
