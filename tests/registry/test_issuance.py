"""One board per hardware id, enforced inside the issuing transaction (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.errors import Conflict
from iotauth.pki.keys import PrivateKey
from iotauth.registry import CertificateStatus, Registry, RevocationReason

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


async def _issue(authority: Authority, csr: x509.CertificateSigningRequest, *, exclusive: bool = True) -> object:
    return await authority.issue(csr, "sensor-mac", hardware_id="aa:bb:cc:dd:ee:ff", activate=False,
                                 actor="station", exclusive=exclusive)


async def test_a_second_key_for_one_hardware_id_is_refused_while_the_first_is_live(
        authority: Authority, registry: Registry, csr_factory: CsrFactory) -> None:
    first = await _issue(authority, csr_factory()[1])
    claimed = r"already has certificate \w+ \(pending\) for another key; two boards claim this hardware id"
    with pytest.raises(Conflict, match=claimed):
        await _issue(authority, csr_factory()[1])
    serial = first.record.serial  # type: ignore[attr-defined]
    await registry.activate("sensor-mac", serial, actor="station")
    with pytest.raises(Conflict, match=r"\(active\) for another key"):
        await _issue(authority, csr_factory()[1])
    # Once the station has superseded the live certificate (--force), a new board may take the identity.
    await registry.revoke_certificate(serial, RevocationReason.SUPERSEDED, actor="station")
    await _issue(authority, csr_factory()[1])
    # Without ``exclusive`` (an operator's rotation through 'iotauth issue') the rule does not apply.
    await _issue(authority, csr_factory()[1], exclusive=False)


async def test_one_batch_racing_for_one_hardware_id_lets_exactly_one_through(
        authority: Authority, registry: Registry, csr_factory: CsrFactory) -> None:
    outcomes = await asyncio.gather(*(_issue(authority, csr_factory()[1]) for _ in range(6)),
                                    return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, Conflict) for o in outcomes if isinstance(o, BaseException))
    certs = await registry.certificates_of("sensor-mac")
    assert [c.status for c in certs] == [CertificateStatus.PENDING]
    assert (await registry.verify_audit()).ok
