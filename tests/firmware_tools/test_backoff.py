"""The reference reconnect policy: full jitter, doubling ceilings, longer after busy, the cap after refusals."""

from __future__ import annotations

import random

from firmware_tools.backoff import Backoff, Outcome, outcome_of


class Ceiling(random.Random):
    """A "random" source that always draws the top of the range, to read the ceilings."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_ceilings_double_up_to_the_cap_and_reset_on_success() -> None:
    backoff = Backoff(base=1.0, cap=10.0, rng=Ceiling())
    assert [backoff.delay(Outcome.NETWORK) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay(Outcome.CONNECTED) == 0.0
    assert backoff.delay(Outcome.NETWORK) == 1.0


def test_busy_doubles_twice_and_refused_waits_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=Ceiling())
    assert [backoff.delay(Outcome.BUSY) for _ in range(3)] == [2.0, 8.0, 32.0]
    assert backoff.delay(Outcome.REFUSED) == 60.0


def test_delays_are_jittered_over_the_whole_range() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(7))
    draws = []
    for _ in range(200):
        backoff.attempt = 3  # ceiling 8 s for the next NETWORK outcome
        draws.append(backoff.delay(Outcome.NETWORK))
    assert 0.0 <= min(draws) < 1.0 and 7.0 < max(draws) <= 8.0  # spread from ~0 to the ceiling, never above


def test_outcomes_of_return_codes() -> None:
    assert outcome_of(0) is Outcome.CONNECTED
    assert outcome_of(None) is Outcome.BUSY and outcome_of(3) is Outcome.BUSY
    assert all(outcome_of(code) is Outcome.REFUSED for code in (1, 2, 4, 5))
