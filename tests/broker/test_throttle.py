"""Admission control before authentication, as pure bookkeeping with a pinned clock."""

from __future__ import annotations

import pytest

from iotauth.broker.throttle import Pending, Phase, Refusal, Throttle, network_of
from iotauth.limits import IntakeLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**limits: object) -> tuple[Throttle, Clock, list[tuple[str, Refusal]]]:
    limits = {"max_waiting_per_address": 1, "max_waiting": 1, **limits}  # tiny queues unless a test wants more
    clock = Clock()
    closed: list[tuple[str, Refusal]] = []
    throttle = Throttle(IntakeLimits(**limits), clock)  # type: ignore[arg-type]
    return throttle, clock, closed


def arrive(throttle: Throttle, address: str, closed: list[tuple[str, Refusal]],
           started: list[str] | None = None) -> Pending | Refusal:
    return throttle.arrive(address, lambda reason, a=address: closed.append((a, reason)),
                           lambda a=address: started.append(a) if started is not None else None)


def test_networks() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.9") == "192.0.2.0/24"
    assert network_of("not-an-ip") == "not-an-ip"


def test_one_address_holds_at_most_its_cap_then_waits_then_is_refused() -> None:
    throttle, _, closed = make(max_pending_per_address=3, max_waiting_per_address=2, max_waiting=10)
    started: list[str] = []
    held = [arrive(throttle, "10.0.0.1", closed, started) for _ in range(3)]
    assert all(isinstance(p, Pending) and p.phase is Phase.HANDSHAKE for p in held)
    waiting = [arrive(throttle, "10.0.0.1", closed, started) for _ in range(2)]
    assert all(isinstance(p, Pending) and p.phase is Phase.QUEUED for p in waiting)
    assert arrive(throttle, "10.0.0.1", closed, started) is Refusal.ADDRESS  # its queue is full too
    assert isinstance(arrive(throttle, "10.0.0.2", closed), Pending)  # another address is unaffected
    assert (throttle.pending, throttle.queued) == (4, 2)
    throttle.leave(held[0], admitted=True)  # a slot frees: the oldest waiting connection starts, in order
    assert started == ["10.0.0.1"] and waiting[0].phase is Phase.HANDSHAKE and waiting[1].phase is Phase.QUEUED
    assert (throttle.pending, throttle.queued) == (4, 1)
    throttle.leave(waiting[1], admitted=False)  # a waiting client that gives up just leaves the queue
    assert (throttle.pending, throttle.queued) == (4, 0)


def test_one_network_holds_at_most_its_cap_and_its_addresses_take_turns() -> None:
    throttle, _, closed = make(max_pending_per_address=2, max_pending_per_network=3, max_waiting_per_address=4,
                               max_waiting=10)
    started: list[str] = []
    active = [arrive(throttle, f"10.0.0.{n}", closed, started) for n in (1, 1, 2)]
    assert all(isinstance(p, Pending) and p.phase is Phase.HANDSHAKE for p in active)
    queued = arrive(throttle, "10.0.0.3", closed, started)
    assert isinstance(queued, Pending) and queued.phase is Phase.QUEUED
    assert isinstance(arrive(throttle, "10.0.1.3", closed), Pending)  # another network is unaffected
    throttle.leave(active[0], admitted=False)  # 10.0.0.1 freed a network slot: 10.0.0.3's turn
    assert started == ["10.0.0.3"] and queued.phase is Phase.HANDSHAKE


def test_waiting_connections_have_a_deadline_of_their_own() -> None:
    throttle, clock, closed = make(max_pending_per_address=1, max_waiting_per_address=5, max_waiting=5,
                                   handshake_timeout=5.0, connect_timeout=60.0, wait_timeout=20.0)
    holder = arrive(throttle, "10.0.0.1", closed)
    assert isinstance(holder, Pending)
    throttle.advance(holder)  # it holds the address's only slot, waiting for its CONNECT (60 s)
    waiting = arrive(throttle, "10.0.0.1", closed)
    assert isinstance(waiting, Pending) and waiting.phase is Phase.QUEUED
    clock.now += 19.0
    assert throttle.reap() == 0  # the handshake deadline (5 s) does not apply to a waiter
    clock.now += 2.0
    assert throttle.reap() == 1 and closed == [("10.0.0.1", Refusal.QUEUE_TIMEOUT)]
    assert (throttle.pending, throttle.queued) == (1, 0)


def test_when_all_queues_are_full_the_longest_gives_way() -> None:
    throttle, _, closed = make(max_pending_per_address=1, max_waiting_per_address=10, max_waiting=6,
                               max_pending_per_network=100)
    for address in ("10.0.0.1", "10.0.1.1"):
        assert isinstance(arrive(throttle, address, closed), Pending)  # each holds its one slot
    flood = [arrive(throttle, "10.0.0.1", closed) for _ in range(6)]  # the attacker fills the waiting total
    assert all(isinstance(p, Pending) and p.phase is Phase.QUEUED for p in flood)
    storm = arrive(throttle, "10.0.1.1", closed)  # a NAT storm's next device still gets in line
    assert isinstance(storm, Pending) and storm.phase is Phase.QUEUED
    assert closed == [("10.0.0.1", Refusal.EVICTED)] and flood[0].done
    assert throttle.queued == 6
    for _ in range(2):
        assert isinstance(arrive(throttle, "10.0.1.1", closed), Pending)
    assert [r for _, r in closed].count(Refusal.EVICTED) == 3
    # queues of 3 and 3: nobody is longer than the newcomer's would be, so the newcomer is refused
    assert arrive(throttle, "10.0.1.1", closed) is Refusal.TOTAL


