"""CRLs: signed by the issuing CA, complete, with reasons, holds and nextUpdate."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from iotauth.authority import Authority
from iotauth.certs import pem
from iotauth.config import Home
from iotauth.pki.keys import PrivateKey
from iotauth.registry import Registry, RevocationReason

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


def _reason(crl: x509.CertificateRevocationList, serial: str) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None, f"{serial} missing from CRL"
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


async def test_revoked_certificate_appears_in_next_crl_with_reason(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    keep = await authority.issue(csr_factory()[1], "keep", actor="op")
    gone = await authority.issue(csr_factory()[1], "gone", actor="op")
    before = await authority.build_crl()
    assert before.crl.get_revoked_certificate_by_serial_number(int(gone.record.serial, 16)) is None
    await registry.revoke("gone", RevocationReason.KEY_COMPROMISE, actor="op")
    after = await authority.build_crl()
    assert _reason(after.crl, gone.record.serial) is x509.ReasonFlags.key_compromise
    assert after.crl.get_revoked_certificate_by_serial_number(int(keep.record.serial, 16)) is None
    assert after.number == before.number + 1
    assert after.crl.is_signature_valid(authority.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert after.crl.issuer == authority.ca.issuing_cert.subject
    assert after.crl.next_update_utc - after.crl.last_update_utc == timedelta(hours=24)  # type: ignore[operator]


async def test_suspended_and_pending_are_on_hold_and_resume_lifts_it(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    suspended = await authority.issue(csr_factory()[1], "paused", actor="op")
    pending = await authority.issue(csr_factory()[1], "undelivered", activate=False, actor="station")
    await registry.suspend("paused", actor="op")
    crl = (await authority.build_crl()).crl
    assert _reason(crl, suspended.record.serial) is x509.ReasonFlags.certificate_hold
    assert _reason(crl, pending.record.serial) is x509.ReasonFlags.certificate_hold
    await registry.resume("paused", actor="op")
    crl = (await authority.build_crl()).crl
    assert crl.get_revoked_certificate_by_serial_number(int(suspended.record.serial, 16)) is None


async def test_held_serials_are_listed_on_hold_once(
    authority: Authority, registry: Registry, csr_factory: CsrFactory
) -> None:
    """The Mosquitto follower holds a renewal until it closed the sessions of the certificate it replaced."""
    renewal = await authority.issue(csr_factory()[1], "renewed", actor="op")
    gone = await authority.issue(csr_factory()[1], "gone-too", actor="op")
    await registry.revoke("gone-too", RevocationReason.KEY_COMPROMISE, actor="op")
    built = await authority.build_crl(hold=[renewal.record.serial, gone.record.serial])
    assert _reason(built.crl, renewal.record.serial) is x509.ReasonFlags.certificate_hold
    assert _reason(built.crl, gone.record.serial) is x509.ReasonFlags.key_compromise  # the registry's entry wins
    assert [e.serial_number for e in built.crl].count(int(gone.record.serial, 16)) == 1
    released = (await authority.build_crl()).crl
    assert released.get_revoked_certificate_by_serial_number(int(renewal.record.serial, 16)) is None


async def test_openssl_refuses_a_revoked_certificate_with_the_published_crl(
    home: Home, authority: Authority, registry: Registry, csr_factory: CsrFactory, tmp_path: Path
) -> None:
    issued = await authority.issue(csr_factory()[1], "sensor-1", actor="op")
    await registry.revoke("sensor-1", RevocationReason.KEY_COMPROMISE, actor="op")
    await authority.publish_crl(home)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem(issued.certificate))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(home.chain_file),
            "-CRLfile",
            str(home.crl_pem),
            "-purpose",
            "sslclient",
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "revoked" in (result.stdout + result.stderr)


def test_crl_of_100k_entries_is_built_in_one_pass(authority: Authority) -> None:
    """The builder gets the whole list at once; a per-entry loop would be quadratic."""
    from iotauth.certs import now_utc
    from iotauth.pki.ca import revoked_entry

    now = now_utc()
    entries = [revoked_entry(n + 1, now, x509.ReasonFlags.superseded) for n in range(100_000)]
    crl = authority.ca.sign_crl(entries, 1, timedelta(hours=1), now)
    assert len(crl) == 100_000
    assert crl.get_revoked_certificate_by_serial_number(77_777) is not None
