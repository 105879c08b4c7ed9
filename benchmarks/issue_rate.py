"""Issuance and CRL benchmark (issue 2).

Prints JSON with:
* ``issued_per_second``: certificates issued from CSRs through ``Authority.issue``
  with durable registry writes (group commit; no certificate is returned before
  its record is committed with synchronous=FULL), next to ``raw_per_second``:
  the same signing with ``cryptography`` alone, measured in the same run;
* ``crl_100k_sign_seconds``: signing a CRL with 100k revoked entries in one pass;
* ``crl_100k_from_registry_seconds``: the same, starting from the registry
  (query, entry objects, signature), as ``iotauth crl`` does it;
* ``crl_100k_rebuild_after_one_revocation_seconds``: the next build after one
  more revocation, as the long-running ``iotauth serve`` does it (entry
  objects are reused between builds);
* ``token``: the same issuance with the issuing key on a PKCS#11 token (SoftHSM2,
  a token this script initialises in a temporary directory), next to the file
  key above, in the same run: ``ratio_token_to_file`` (goal >= 0.5), and the
  signatures per second each key gives on its own.

Usage: python benchmarks/issue_rate.py [--count N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from iotauth.authority import Authority, open_authority
from iotauth.bootstrap import KeyPlan, initialise_home
from iotauth.certs import now_utc
from iotauth.config import Home
from iotauth.pki.ca import revoked_entry
from iotauth.pki.keys import PrivateKey, generate_private_key
from iotauth.registry import RevocationReason, open_registry

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "246810"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(count: int, concurrency: int) -> dict[str, object]:
    home = Home(Path(tempfile.mkdtemp(prefix="iotauth-bench-")) / "home")
    await initialise_home(home, "bench.test", ["localhost"], passphrase=None, actor="bench")
    csrs = [
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(generate_private_key(), hashes.SHA256())
        for _ in range(count)
    ]
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        profile = authority.settings.profile("default")

        started = time.perf_counter()
        for n, csr in enumerate(csrs[: count // 2]):
            authority.ca.issue(csr, f"raw-{n}", profile)
        raw_rate = (count // 2) / (time.perf_counter() - started)

        elapsed, cpu_used = await _issue_all(authority, csrs, concurrency)
        assert len(await registry.list_devices()) == count
        file_signatures = _signatures_per_second(authority.ca.issuing_key)

        await _fill_revoked(registry, 100_000)
        now = now_utc()
        entries = [revoked_entry(n + 1, now, x509.ReasonFlags.superseded) for n in range(100_000)]
        started = time.perf_counter()
        authority.ca.sign_crl(entries, 1, profile.validity, now)
        crl_sign = time.perf_counter() - started
        started = time.perf_counter()
        published = await authority.build_crl()
        crl_registry = time.perf_counter() - started
        assert published.entries >= 100_000
        await registry.revoke("dev-0", RevocationReason.KEY_COMPROMISE, actor="bench")
        started = time.perf_counter()
        rebuilt = await authority.build_crl()  # what 'iotauth serve' does after each revocation
        crl_rebuild = time.perf_counter() - started
        assert rebuilt.entries == published.entries + 1
        audit_ok = (await registry.verify_audit()).ok

    return {
        "benchmark": "issue_rate",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "count": count,
        "concurrency": concurrency,
        "issued_per_second": round(count / elapsed, 1),
        "raw_per_second": round(raw_rate, 1),
        "ratio_to_raw": round((count / elapsed) / raw_rate, 3),
        "cpu_ms_per_issuance": round(cpu_used / count * 1000, 3),
        "goal_issued_per_second": 1000,
        "crl_100k_sign_seconds": round(crl_sign, 3),
        "crl_100k_from_registry_seconds": round(crl_registry, 3),
        "crl_100k_rebuild_after_one_revocation_seconds": round(crl_rebuild, 3),
        "goal_crl_seconds": 1.5,
        "audit_chain_ok": audit_ok,
        "token": await _token_run(csrs, concurrency, count / elapsed, file_signatures),
    }


async def _issue_all(authority: Authority, csrs: list[x509.CertificateSigningRequest],
                     concurrency: int) -> tuple[float, float]:
    started, cpu = time.perf_counter(), _cpu()
    for start in range(0, len(csrs), concurrency):
        await asyncio.gather(
            *[
                authority.issue(csr, f"dev-{start + n}", actor="bench")
                for n, csr in enumerate(csrs[start : start + concurrency])
            ]
        )
    return time.perf_counter() - started, _cpu() - cpu


def _signatures_per_second(key: PrivateKey, seconds: float = 1.0) -> float:
    """ECDSA signatures per second with ``key`` alone (a token key includes its verify-before-return)."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        key.sign(b"tbs", ec.ECDSA(hashes.SHA256()))
        done += 1
    return done / (time.perf_counter() - started)


