"""The push follower on a real registry: persisted cursor, replay, retries, loud refusals, audit.

The target here is a recorder of iotauth's own :class:`PushTarget` interface that
fails on command; what EMQX answers is tested in ``tests/http/test_push.py``
against EMQX's contract.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from cryptography import x509

from iotauth.authority import Authority
from iotauth.errors import PushRejected, PushUnauthorized, PushUnavailable
from iotauth.export.follower import Backoff, PushFollower, PushState
from iotauth.pki.keys import PrivateKey
from iotauth.registry import AuditEvent, EventKind, Registry, RevocationReason
from iotauth.registry.events import EMQX_KICKS

CsrFactory = Callable[..., tuple[PrivateKey, x509.CertificateSigningRequest]]


@dataclass
class Recorder:
    """A :class:`~iotauth.export.follower.PushTarget` that records calls and raises what the test queues."""

    failures: list[Exception] = field(default_factory=list)
    applied: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    prepared: int = 0
    closed: bool = False

    @property
    def name(self) -> str:
        return "test"

    def relevant(self, event: AuditEvent) -> bool:
        return event.kind in EMQX_KICKS

    async def prepare(self, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        self.prepared += 1
        return {"prepared": len(events)}

    async def apply(self, device_id: str, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        if self.failures:
            raise self.failures.pop(0)
        self.applied.append((device_id, tuple(e.kind for e in events)))
        return {"kick": 204}

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Sleeps:
    """The follower's sleep, recorded instead of waited (STYLE 11: tests never sleep for backoff)."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def follower(registry: Registry, target: Recorder, sleeps: Sleeps | None = None, **options: float) -> PushFollower:
    return PushFollower(registry, target, backoff=Backoff(first=0.5, factor=2, cap=4), sleep=sleeps or Sleeps(),
                        **options)  # type: ignore[arg-type]


async def kinds(registry: Registry, prefix: str = "push.") -> list[tuple[str, str | None]]:
    return [(e.kind, e.device_id) for e in await registry.events() if e.kind.startswith(prefix)]


@pytest.fixture
async def devices(authority: Authority, csr_factory: CsrFactory) -> list[str]:
    names = ["d1", "d2", "d3"]
    for name in names:
        await authority.issue(csr_factory()[1], name, actor="op")
    return names


async def test_the_first_start_begins_at_the_end_of_the_feed(registry: Registry, devices: list[str]) -> None:
    await registry.revoke("d1", RevocationReason.KEY_COMPROMISE, actor="op")  # before the follower ever ran
    target = Recorder()
    push = follower(registry, target)
    head = await registry.last_event_id()
    assert await push.start() == head
    assert await registry.follower_cursor("push:test") == head
    assert await push.catch_up() > head  # its own push.started event
    assert target.applied == []
    assert await kinds(registry) == [("push.started", None)]


async def test_revocations_made_while_it_was_down_are_replayed_in_order(
    registry: Registry, devices: list[str]
) -> None:
    await follower(registry, Recorder()).catch_up()  # ran once, then stopped
    await registry.revoke("d2", RevocationReason.KEY_COMPROMISE, actor="op")
    await registry.suspend("d1", actor="op")
    target = Recorder()
    push = follower(registry, target)
    await push.catch_up()
    assert target.applied == [("d2", ("certificate.revoked", "device.revoked")), ("d1", ("device.suspended",))]
    assert await registry.follower_cursor("push:test") == push.cursor
    delivered = [e for e in await registry.events() if e.kind == EventKind.PUSH_DELIVERED]
    assert [(e.device_id, e.actor, e.data["answers"]) for e in delivered] == [
        ("d2", "push:test", {"prepared": 3, "kick": 204}),
        ("d1", "push:test", {"prepared": 3, "kick": 204}),
    ]
    again = Recorder()
    await follower(registry, again).catch_up()  # a third start: nothing left to replay
    assert again.applied == []


async def test_an_unreachable_broker_is_retried_with_backoff_and_nothing_is_skipped(
    registry: Registry, devices: list[str]
) -> None:
    push = follower(registry, target := Recorder(), sleeps := Sleeps())
    await push.start()
    await registry.revoke("d1", RevocationReason.KEY_COMPROMISE, actor="op")
    await registry.revoke("d2", RevocationReason.KEY_COMPROMISE, actor="op")
    cursor = push.cursor
    target.failures = [PushUnavailable(f"down {n}") for n in range(5)]
    await push.catch_up()
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 4.0]  # capped exponential backoff
    assert [d for d, _ in target.applied] == ["d1", "d2"]
    assert push.cursor is not None and cursor is not None and push.cursor > cursor
    failed = [e for e in await registry.events() if e.kind == EventKind.PUSH_FAILED]
    assert len(failed) == 1 and failed[0].data["state"] == "retrying"  # once per streak, from the 3rd attempt
    assert push.health.healthy and push.health.state is PushState.OK


