"""Renewals in the registry: every rule checked inside the write transaction, on both backends.

The renewer refuses what it can see before signing; these rules are the ones
that can race (two requests, two renewers, a request and an activation), so
they are tested here against the transaction itself, concurrently where it
matters.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from datetime import timedelta

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.certs import cert_time, now_utc
from iotauth.config import Home
from iotauth.errors import RefusalCode, RenewalRefused
from iotauth.pki.keys import PrivateKey, generate_private_key
from iotauth.registry import CertificateRecord, CertificateStatus, Registry, RevocationReason, open_registry
from iotauth.registry.renewal import RenewalRequest
from tests.fixtures.pki import make_csr


async def provision(authority: Authority, device_id: str, key: PrivateKey | None = None) -> CertificateRecord:
    issued = await authority.issue(make_csr(key or generate_private_key("p256")), device_id, actor="test")
    return issued.record


def signed(authority: Authority, device_id: str, key: PrivateKey | None = None) -> x509.Certificate:
    return authority.ca.issue(make_csr(key or generate_private_key("p256")), device_id,
                              authority.settings.profile("default"))


def request(authority: Authority, current: CertificateRecord, key: PrivateKey | None = None, **overrides: object
            ) -> RenewalRequest:
    values: dict[str, object] = {
        "cert": signed(authority, current.device_id, key), "device_id": current.device_id,
        "current_serial": current.serial, "request_id": secrets.token_hex(16), "window_opens": None,
        "max_renewals": 3, "rate_window": timedelta(hours=1), "pending_ttl": timedelta(hours=1), "actor": "renewer",
    }
    values.update(overrides)
    return RenewalRequest(**values)  # type: ignore[arg-type]


async def refused(registry: Registry, renewal: RenewalRequest) -> RenewalRefused:
    with pytest.raises(RenewalRefused) as caught:
        await registry.record_renewal(renewal)
    return caught.value


async def test_a_renewal_is_recorded_pending_and_names_what_it_renews(authority: Authority,
                                                                      registry: Registry) -> None:
    current = await provision(authority, "r-1")
    done = await registry.record_renewal(request(authority, current))
    assert done.record.status is CertificateStatus.PENDING and done.record.renewal_of == current.serial
    assert (done.reused, done.trigger) == (False, "window")
    issued = [e for e in await registry.events(device_id="r-1") if e.kind == "certificate.issued"][-1]
    assert issued.data["renewal_of"] == current.serial and issued.data["status"] == "pending"
    assert (await registry.get_certificate(done.record.serial)).renewal_of == current.serial


async def test_the_same_key_again_gets_the_same_pending_certificate(authority: Authority,
                                                                     registry: Registry) -> None:
    current = await provision(authority, "r-retry")
    key = generate_private_key("p256")
    first = await registry.record_renewal(request(authority, current, key))
    again = await registry.record_renewal(request(authority, current, key))  # a new request id, the same key
    assert again.reused and again.record.serial == first.record.serial
    assert len(await registry.certificates_of("r-retry")) == 2


async def test_the_same_key_twice_in_one_batch_is_one_certificate(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-batch")
    key = generate_private_key("p256")
    first, second = await asyncio.gather(*(registry.record_renewal(request(authority, current, key))
                                           for _ in range(2)))
    assert first.record.serial == second.record.serial and second.reused


async def test_a_key_any_certificate_ever_had_is_refused(authority: Authority, registry: Registry) -> None:
    own_key, other_key = generate_private_key("p256"), generate_private_key("p256")
    current = await provision(authority, "r-keys", own_key)
    await provision(authority, "r-other", other_key)
    own = await refused(registry, request(authority, current, own_key))
    assert own.code is RefusalCode.KEY_REUSED
    theirs = await refused(registry, request(authority, current, other_key))
    assert theirs.code is RefusalCode.KEY_REUSED and "new key" in str(theirs)


async def test_one_pending_renewal_per_device(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-pending")
    first = await registry.record_renewal(request(authority, current))
    second = await refused(registry, request(authority, current))
    assert second.code is RefusalCode.RENEWAL_PENDING and 3500 <= (second.retry_after or 0) <= 3600
    # Two requests of one device with different keys at once: the transaction lets exactly one through.
    other = await provision(authority, "r-race")
    results = await asyncio.gather(*(registry.record_renewal(request(authority, other)) for _ in range(4)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(r.code is RefusalCode.RENEWAL_PENDING for r in results if isinstance(r, RenewalRefused))
    assert first.record.status is CertificateStatus.PENDING


async def test_a_stale_pending_renewal_gives_way_and_is_revoked(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-stale")
    old = await registry.record_renewal(request(authority, current))
    fresh = await registry.record_renewal(request(authority, current, pending_ttl=timedelta(0)))
    assert fresh.record.serial != old.record.serial
    revoked = await registry.get_certificate(old.record.serial)
    assert revoked.status is CertificateStatus.REVOKED and revoked.revocation_reason is RevocationReason.SUPERSEDED


async def test_renewals_per_hour_are_limited(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-rate")
    for _ in range(2):
        done = await registry.record_renewal(request(authority, current, max_renewals=2))
        await registry.activate_renewal(done.record.serial, device_id="r-rate", actor="t", via="confirm")
        current = await registry.get_certificate(done.record.serial)
    limited = await refused(registry, request(authority, current, max_renewals=2))
    assert limited.code is RefusalCode.RATE_LIMITED and 0 < (limited.retry_after or 0) <= 3600


async def test_before_the_window_only_an_operator_order_lets_a_device_renew(authority: Authority,
                                                                            registry: Registry) -> None:
    current = await provision(authority, "r-window")
    opens = cert_time(now_utc() + timedelta(days=100))
    early = await refused(registry, request(authority, current, window_opens=opens))
    assert early.code is RefusalCode.OUTSIDE_WINDOW
    assert 99 * 86400 < (early.retry_after or 0) <= 100 * 86400 + 1
    orders, skipped = await registry.order_rotations(["r-window", "nobody"], actor="alice")
    assert [o.device_id for o in orders] == ["r-window"] and orders[0].serial == current.serial
    assert skipped == {"nobody": "unknown device"}
    done = await registry.record_renewal(request(authority, current, window_opens=opens))
    assert done.trigger == "operator"
    activation = await registry.activate_renewal(done.record.serial, device_id="r-window", actor="t", via="confirm")
    assert activation.ordered and await registry.open_order("r-window") is None  # the order is closed


async def test_a_request_id_is_accepted_once(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-replay")
    first = request(authority, current)
    await registry.record_renewal(first)
    replayed = await refused(registry, first)
    assert replayed.code is RefusalCode.REPLAYED


@pytest.mark.parametrize("change", ["suspend", "revoke"])
async def test_a_device_not_active_cannot_renew(authority: Authority, registry: Registry, change: str) -> None:
    current = await provision(authority, f"r-{change}")
    renewal = request(authority, current)
    if change == "suspend":
        await registry.suspend(current.device_id, actor="alice")
        assert (await refused(registry, renewal)).code is RefusalCode.DEVICE_NOT_ACTIVE
    else:
        await registry.revoke(current.device_id, RevocationReason.KEY_COMPROMISE, actor="alice")
        assert (await refused(registry, renewal)).code is RefusalCode.DEVICE_NOT_ACTIVE


async def test_only_the_devices_active_unexpired_certificate_can_be_renewed(authority: Authority,
                                                                           registry: Registry) -> None:
    current = await provision(authority, "r-current")
    stranger = await provision(authority, "r-stranger")
    wrong_device = await refused(registry, request(authority, current, current_serial=stranger.serial))
    assert wrong_device.code is RefusalCode.NOT_CURRENT_CERTIFICATE
    await registry.revoke_certificate(current.serial, RevocationReason.SUPERSEDED, actor="t")
    assert (await refused(registry, request(authority, current))).code is RefusalCode.NOT_CURRENT_CERTIFICATE
    old = await authority.issue(make_csr(generate_private_key("p256")), "r-expired", actor="t",
                                now=now_utc() - timedelta(days=400))
    assert (await refused(registry, request(authority, old.record))).code is RefusalCode.CERTIFICATE_EXPIRED


async def test_activation_supersedes_in_one_transaction(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-activate")
    done = await registry.record_renewal(request(authority, current))
    mark = await registry.last_event_id()
    activation = await registry.activate_renewal(done.record.serial, device_id="r-activate", actor="t",
                                                 via="confirm", request_id="c-1")
    assert activation.certificate.status is CertificateStatus.ACTIVE and not activation.already
    assert activation.superseded is not None and activation.superseded.serial == current.serial
    events = await registry.events(after_id=mark)
    assert [e.kind for e in events] == ["certificate.activated", "certificate.revoked"]
    assert len({e.ts for e in events}) == 1  # one transaction
    assert events[1].data == {"serial": current.serial, "fingerprint": current.fingerprint, "reason": "superseded",
                              "superseded_by": done.record.serial, "via": "confirm"}
    again = await registry.activate_renewal(done.record.serial, device_id="r-activate", actor="t", via="connect")
    assert again.already
    with pytest.raises(RenewalRefused) as replay:
        await registry.activate_renewal(done.record.serial, device_id="r-activate", actor="t", via="confirm",
                                        request_id="c-1")
    assert replay.value.code is RefusalCode.REPLAYED
    statuses = {c.serial: c.status for c in await registry.certificates_of("r-activate")}
    assert list(statuses.values()).count(CertificateStatus.ACTIVE) == 1


async def test_what_cannot_be_activated(authority: Authority, registry: Registry) -> None:
    current = await provision(authority, "r-noact")
    with pytest.raises(RenewalRefused) as provisioned:  # a certificate that is no renewal
        await registry.activate_renewal(current.serial, device_id="r-noact", actor="t", via="confirm")
    assert provisioned.value.code is RefusalCode.NOT_CURRENT_CERTIFICATE
    done = await registry.record_renewal(request(authority, current))
    with pytest.raises(RenewalRefused) as other_device:
        await registry.activate_renewal(done.record.serial, device_id="r-someone", actor="t", via="confirm")
    assert other_device.value.code is RefusalCode.NOT_CURRENT_CERTIFICATE
    with pytest.raises(RenewalRefused) as too_old:
        await registry.activate_renewal(done.record.serial, device_id="r-noact", actor="t", via="confirm",
                                        max_age=timedelta(0))
    assert too_old.value.code is RefusalCode.RENEWAL_EXPIRED
    await registry.suspend("r-noact", actor="alice")
    with pytest.raises(RenewalRefused) as suspended:
        await registry.activate_renewal(done.record.serial, device_id="r-noact", actor="t", via="confirm")
    assert suspended.value.code is RefusalCode.DEVICE_NOT_ACTIVE
    await registry.resume("r-noact", actor="alice")
    await registry.expire_pending(now_utc() + timedelta(seconds=1), RevocationReason.SUPERSEDED, actor="sweep")
    with pytest.raises(RenewalRefused) as expired:
        await registry.activate_renewal(done.record.serial, device_id="r-noact", actor="t", via="confirm")
    assert expired.value.code is RefusalCode.RENEWAL_EXPIRED
    assert (await registry.get_certificate(current.serial)).status is CertificateStatus.ACTIVE  # kept


async def test_orders_expiring_and_request_ids_are_kept_and_pruned(authority: Authority, registry: Registry) -> None:
    await provision(authority, "r-list-a")
    await authority.issue(make_csr(generate_private_key("p256")), "r-list-b", actor="t",
                          now=now_utc() - timedelta(days=350))
    soon = await registry.expiring(now_utc() + timedelta(days=30))
    assert [e.device.device_id for e in soon] == ["r-list-b"]
    first, _ = await registry.order_rotations(["r-list-a"], actor="alice")
    again, _ = await registry.order_rotations(["r-list-a"], actor="bob")  # an order is renewed, not doubled
    assert [o.actor for o in await registry.open_orders()] == ["bob"]
    assert again[0].requested_at >= first[0].requested_at
    current = (await registry.certificates_of("r-list-a"))[0]
    await registry.record_renewal(request(authority, current, request_id="old-id"))
    assert await registry.prune_rotation_requests(now_utc() + timedelta(seconds=1)) == 1
    assert await registry.active_devices_of_profile("default") == ["r-list-a", "r-list-b"]


async def test_a_registry_of_schema_2_gains_the_rotation_columns(home: Home, authority: Authority,
                                                                 registry: Registry) -> None:
    if not registry.location.endswith(".db"):
        pytest.skip("the migration is the same SQL on PostgreSQL; this checks an old SQLite file")
    current = await provision(authority, "r-old")
    await registry.close()
    with sqlite3.connect(home.registry_db) as conn:  # what a registry written before rotation looks like
        for statement in ("DROP TABLE rotation_orders", "DROP TABLE rotation_requests",
                          "DROP INDEX certificates_renewal", "ALTER TABLE certificates DROP COLUMN renewal_of",
                          "PRAGMA user_version = 2"):
            conn.execute(statement)
    async with await open_registry(home.registry_db) as reopened:
        record = await reopened.get_certificate(current.serial)
        assert record.renewal_of is None and record.status is CertificateStatus.ACTIVE
        assert await reopened.open_orders() == []


async def test_the_renewers_reads_answer_each_lookup_of_a_batch(authority: Authority, registry: Registry) -> None:
    """Concurrent lookups are gathered into one query: each still gets its own answer, None for a stranger."""
    currents = [await provision(authority, f"r-read-{n}") for n in range(5)]
    renewal = await registry.record_renewal(request(authority, currents[0]))
    found = await asyncio.gather(*(registry.renewal_credential(c.fingerprint) for c in currents),
                                 registry.renewal_credential("00" * 32))
    assert [f.certificate.serial if f else None for f in found] == [c.serial for c in currents] + [None]
    assert all(f.device.device_id == c.device_id for f, c in zip(found, currents, strict=False) if f)
    renewals = await asyncio.gather(registry.renewal_certificate(renewal.record.serial),
                                    registry.renewal_certificate(currents[1].serial),  # not a renewal
                                    registry.renewal_certificate("ffff"))
    assert [r.serial if r else None for r in renewals] == [renewal.record.serial, None, None]
    await registry.order_rotations(["r-read-2"], actor="alice")
    orders = await asyncio.gather(*(registry.open_order(c.device_id) for c in currents))
    assert [o.serial if o else None for o in orders] == [None, None, currents[2].serial, None, None]