def test_a_storm_from_one_address_waits_its_turn_instead_of_being_refused() -> None:
    throttle, _, closed = make(max_pending_per_address=64, max_waiting_per_address=5000, max_waiting=5000)
    started: list[str] = []
    storm = [arrive(throttle, "100.64.0.1", closed, started) for _ in range(3000)]
    assert all(isinstance(p, Pending) for p in storm) and closed == []
    for pending in storm:  # each, once started, authenticates and leaves; the next one starts
        assert isinstance(pending, Pending)
        assert pending.phase is not Phase.QUEUED, "started out of order"
        throttle.leave(pending, admitted=True)
    assert throttle.stats.admitted == 3000 and len(started) == 3000 - 64 and not throttle.stats.refused


def test_failures_run_the_bucket_dry() -> None:
    throttle, clock, closed = make(failure_burst=5, failures_per_second=1.0)
    for _ in range(5):
        pending = arrive(throttle, "10.0.0.1", closed)
        assert isinstance(pending, Pending)
        throttle.leave(pending, admitted=False)
    assert arrive(throttle, "10.0.0.1", closed) is Refusal.RATE
    clock.now += 1.0  # one token back per second
    assert isinstance(arrive(throttle, "10.0.0.1", closed), Pending)


def test_a_storm_of_valid_devices_behind_one_address_is_never_rate_limited() -> None:
    throttle, _, closed = make(failure_burst=5, failures_per_second=0.001, max_pending_per_address=64)
    for _ in range(10_000):  # each one authenticates: it costs nothing
        pending = arrive(throttle, "100.64.0.1", closed)
        assert isinstance(pending, Pending)
        throttle.leave(pending, admitted=True)
    assert throttle.stats.admitted == 10_000 and not throttle.stats.refused


def test_no_source_monopolises_the_total() -> None:
    throttle, _, closed = make(max_pending=10, max_pending_per_address=8, max_pending_per_network=100)
    hog = [arrive(throttle, "10.0.0.1", closed) for _ in range(8)]
    other = [arrive(throttle, "10.0.1.1", closed) for _ in range(2)]
    assert all(isinstance(p, Pending) for p in hog + other) and throttle.pending == 10
    newcomer = arrive(throttle, "10.0.2.1", closed)
    assert isinstance(newcomer, Pending)
    assert closed == [("10.0.0.1", Refusal.EVICTED)]  # the biggest holder's oldest connection made room
    assert hog[0].done and not hog[1].done
    assert throttle.held_by("10.0.0.1") == 7 and throttle.pending == 10


def test_the_biggest_holder_cannot_evict_its_peers() -> None:
    throttle, _, closed = make(max_pending=4, max_pending_per_address=4, max_pending_per_network=100)
    for address in ("10.0.0.1", "10.0.0.1", "10.0.1.1", "10.0.1.1"):
        assert isinstance(arrive(throttle, address, closed), Pending)
    assert arrive(throttle, "10.0.0.1", closed) is Refusal.TOTAL  # holds as much as anyone: no eviction
    assert closed == []


def test_deadlines_shrink_under_pressure_and_apply_to_those_already_waiting() -> None:
    throttle, clock, closed = make(max_pending=100, max_pending_per_address=100, max_pending_per_network=100,
                                   handshake_timeout=10.0, connect_timeout=10.0, min_timeout=1.0)
    early = arrive(throttle, "10.0.0.1", closed)
    assert isinstance(early, Pending)
    clock.now += 5.0
    assert throttle.reap() == 0  # at 1 % load the deadline is the full 10 s
    for _ in range(99):
        arrive(throttle, "10.0.0.2", closed)
    assert throttle.reap() == 1  # at full load the deadline is 1 s: the 5-second-old connection goes
    assert closed == [("10.0.0.1", Refusal.HANDSHAKE_TIMEOUT)]
    clock.now += 2.0  # each reaped connection relieves the pressure: reaping stops where 2 s fits the deadline
    assert throttle.reap() == 5 and throttle.pending == 94
    clock.now += 10.0
    assert throttle.reap() == 94 and throttle.pending == 0


def test_the_connect_phase_has_its_own_fresh_deadline() -> None:
    throttle, clock, closed = make(handshake_timeout=5.0, connect_timeout=2.0, min_timeout=1.0)
    pending = arrive(throttle, "10.0.0.1", closed)
    assert isinstance(pending, Pending)
    clock.now += 4.0
    throttle.advance(pending)
    assert pending.phase is Phase.CONNECT
    clock.now += 1.5
    assert throttle.reap() == 0
    clock.now += 1.0
    assert throttle.reap() == 1 and closed == [("10.0.0.1", Refusal.CONNECT_TIMEOUT)]


@pytest.mark.parametrize("address", ["2001:db8::1", "2001:db8::2"])
def test_ipv6_failures_are_counted_per_64(address: str) -> None:
    throttle, _, closed = make(failure_burst=1, failures_per_second=0.001)
    first = arrive(throttle, "2001:db8::99", closed)
    assert isinstance(first, Pending)
    throttle.leave(first, admitted=False)
    assert arrive(throttle, address, closed) is Refusal.RATE  # a new address in the same /64 shares the budget


def test_bucket_memory_is_bounded_under_address_churn() -> None:
    throttle, clock, closed = make(failure_burst=2, failures_per_second=100.0)
    for n in range(70_000):
        pending = arrive(throttle, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", closed)
        assert isinstance(pending, Pending)
        throttle.leave(pending, admitted=False)
        clock.now += 0.001
    assert len(throttle._buckets) <= 65_536