async def test_refused_credentials_are_loud_and_unhealthy_until_they_work(
    registry: Registry, devices: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    push = follower(registry, target := Recorder(), sleeps := Sleeps())
    await push.start()
    await registry.revoke("d3", RevocationReason.KEY_COMPROMISE, actor="op")
    observed: list[tuple[bool, str]] = []

    async def watch(delay: float) -> None:
        observed.append((push.health.healthy, push.health.as_dict()["state"]))  # type: ignore[arg-type]
        await Sleeps.__call__(sleeps, delay)

    push.sleep = watch
    target.failures = [PushUnauthorized("HTTP 401 BAD_API_KEY_OR_SECRET")] * 4
    with caplog.at_level(logging.ERROR, logger="iotauth.push"):
        await push.catch_up()
    assert observed == [(False, "unauthorized")] * 4
    assert sum("REFUSED iotauth's credentials" in r.message for r in caplog.records) == 4
    failed = [e for e in await registry.events() if e.kind == EventKind.PUSH_FAILED]
    assert len(failed) == 1 and failed[0].data == {"target": "test", "error": "HTTP 401 BAD_API_KEY_OR_SECRET",
                                                   "state": "unauthorized"}
    assert failed[0].device_id == "d3"
    assert target.applied == [("d3", ("certificate.revoked", "device.revoked"))]
    assert push.health.healthy


async def test_a_request_refused_for_good_is_audited_and_skipped(registry: Registry, devices: list[str]) -> None:
    push = follower(registry, target := Recorder())
    await push.start()
    await registry.suspend("d1", actor="op")
    await registry.suspend("d2", actor="op")
    target.failures = [PushRejected("HTTP 400 BAD_REQUEST")]
    await push.catch_up()
    assert target.applied == [("d2", ("device.suspended",))]
    assert await kinds(registry) == [("push.started", None), ("push.failed", "d1"), ("push.delivered", "d2")]
    assert push.health.rejected == 1 and push.health.healthy


async def test_a_bug_in_a_target_does_not_end_the_follower(registry: Registry, devices: list[str]) -> None:
    push = follower(registry, target := Recorder())
    await push.start()
    await registry.suspend("d1", actor="op")
    target.failures = [KeyError("oops")]
    await push.catch_up()
    assert target.applied == [("d1", ("device.suspended",))]


async def test_long_retries_turn_unhealthy(registry: Registry, devices: list[str]) -> None:
    push = follower(registry, target := Recorder(), unhealthy_after=10.0)
    clock = [100.0]
    push.health.clock = lambda: clock[0]
    await push.start()
    await registry.suspend("d1", actor="op")
    states: list[bool] = []

    async def later(delay: float) -> None:
        clock[0] += 6
        states.append(push.health.healthy)

    push.sleep = later
    target.failures = [PushUnavailable("down")] * 3
    await push.catch_up()
    assert states == [True, False, False]  # failing for 6 s, then 12 s, 18 s
    assert push.health.healthy


async def test_run_follows_new_events_until_cancelled(registry: Registry, devices: list[str]) -> None:
    push = follower(registry, target := Recorder(), poll_interval=0.02)
    task = asyncio.create_task(push.run())
    for _ in range(500):
        if push.cursor is not None:
            break
        await asyncio.sleep(0.01)
    await registry.revoke("d1", RevocationReason.KEY_COMPROMISE, actor="op")
    for _ in range(500):
        if target.applied:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await push.aclose()
    assert target.applied == [("d1", ("certificate.revoked", "device.revoked"))] and target.closed


async def test_a_follower_that_stops_says_so(registry: Registry, devices: list[str]) -> None:
    """An error outside any retried call (here a target's ``relevant`` itself) ends the follower, loudly."""

    class Broken(Recorder):
        def relevant(self, event: AuditEvent) -> bool:
            raise RuntimeError("bug")

    push = follower(registry, Broken())
    await push.start()
    await registry.suspend("d1", actor="op")
    with pytest.raises(RuntimeError, match="bug"):
        await push.run()
    assert push.health.state is PushState.STOPPED and not push.health.healthy
    assert push.health.as_dict()["last_error"] == "bug"
