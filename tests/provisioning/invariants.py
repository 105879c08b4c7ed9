"""The provisioning invariants, checked against the registry and the boards' flash after every scenario."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from iotauth.certs import fingerprint
from iotauth.registry import CertificateRecord, CertificateStatus, Registry
from tests.fixtures.devices import EmulatedDevice


async def all_certificates(registry: Registry) -> list[CertificateRecord]:
    certs: list[CertificateRecord] = []
    for device in await registry.list_devices():
        certs += await registry.certificates_of(device.device_id)
    return certs


async def assert_invariants(registry: Registry, boards: Sequence[EmulatedDevice]) -> None:
    """What must hold whatever happened on the line.

    * the audit chain verifies;
    * no public key was certified twice (no second certificate per hardware id and key);
    * a device has at most one active certificate;
    * every certificate a board holds is in the registry, bound to that board's hardware id;
    * no certificate is active unless a board committed to it.
    """
    report = await registry.verify_audit()
    assert report.ok, report.problem
    certs = await all_certificates(registry)
    per_key = Counter(c.public_key_sha256 for c in certs)
    assert all(n == 1 for n in per_key.values()), f"a key was certified more than once: {per_key}"
    active_per_device = Counter(c.device_id for c in certs if c.status is CertificateStatus.ACTIVE)
    assert all(n == 1 for n in active_per_device.values()), active_per_device
    committed = {b.committed for b in boards if b.committed}
    for board in boards:
        cert = board.certificate()
        if cert is None:
            continue
        credential = await registry.find_credential(fingerprint(cert))
        assert credential is not None, f"board {board.hardware_id} holds a certificate the registry does not know"
        assert credential.device.hardware_id == board.hardware_id
    for cert in certs:
        if cert.status is CertificateStatus.ACTIVE:
            assert cert.fingerprint in committed, f"certificate {cert.serial} is active but no board committed it"
