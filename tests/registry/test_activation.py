"""Activations decided in batches: many at once give exactly what each alone would, on both backends.

The single-activation rules (replay, another device's renewal, too old, device not active) are in
``test_renewal.py``; here the activations race each other inside one batch.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from iotauth.authority import Authority
from iotauth.errors import RefusalCode, RenewalRefused
from iotauth.registry import CertificateStatus, Registry, RevocationReason
from iotauth.registry.activation import Activation
from tests.registry.test_renewal import provision, request


async def test_a_fleet_activating_at_once_supersedes_each_old_certificate(authority: Authority,
                                                                         registry: Registry) -> None:
    currents = [await provision(authority, f"act-{n}") for n in range(40)]
    renewals = await asyncio.gather(*(registry.record_renewal(request(authority, c)) for c in currents))
    await registry.order_rotations(["act-0", "act-1"], actor="alice")
    mark = await registry.last_event_id()
    done = await asyncio.gather(*(registry.activate_renewal(r.record.serial, device_id=c.device_id, actor="renewer",
                                                            via="confirm", request_id=f"confirm-{n}")
                                  for n, (c, r) in enumerate(zip(currents, renewals, strict=True))))
    events = await registry.events(after_id=mark)
    assert len({e.ts for e in events}) == 1  # one transaction for the whole fleet
    for current, renewal, activation in zip(currents, renewals, done, strict=True):
        assert activation.certificate.serial == renewal.record.serial and not activation.already
        assert activation.certificate.status is CertificateStatus.ACTIVE
        assert activation.superseded is not None and activation.superseded.serial == current.serial
        stored = {c.serial: c for c in await registry.certificates_of(current.device_id)}
        assert stored[renewal.record.serial].status is CertificateStatus.ACTIVE
        assert stored[current.serial].status is CertificateStatus.REVOKED
        assert stored[current.serial].revocation_reason is RevocationReason.SUPERSEDED
        own = [e for e in events if e.device_id == current.device_id]
        assert [e.kind for e in own] == ["certificate.activated", "certificate.revoked"]
        assert own[0].data == {"serial": renewal.record.serial, "renewal_of": current.serial, "via": "confirm",
                               "order": current.device_id in ("act-0", "act-1")}
        assert own[1].data == {"serial": current.serial, "fingerprint": current.fingerprint, "reason": "superseded",
                               "superseded_by": renewal.record.serial, "via": "confirm"}
    assert await registry.open_orders() == []
    assert (await registry.verify_audit()).ok


async def test_one_batch_sees_its_own_activations(authority: Authority, registry: Registry) -> None:
    """The same renewal twice, a confirmation id twice, a refusal between them: decided in order, as if alone."""
    current = await provision(authority, "act-twice")
    other = await provision(authority, "act-other")
    renewal = await registry.record_renewal(request(authority, current))
    theirs = await registry.record_renewal(request(authority, other))
    mark = await registry.last_event_id()
    results = await asyncio.gather(
        registry.activate_renewal(renewal.record.serial, device_id="act-twice", actor="r", via="confirm",
                                  request_id="c-1"),
        registry.activate_renewal(theirs.record.serial, device_id="act-twice", actor="r", via="confirm"),
        registry.activate_renewal(renewal.record.serial, device_id="act-twice", actor="b", via="connect"),
        registry.activate_renewal(theirs.record.serial, device_id="act-other", actor="r", via="confirm",
                                  request_id="c-1"),
        return_exceptions=True,
    )
    first, stolen, again, replayed = results
    assert isinstance(first, Activation) and not first.already
    assert isinstance(stolen, RenewalRefused) and stolen.code is RefusalCode.NOT_CURRENT_CERTIFICATE
    assert isinstance(again, Activation) and again.already and again.certificate.serial == renewal.record.serial
    assert isinstance(replayed, RenewalRefused) and replayed.code is RefusalCode.REPLAYED
    assert [e.kind for e in await registry.events(after_id=mark)] == ["certificate.activated", "certificate.revoked"]
    assert (await registry.get_certificate(theirs.record.serial)).status is CertificateStatus.PENDING
    with pytest.raises(RenewalRefused) as later:  # the id stays remembered after the batch
        await registry.activate_renewal(theirs.record.serial, device_id="act-other", actor="r", via="confirm",
                                        request_id="c-1")
    assert later.value.code is RefusalCode.REPLAYED
    assert (await registry.activate_renewal(theirs.record.serial, device_id="act-other", actor="r",
                                            via="confirm")).superseded is not None


async def test_a_stale_renewal_replaced_by_a_newer_one_stays_refused_in_the_same_batch(authority: Authority,
                                                                                      registry: Registry) -> None:
    current = await provision(authority, "act-stale")
    stale = await registry.record_renewal(request(authority, current, pending_ttl=timedelta(0)))
    newer = await registry.record_renewal(request(authority, current, pending_ttl=timedelta(0)))  # revokes the stale
    results = await asyncio.gather(
        registry.activate_renewal(stale.record.serial, device_id="act-stale", actor="r", via="confirm"),
        registry.activate_renewal(newer.record.serial, device_id="act-stale", actor="r", via="confirm"),
        return_exceptions=True,
    )
    assert isinstance(results[0], RenewalRefused) and results[0].code is RefusalCode.RENEWAL_EXPIRED
    assert isinstance(results[1], Activation) and not results[1].already
    statuses = {c.serial: c.status for c in await registry.certificates_of("act-stale")}
    assert statuses == {current.serial: CertificateStatus.REVOKED, stale.record.serial: CertificateStatus.REVOKED,
                        newer.record.serial: CertificateStatus.ACTIVE}
