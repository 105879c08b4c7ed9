"""The admission caches the change feed keeps coherent: a cached answer is never older than the feed position."""

from __future__ import annotations

from datetime import UTC, datetime

from iotauth.broker.admission import CredentialCache, RecentRevocations
from iotauth.pki.verify import CertificateIdentity


def identity(device_id: str, fingerprint: str) -> CertificateIdentity:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    return CertificateIdentity(device_id, fingerprint, "1", moment, moment)


def test_a_lookup_that_raced_a_change_of_its_device_is_not_kept() -> None:
    cache = CredentialCache()
    cache.invalidate("dev", event_id=10, now=0.0)  # the feed applied event 10 about dev ...
    cache.store("dev", "fp-1", "default", cursor=9)  # ... while a lookup begun at position 9 was in flight
    assert cache.profile("fp-1") is None
    cache.store("dev", "fp-1", "default", cursor=10)
    assert cache.profile("fp-1") == "default"


def test_a_device_event_drops_every_certificate_of_the_device() -> None:
    cache = CredentialCache()
    cache.store("dev", "fp-1", "default", cursor=0)
    cache.store("dev", "fp-2", "default", cursor=0)
    cache.store("other", "fp-3", "ingest", cursor=0)
    cache.invalidate("dev", event_id=1, now=0.0)
    assert (cache.profile("fp-1"), cache.profile("fp-2"), cache.profile("fp-3")) == (None, None, "ingest")


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = CredentialCache(size=2)
    cache.store("a", "fp-a", "p", cursor=0)
    cache.store("b", "fp-b", "p", cursor=0)
    assert cache.profile("fp-a") == "p"  # a is now the most recent
    cache.store("c", "fp-c", "p", cursor=0)
    assert cache.last_profile("fp-b") is None and cache.last_profile("fp-a") == "p"


def test_old_change_markers_are_forgotten() -> None:
    cache = CredentialCache()
    cache.invalidate("dev", event_id=10, now=1.0)
    cache.forget_before(2.0)
    cache.store("dev", "fp-1", "default", cursor=0)
    assert cache.profile("fp-1") == "default"


def test_recent_revocations_win_over_an_admission_that_began_before_them() -> None:
    recent = RecentRevocations()
    recent.device("dev", event_id=5, now=1.0)
    recent.certificate("fp-x", event_id=7, now=1.0)
    assert recent.since(identity("dev", "fp-1"), cursor=4)
    assert not recent.since(identity("dev", "fp-1"), cursor=5)
    assert recent.since(identity("other", "fp-x"), cursor=6)
    recent.forget_before(2.0)
    assert not recent.since(identity("dev", "fp-x"), cursor=-1)
