"""Admission control before authentication: who may make the broker hold a connection it cannot yet name.

An unauthenticated connection costs the broker a socket, a TLS state and a
handshake's CPU. The hardening review held 1,100 idle sockets from one address
and locked every device out, because one global pending limit served all
sources first come, first served. :class:`Throttle` bounds what any one source
can hold and keeps the rest for everyone else:

* **Per source.** At most ``max_pending_per_address`` connections in the
  handshake or waiting for CONNECT per address, ``max_pending_per_network``
  per /24 (IPv4) or /64 (IPv6). Over that, up to ``max_waiting_per_address``
  more are *queued*: accepted but not read (no TLS work, a socket's worth of
  memory), and started in arrival order as the source's own slots free up,
  for up to ``wait_timeout``. So a reconnect storm from one NAT address waits
  its turn instead of being refused, and an idle flood fills only its own
  queue: when all queues together hold ``max_waiting``, a newcomer from a
  shorter queue evicts the oldest waiter of the longest. Past that, a new
  connection is closed at once.
* **A fair share of the total.** When ``max_pending`` are pending, a newcomer
  from a source holding fewer than the biggest holder evicts that holder's
  oldest pending connection; no source can monopolise the total.
* **Only failures cost.** Every connection that ends without authenticating
  (closed early, failed handshake, refused certificate, deadline, eviction)
  takes a token from its source's bucket (``failure_burst`` tokens, refilled
  at ``failures_per_second``); a source with an empty bucket is refused at
  once. A flood of connections that never authenticate runs dry, while a
  reconnect storm of valid certificates from one NAT address is limited only
  by how fast the broker can admit them.
* **Deadlines that tighten under pressure.** The handshake and the first
  CONNECT each have a deadline that shrinks from its configured value at half
  load to ``min_timeout`` at full load (:meth:`IntakeLimits.timeout`), and
  :meth:`Throttle.reap` applies the *current* deadline to connections already
  waiting.

Pure bookkeeping with an injectable clock: the gate calls it, and closes and
audits what it says.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from iotauth.limits import IntakeLimits

MAX_BUCKETS = 65_536


class Phase(StrEnum):
    QUEUED = "queued"
    HANDSHAKE = "handshake"
    CONNECT = "connect"


class Refusal(StrEnum):
    """Why a connection was closed before authentication (audit reasons, summarised per source)."""

    ADDRESS = "too-many-pending-address"
    NETWORK = "too-many-pending-network"
    TOTAL = "too-many-pending"
    RATE = "connection-rate"
    EVICTED = "evicted-fair-share"
    QUEUE_TIMEOUT = "queue-timeout"
    HANDSHAKE_TIMEOUT = "tls-timeout"
    CONNECT_TIMEOUT = "connect-timeout"


@dataclass(eq=False)
class Pending:
    """One connection the broker cannot name yet. ``start`` is called when a queued one gets its slot."""

    address: str
    network: str
    close: Callable[[Refusal], None]
    start: Callable[[], None]
    phase: Phase = Phase.HANDSHAKE
    since: float = 0.0
    done: bool = False


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class ThrottleStats:
    refused: dict[str, int] = field(default_factory=dict)
    admitted: int = 0
    queued: int = 0

    def count(self, reason: Refusal) -> None:
        self.refused[reason.value] = self.refused.get(reason.value, 0) + 1


def network_of(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) an address belongs to; the address itself if it is not an IP."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((int(ip) & 0xFFFFFF00, 24)))
    if ip.ipv4_mapped is not None:
        return network_of(str(ip.ipv4_mapped))
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class _Ranking:
    """How many each key holds, with a key holding the most at hand in O(1) (counts never exceed ``cap``)."""

    def __init__(self, cap: int) -> None:
        self._keys: list[set[str]] = [set() for _ in range(cap + 1)]
        self.top = 0

    def move(self, key: str, old: int, new: int) -> None:
        if old:
            self._keys[old].discard(key)
        if new:
            self._keys[new].add(key)
        self.top = max(self.top, new)
        while self.top and not self._keys[self.top]:
            self.top -= 1

    def biggest(self) -> str:
        return next(iter(self._keys[self.top]))


class Throttle:
    """See the module docstring."""

    def __init__(self, limits: IntakeLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._by_address: dict[str, dict[Pending, None]] = {}
        self._by_network: dict[str, int] = {}
        self._holders = _Ranking(limits.max_pending_per_address)
        self._waiters = _Ranking(limits.max_waiting_per_address)
        self._phases: dict[Phase, OrderedDict[Pending, None]] = {p: OrderedDict() for p in Phase}
        self._queues: dict[str, OrderedDict[Pending, None]] = {}
        self._queued_in: dict[str, dict[str, None]] = {}  # network -> addresses with a queue
        self._buckets: dict[str, _Bucket] = {}
        self.pending = 0
        self.queued = 0
        self.stats = ThrottleStats()

    # -- arrivals and departures -----------------------------------------------------------

    def arrive(self, address: str, close: Callable[[Refusal], None], start: Callable[[], None]) -> Pending | Refusal:
        """A new TCP connection from ``address``: track it (active or queued), or say why it must close at once.

        A returned :class:`Pending` in :attr:`Phase.QUEUED` must not be read until its ``start`` is called.
        """
        limits = self.limits
        network = network_of(address)
        held = len(self._by_address.get(address, ()))
        crowded = (held >= limits.max_pending_per_address
                   or self._by_network.get(network, 0) >= limits.max_pending_per_network)
        if crowded:
            queue = self._queues.get(address)
            waiting = len(queue) if queue is not None else 0
            if waiting >= limits.max_waiting_per_address:
                return self._refuse(Refusal.ADDRESS if held >= limits.max_pending_per_address else Refusal.NETWORK)
            if self.queued >= limits.max_waiting:
                if self._waiters.top <= waiting + 1:
                    return self._refuse(Refusal.TOTAL)
                self._evict_longest_queue()
        if not self._has_budget(address if ":" not in address else network):
            return self._refuse(Refusal.RATE)
        pending = Pending(address, network, close, start, Phase.HANDSHAKE, self._clock())
        if crowded:
            self._enqueue(pending)
            return pending
        if self.pending >= limits.max_pending:
            if self._holders.top <= held + 1:
                return self._refuse(Refusal.TOTAL)
            self._evict_from_biggest()
        self._add(pending)
        return pending

    def advance(self, pending: Pending) -> None:
        """The handshake is done: the connection now waits for its CONNECT (a fresh deadline)."""
        if pending.done or pending.phase is not Phase.HANDSHAKE:
            return
        del self._phases[Phase.HANDSHAKE][pending]
        pending.phase, pending.since = Phase.CONNECT, self._clock()
        self._phases[Phase.CONNECT][pending] = None

    def leave(self, pending: Pending, *, admitted: bool) -> None:
        """The connection is admitted (its token is refunded) or gone; stop tracking it."""
        if pending.done:
            return
        if pending.phase is Phase.QUEUED:
            self._unqueue(pending)
        else:
            self._remove(pending)
            self._promote(pending)
        if admitted:
            self.stats.admitted += 1
        else:
            self._charge(pending)

    def reap(self) -> int:
        """Close every connection past its phase's *current* deadline; return how many."""
        now = self._clock()
        closed = 0
        limits = self.limits
        for phase, base, refusal in ((Phase.QUEUED, limits.wait_timeout, Refusal.QUEUE_TIMEOUT),
                                     (Phase.HANDSHAKE, limits.handshake_timeout, Refusal.HANDSHAKE_TIMEOUT),
                                     (Phase.CONNECT, limits.connect_timeout, Refusal.CONNECT_TIMEOUT)):
            waiting = self._phases[phase]
            while waiting:
                oldest = next(iter(waiting))
                load = self.queued / limits.max_waiting if phase is Phase.QUEUED else self.pending / limits.max_pending
                if now - oldest.since < limits.timeout(base, load):
                    break
                if phase is Phase.QUEUED:
                    self._unqueue(oldest)
                else:
                    self._remove(oldest)
                    self._promote(oldest)
                self._charge(oldest)
                self.stats.count(refusal)
                oldest.close(refusal)
                closed += 1
        if len(self._buckets) > MAX_BUCKETS // 2:
            self._forget_full_buckets(now)
        return closed

    def by_phase(self) -> dict[Phase, int]:
        """Connections not yet authenticated, by where they wait (metrics)."""
        return {phase: len(waiting) for phase, waiting in self._phases.items()}

    def held_by(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    # -- bookkeeping -----------------------------------------------------------------------

    def _refuse(self, reason: Refusal) -> Refusal:
        self.stats.count(reason)
        return reason

    def _add(self, pending: Pending) -> None:
        group = self._by_address.setdefault(pending.address, {})
        self._holders.move(pending.address, len(group), len(group) + 1)
        group[pending] = None
        self._by_network[pending.network] = self._by_network.get(pending.network, 0) + 1
        self._phases[pending.phase][pending] = None
        self.pending += 1

    def _remove(self, pending: Pending) -> None:
        pending.done = True
        group = self._by_address[pending.address]
        del group[pending]
        self._holders.move(pending.address, len(group) + 1, len(group))
        if not group:
            del self._by_address[pending.address]
        count = self._by_network[pending.network] - 1
        if count:
            self._by_network[pending.network] = count
        else:
            del self._by_network[pending.network]
        self._phases[pending.phase].pop(pending, None)
        self.pending -= 1

    def _evict_from_biggest(self) -> None:
        victim = next(iter(self._by_address[self._holders.biggest()]))
        self._remove(victim)
        self._charge(victim)
        self.stats.count(Refusal.EVICTED)
        victim.close(Refusal.EVICTED)

    def _enqueue(self, pending: Pending) -> None:
        pending.phase = Phase.QUEUED
        queue = self._queues.setdefault(pending.address, OrderedDict())
        queue[pending] = None
        self._waiters.move(pending.address, len(queue) - 1, len(queue))
        self._queued_in.setdefault(pending.network, {})[pending.address] = None
        self._phases[Phase.QUEUED][pending] = None
        self.queued += 1
        self.stats.queued += 1

    def _evict_longest_queue(self) -> None:
        victim = next(iter(self._queues[self._waiters.biggest()]))
        self._unqueue(victim)
        self._charge(victim)
        self.stats.count(Refusal.EVICTED)
        victim.close(Refusal.EVICTED)

    def _unqueue(self, pending: Pending) -> None:
        pending.done = True
        queue = self._queues[pending.address]
        del queue[pending]
        self._waiters.move(pending.address, len(queue) + 1, len(queue))
        if not queue:
            del self._queues[pending.address]
            addresses = self._queued_in[pending.network]
            del addresses[pending.address]
            if not addresses:
                del self._queued_in[pending.network]
        del self._phases[Phase.QUEUED][pending]
        self.queued -= 1

    def _promote(self, departed: Pending) -> None:
        """A slot freed: start the oldest queued connection of the same address, else of the same network."""
        if self.pending >= self.limits.max_pending:
            return
        candidates = [departed.address, *self._queued_in.get(departed.network, ())]
        for address in candidates:
            queue = self._queues.get(address)
            if not queue:
                continue
            oldest = next(iter(queue))
            if (len(self._by_address.get(address, ())) >= self.limits.max_pending_per_address
                    or self._by_network.get(oldest.network, 0) >= self.limits.max_pending_per_network):
                continue
            self._unqueue(oldest)
            oldest.done = False
            oldest.phase, oldest.since = Phase.HANDSHAKE, self._clock()
            self._add(oldest)
            oldest.start()
            return

    def _bucket(self, key: str, now: float) -> _Bucket:
        limits = self.limits
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full_buckets(now)
            bucket = self._buckets[key] = _Bucket(float(limits.failure_burst), now)
        refill = (now - bucket.stamp) * limits.failures_per_second
        bucket.tokens = min(float(limits.failure_burst), bucket.tokens + refill)
        bucket.stamp = now
        return bucket

    def _has_budget(self, key: str) -> bool:
        return self._bucket(key, self._clock()).tokens >= 1.0

    def _charge(self, pending: Pending) -> None:
        """A connection ended without authenticating: it costs its source one token."""
        bucket = self._bucket(pending.address if ":" not in pending.address else pending.network, self._clock())
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def _forget_full_buckets(self, now: float) -> None:
        """Buckets that have refilled carry no information: drop them (bounded memory under address churn)."""
        limits = self.limits
        full = [key for key, b in self._buckets.items()
                if b.tokens + (now - b.stamp) * limits.failures_per_second >= limits.failure_burst]
        for key in full:
            del self._buckets[key]


__all__ = ["Pending", "Phase", "Refusal", "Throttle", "network_of"]