def _softhsm_token() -> Path | None:
    """A SoftHSM2 token 'bench' in a temporary directory, for this process and its children (None: no SoftHSM2)."""
    if not Path(SOFTHSM).exists() or shutil.which("softhsm2-util") is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="iotauth-bench-hsm-"))
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ.update({"SOFTHSM2_CONF": str(conf), "IOTAUTH_PKCS11_PIN": PIN})
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin",
                    "13579135"], check=True, capture_output=True)
    return root


async def _token_run(csrs: list[x509.CertificateSigningRequest], concurrency: int, file_rate: float,
                     file_signatures: float) -> dict[str, object]:
    """The same issuance with the issuing key on a SoftHSM2 token initialised here."""
    root = _softhsm_token()
    if root is None:
        return {"skipped": "SoftHSM2 is not installed (scripts/install-system-deps.sh)"}
    home = Home(root / "home")
    uri = f"pkcs11:token=bench;object=issuing?module-path={SOFTHSM}"
    await initialise_home(home, "bench.test", ["localhost"], passphrase=None, actor="bench",
                          keys=KeyPlan(issuing_key_uri=uri))
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        elapsed, cpu_used = await _issue_all(authority, csrs, concurrency)
        assert len(await registry.list_devices()) == len(csrs)
        token_signatures = _signatures_per_second(authority.ca.issuing_key)
    rate = len(csrs) / elapsed
    return {
        "module": SOFTHSM,
        "key": uri,
        "issued_per_second_file_key": round(file_rate, 1),
        "issued_per_second_token_key": round(rate, 1),
        "ratio_token_to_file": round(rate / file_rate, 3),
        "goal_ratio": 0.5,
        "cpu_ms_per_issuance_token_key": round(cpu_used / len(csrs) * 1000, 3),
        "token_signatures_per_second": round(token_signatures, 1),
        "file_key_signatures_per_second": round(file_signatures, 1),
    }


async def _fill_revoked(registry: object, count: int) -> None:
    """Insert ``count`` revoked certificates for one device directly (fast set-up, not measured)."""
    from iotauth.registry.backend import Tx

    async def op(tx: Tx) -> None:
        await tx.execute(
            "INSERT INTO devices (device_id, hardware_id, profile, status, created_at, updated_at) "
            "VALUES ('crl-bench', NULL, 'default', 'revoked', ?, ?)",
            (tx.now, tx.now),
        )
        pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 700 + "\n-----END CERTIFICATE-----\n"  # realistic row size
        rows = [
            (
                format(10**12 + n, "x"),
                f"{n:064x}",
                "crl-bench",
                f"{n:064x}",
                "2026-01-01T00:00:00Z",
                "2099-01-01T00:00:00Z",
                "revoked",
                tx.now,
                tx.now,
                "superseded",
                pem,
            )
            for n in range(count)
        ]
        await tx.executemany(
            "INSERT INTO certificates (serial, fingerprint, device_id, public_key_sha256, not_before, not_after, "
            "status, issued_at, revoked_at, revocation_reason, pem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    await registry.write(op)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.count, args.concurrency)), indent=2))


if __name__ == "__main__":
    main()
