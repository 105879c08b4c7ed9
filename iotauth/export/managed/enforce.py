"""Applying a plan to a managed Mosquitto, in the one order that keeps a kicked device out.

:class:`Enforcer` holds what the follower (:mod:`.follower`) needs to change
Mosquitto: the control connection, the CRL publisher and the registry reads
that say what a device should have. Its order, always:

1. a new CRL, proven in force with a canary;
2. withdrawals (kick, then delete the client) and kicks of sessions on
   revoked certificates;
3. grants, in messages sized so each stalls Mosquitto about ``grant_stall``
   seconds, with revocations committed meanwhile applied between them;
4. cleanup of stale roles.

**Renewals wait for their kick.** Mosquitto kicks by user name, which is the
device id: kicking the sessions of a superseded certificate would also close
a session the device had already opened with its renewal. So every CRL holds
(certificateHold) each renewal whose superseded certificate's sessions have
not been closed yet (:meth:`Enforcer.held`); once its device is kicked, a new
CRL lets the renewal in. The device's reconnect with its new certificate is
refused for those few milliseconds (about 40 ms here), not closed after it
got in. One window remains, and only for a device faster than the follower:
Mosquitto accepts a renewal until a CRL lists it as pending (about 0.1 s
after issuance here), so a session opened with it in that window, and
activated before the follower's next CRL, is closed by the kick once; the
device reconnects (the reference agent and ``examples/sensor.py`` do).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from iotauth.errors import InvalidIdentity, MosquittoUnavailable, NotFound
from iotauth.export.managed.control import DynsecControl
from iotauth.export.managed.crl import CrlProof, CrlPublisher
from iotauth.export.managed.cursor import FeedCursor, FollowerRecord
from iotauth.export.managed.state import (
    ClientState,
    DeviceRole,
    Plan,
    RoleState,
    desired_role,
    kick_commands,
    withdrawal_commands,
)
from iotauth.export.managed.stats import FollowerStats
from iotauth.identity import validate_device_id
from iotauth.policy import PolicySet
from iotauth.registry import AuditEvent, EventKind, Registry
from iotauth.registry.events import MOSQUITTO_KICKS, superseded_by

log = logging.getLogger("iotauth.mosquitto")

EXISTS, MISSING = ("already exists",), ("already exists", "not found")
URGENT = tuple(MOSQUITTO_KICKS)  # event kinds that overtake queued grants
HOLD_SCAN = 10_000  # certificate revocations read per CRL to find the renewals to hold


class Enforcer:
    """Change one Mosquitto: CRL first, then kicks, then grants (overtaken by revocations), then cleanup.

    Attributes:
        policies: the topic policies roles are made from (the follower swaps them on reload).
        unproven: devices withdrawn while no CRL was seen in force; kicked again once one is.
        overtaken: device -> the revocation event applied ahead of its own batch (not kicked twice).
        next_crl: when (loop time) the CRL must be published again.
        holding: supersession event id -> (device, renewal serial) held by the last CRL published.
        released: supersession events whose device was kicked since: their renewals are no longer held.
    """

    def __init__(self, *, registry: Registry, policies: PolicySet, control: DynsecControl, crl: CrlPublisher,
                 cursor: FeedCursor, grant_batch: int, grant_stall: float, withdraw_batch: int,
                 crl_refresh_every: float, crl_retry: float, stats: FollowerStats | None = None) -> None:
        self.registry = registry
        self.stats = stats or FollowerStats()
        self.policies = policies
        self.control = control
        self.crl = crl
        self.cursor = cursor
        self.grant_batch, self.grant_stall, self.withdraw_batch = grant_batch, grant_stall, withdraw_batch
        self.crl_refresh_every, self.crl_retry = crl_refresh_every, crl_retry
        self.unproven: set[str] = set()
        self.overtaken: dict[str, int] = {}
        self.per_command = 0.01  # seconds one saving command takes in this Mosquitto (measured as it runs)
        self.next_crl = 0.0
        self.holding: dict[int, tuple[str, str]] = {}
        self.released: set[int] = set()

    async def desired(self, devices: Iterable[str]) -> dict[str, DeviceRole]:
        """The roles these devices should have now (a device that is not active, or unknown, has none)."""
        desired: dict[str, DeviceRole] = {}
        for device_id in devices:
            try:
                role = desired_role(await self.registry.get_device(device_id), self.policies)
            except NotFound:
                role = None
            if role is not None:
                desired[device_id] = role
        return desired

    async def current(
        self, scope: Iterable[str], desired: Mapping[str, DeviceRole]
    ) -> tuple[dict[str, ClientState], dict[str, RoleState]]:
        """What Mosquitto holds for the devices in ``scope`` (their clients, their roles, the wanted roles)."""
        names = sorted(scope)
        wanted = sorted({r.rolename for r in desired.values()})
        answers = await self.control.query([{"command": "getClient", "username": n} for n in names]
                                           + [{"command": "getRole", "rolename": r} for r in wanted])
        clients = {n: ClientState.from_json(a["client"]) for n, a in zip(names, answers, strict=False) if a}
        roles = {r: RoleState.from_json(a["role"]) for r, a in zip(wanted, answers[len(names):], strict=True) if a}
        for client in clients.values():  # roles a client holds that we did not fetch: candidates for cleanup
            for rolename in client.roles:
                roles.setdefault(rolename, RoleState(rolename, frozenset()))
        return clients, roles

    async def converge(self, todo: Plan, kicks: Sequence[str], *, after: int) -> CrlProof | None:
        """A proven CRL, then withdrawals and kicks, then grants (overtaken by revocations), then cleanup.

        ``after``: the last event this work covers; revocations committed after
        it are applied between grant messages instead of waiting behind them.
        """
        proof = await self.publish_crl()
        if proof is None or not proof.proven:
            self.unproven.update(todo.withdraw)
        await self.withdraw(todo.withdraw, todo.existing)
        if kicks:
            await self.control.run(kick_commands(kicks), tolerate=MISSING)
        if self.release({*todo.withdraw, *kicks}, upto=after):
            await self.publish_crl()  # their renewals are let in from here on
        grants = todo.grants
        done = 0
        while done < len(grants):
            chunk = grants[done : done + self.grant_size()]
            started = time.monotonic()
            await self.control.run(chunk, batch=len(chunk), tolerate=EXISTS)
            self.per_command = 0.7 * self.per_command + 0.3 * (time.monotonic() - started) / len(chunk)
            done += len(chunk)
            if done < len(grants):
                await self.overtake(after)
        await self.control.run(todo.cleanup, batch=self.grant_size(), tolerate=MISSING)
        if self.release({*todo.created, *todo.changed}, upto=after):  # their grants kicked them
            await self.publish_crl()
        return proof

    def grant_size(self) -> int:
        """Commands per message, so one message stalls Mosquitto for about ``grant_stall`` seconds at most.

        Each saving command rewrites the whole state file: about 0.3 ms with a
        few devices, 65 ms or more with 10,000. A revocation waits for the
        message in progress, so at that size messages carry one command.
        """
        return max(1, min(self.grant_batch, int(self.grant_stall / max(self.per_command, 1e-4))))

    async def overtake(self, after: int) -> None:
        """Apply revocations committed after event ``after`` now, ahead of the grants still queued.

        Every saving control command rewrites Mosquitto's whole state file
        (tens of ms at 10,000 devices), so a large batch of grants would
        otherwise hold back a revocation for minutes. The overtaken events are
        applied again, idempotently, when their own batch comes, without a second kick.
        """
        if not await self.registry.has_events(after_id=after, kind_prefixes=URGENT):
            return
        reasons: dict[str, tuple[str, AuditEvent]] = {}
        read = await self.registry.events(after_id=after, limit=1000)
        for event in read:
            reason = MOSQUITTO_KICKS.get(event.kind)
            if (reason is not None and event.device_id and valid(event.device_id)
                    and event.id > self.overtaken.get(event.device_id, 0)):
                reasons[event.device_id] = (reason, event)
        if not reasons:
            return
        desired = await self.desired(reasons)
        clients, _ = await self.current(reasons, {})
        withdraw = sorted(d for d in reasons if d not in desired)
        kicks = sorted(d for d in reasons if d in desired and d in clients)
        proof = await self.publish_crl()
        if proof is None or not proof.proven:
            self.unproven.update(withdraw)
        await self.withdraw(withdraw, {d for d in withdraw if d in clients})
        if kicks:
            await self.control.run(kick_commands(kicks), tolerate=MISSING)
        if self.release({*withdraw, *kicks}, upto=read[-1].id if read else after):
            await self.publish_crl()
        records = []
        for device_id, (reason, event) in sorted(reasons.items()):
            self.overtaken[device_id] = event.id
            if device_id in withdraw or device_id in kicks:
                records.append(self.kick_record(device_id, reason, proof, event_id=event.id, event=event.kind,
                                                 overtook=True))
        await self.cursor.advance(self.cursor.position, records)

    async def withdraw(self, devices: Sequence[str], existing: set[str]) -> None:
        size = self.withdraw_batch
        for start in range(0, len(devices), size):
            chunk = devices[start : start + size]
            await self.control.run(withdrawal_commands(chunk, existing), batch=3 * size, tolerate=MISSING)

    async def held(self) -> dict[int, tuple[str, str]]:
        """Renewals to keep on the CRL: supersession event id -> (device, renewal serial).

        Every supersession the follower has not yet applied (after its
        position) whose device was not kicked since (:attr:`released`).
        """
        found: dict[int, tuple[str, str]] = {}
        for event in await self.registry.events(after_id=self.cursor.position,
                                                kinds=(EventKind.CERTIFICATE_REVOKED,), limit=HOLD_SCAN):
            serial = superseded_by(event.kind, event.data)
            if serial is not None and event.device_id and event.id not in self.released:
                found[event.id] = (event.device_id, serial)
        return found

    def release(self, kicked: Iterable[str], *, upto: int) -> bool:
        """The devices ``kicked`` lost every session on their superseded certificates: stop holding their renewals.

        Only supersessions up to event ``upto`` (those the kick was for): a later
        one is applied, and kicked, by its own batch. True if any was released.
        """
        devices = set(kicked)
        done = {i for i, (device, _) in self.holding.items() if device in devices and i <= upto}
        self.released |= done
        return bool(done)

    def settled(self, position: int) -> None:
        """The position moved to ``position``: forget what was remembered about the events up to it."""
        self.released = {i for i in self.released if i > position}
        self.overtaken = {d: i for d, i in self.overtaken.items() if i > position}

    async def publish_crl(self) -> CrlProof | None:
        """A new CRL holding the renewals not yet released, proven in force; None when Mosquitto cannot be signalled.

        A renewal activated while the CRL was being signed may be missing from
        the holds read before: it is read again afterwards and, if one is new,
        the CRL is published once more at once.
        """
        holds = await self.held()
        proof = await self._publish(holds)
        if proof is not None:
            late = await self.held()
            if late.keys() - holds.keys():
                proof = await self._publish(late) or proof
        return proof

    async def _publish(self, holds: dict[int, tuple[str, str]]) -> CrlProof | None:
        try:
            proof = await self.crl.publish(hold=sorted({serial for _, serial in holds.values()}))
        except MosquittoUnavailable as exc:
            log.error("could not reload Mosquitto's CRL (%s): withdrawn devices are kicked and lose their rights, "
                      "but their certificates are not refused until a CRL is loaded", exc)
            self.next_crl = asyncio.get_running_loop().time() + self.crl_retry
            return None
        self.holding = holds
        self.next_crl = asyncio.get_running_loop().time() + (
            self.crl_refresh_every if proof.proven else self.crl_retry)
        self.stats.crl_writes += 1
        self.stats.last_crl = time.time()
        if not proof.proven:
            self.stats.crl_unproven += 1
            await self.cursor.advance(self.cursor.position, [FollowerRecord(
                EventKind.MOSQUITTO_CRL_UNPROVEN, None, {**proof.as_dict(), "last_probe": str(proof.last_probe)})])
        return proof

    async def refresh_crl(self) -> None:
        """Re-sign before nextUpdate (an expired CRL refuses everyone); re-kick what an unproven CRL let in."""
        proof = await self.publish_crl()
        if proof is None or not proof.proven or not self.unproven:
            return
        again = [d for d in sorted(self.unproven) if await self.still_withdrawn(d)]
        await self.withdraw(again, set())
        self.unproven.clear()
        if again:
            await self.cursor.advance(self.cursor.position, [
                self.kick_record(d, "crl-now-in-force", proof) for d in again])

    async def still_withdrawn(self, device_id: str) -> bool:
        try:
            device = await self.registry.get_device(device_id)
        except NotFound:
            return True
        return desired_role(device, self.policies) is None

    def kick_record(self, device_id: str, reason: str, proof: CrlProof | None, **extra: Any) -> FollowerRecord:
        """The audit record of a session closed (kicked, or withdrawn) for ``reason``; counted by reason."""
        self.stats.kicked(reason)
        data: dict[str, Any] = {"reason": reason, **extra}
        data.update(proof.as_dict() if proof is not None else {"crl_proven": False})
        return FollowerRecord(EventKind.MOSQUITTO_SESSION_KICKED, device_id, data)

def valid(device_id: str) -> bool:
    """Only valid device ids reach Mosquitto's user names and role names (a reserved name never does)."""
    try:
        validate_device_id(device_id)
    except InvalidIdentity:
        log.warning("ignoring an event for the invalid device id %r", device_id[:80])
        return False
    return True
