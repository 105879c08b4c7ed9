"""``iotauth mosquitto follow DIR``: keep a running Mosquitto in step with the registry.

The follower reads the registry's change feed from its saved position
(:class:`~iotauth.export.managed.cursor.FeedCursor`: SQLite polled, PostgreSQL
NOTIFY) and, for each batch of events, brings the devices they name in step:

1. **the door** first: a new CRL, proven loaded with a canary
   (:mod:`~iotauth.export.managed.crl`). Revoked, suspended and pending
   certificates are refused at the handshake from here on.
2. **withdrawals**, only then: each session of a revoked, suspended or pending
   device is kicked and its client deleted (a disabled client would keep its
   rights on reconnect). A device kicked before step 1 could reconnect
   through the old CRL and keep that session; after it, it cannot. A revoked
   certificate of a device that stays active kicks that device's session once,
   so it reconnects with its current certificate. A renewal that superseded
   the certificate stays on the CRL (certificateHold) until that kick, so the
   kick cannot close a session already on the renewal
   (:mod:`~iotauth.export.managed.enforce`).
3. **grants**: roles and clients for devices that are (again) active or whose
   profile rules changed, a few commands per message. A device the new CRL
   lets in before its client exists has no rights until ``addClientRole`` (or
   ``modifyClient``) kicks it into them. Every saving command rewrites
   Mosquitto's whole state file, so revocations committed meanwhile overtake
   the grants still queued.
4. stale roles are deleted; then the audit records (every kick, every sync)
   and the new position are committed together.

On start, after every reconnect (a restarted Mosquitto, a broken connection),
after any failed batch and every ``reconcile_every`` seconds it **reconciles**
the whole registry against everything Mosquitto holds, and kicks the devices
whose certificates were revoked since its position. If Mosquitto refuses
the follower's credentials it has lost iotauth's state (a truncated or
replaced state file): the follower writes the state file again from the
registry and, with a restart command, restarts Mosquitto; a change too large
for the control API (which rewrites the whole state file per command) takes
the same path when a restart command is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iotauth.authority import Authority
from iotauth.certs import now_utc
from iotauth.config import Home, load_settings
from iotauth.errors import (
    IotAuthError,
    MosquittoControlError,
    MosquittoUnavailable,
    RegistryError,
)
from iotauth.export.follower import Backoff
from iotauth.export.managed.control import DynsecControl
from iotauth.export.managed.crl import CrlPublisher
from iotauth.export.managed.cursor import FeedCursor, FollowerRecord, to_apply
from iotauth.export.managed.enforce import HOLD_SCAN, Enforcer, valid
from iotauth.export.managed.layout import ManagedFiles, ManagedSettings
from iotauth.export.managed.process import MosquittoProcess
from iotauth.export.managed.state import (
    ClientState,
    RoleState,
    bootstrap_state,
    desired_roles,
    marker_command,
    plan,
    reserved_repairs,
)
from iotauth.export.managed.stats import FollowerStats
from iotauth.files import write_public
from iotauth.policy import PolicySet
from iotauth.registry import AuditEvent, DeviceStatus, EventKind
from iotauth.registry.events import MOSQUITTO_KICKS, changes_mosquitto_state

log = logging.getLogger("iotauth.mosquitto")

ACTOR = "iotauth-mosquitto"
LISTED = 100  # device ids listed in one reconcile record; the counts are always complete


@dataclass(frozen=True)
class FollowerOptions:
    poll_interval: float = 0.05
    reconcile_every: float = 600.0
    crl_refresh_every: float = 3600.0
    rebuild_threshold: int = 600  # commands; above it (with a restart command) the state file is rebuilt instead
    grant_batch: int = 50  # at most this many commands per control message
    grant_stall: float = 0.1  # seconds one message of grants may stall Mosquitto (sizes adapt to it)
    withdraw_batch: int = 20  # devices per control message; each costs two state-file saves
    lost_after_refusals: int = 2
    rebuild_retry: float = 60.0  # seconds before rebuilding again if Mosquitto still refuses the follower
    retry_initial: float = 0.2
    retry_max: float = 5.0
    crl_retry: float = 10.0  # seconds between attempts while no CRL is seen in force
    config_check_every: float = 1.0  # seconds between looks at iotauth.toml (topic policies)


class MosquittoFollower:
    """One follower for one managed Mosquitto (``DIR``)."""

    def __init__(
        self,
        *,
        home: Home,
        authority: Authority,
        policies: PolicySet,
        files: ManagedFiles,
        settings: ManagedSettings,
        password: str,
        process: MosquittoProcess,
        crl: CrlPublisher,
        options: FollowerOptions = FollowerOptions(),
        on_ready: Callable[[dict[str, Any]], None] = lambda _status: None,
    ) -> None:
        self.home = home
        self.authority = authority
        self.registry = authority.registry
        self.policies = policies
        self.files = files
        self.settings = settings
        self._password = password
        self.process = process
        self.crl = crl
        self.options = options
        self.on_ready = on_ready
        self.control = DynsecControl(settings.admin_host, settings.admin_port, password)
        self.cursor = FeedCursor(self.registry, f"mosquitto:{settings.export_id}", ACTOR)
        self._seen_connects = 0
        self._reconcile: str | None = "start"
        self._ready_reported = False
        self._rebuilt_at: float | None = None  # when the state was last rebuilt for refused logins
        self._waiting_logged = -1e9
        self._next_reconcile = 0.0
        self._saved_at = 0.0
        self.stats = FollowerStats()
        self.enforce = Enforcer(registry=self.registry, policies=policies, control=self.control, crl=crl,
                                cursor=self.cursor, grant_batch=options.grant_batch, grant_stall=options.grant_stall,
                                withdraw_batch=options.withdraw_batch, crl_refresh_every=options.crl_refresh_every,
                                crl_retry=options.crl_retry, stats=self.stats)
        self._backoff = Backoff(first=options.retry_initial, cap=options.retry_max)
        self._failures = 0
        self._config_stamp = self._stamp()
        self._next_config_check = 0.0

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow until cancelled."""
        await self.cursor.load()
        self.control.start()
        try:
            while True:
                try:
                    await self._step()
                except RegistryError as exc:
                    self.stats.failures["registry"] += 1
                    self._failures += 1
                    delay = self._backoff.delay(self._failures)
                    log.error("registry unreadable (%s); retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
        finally:
            await self.control.stop()
            if self.cursor.saved != self.cursor.position:
                with contextlib.suppress(Exception):  # best effort: the next start reconciles anyway
                    await self.cursor.advance(self.cursor.position)

    async def _step(self) -> None:
        if not self.control.ready:
            await self._without_control()
            return
        if self.control.connects != self._seen_connects:
            if self._seen_connects:
                self._reconcile = self._reconcile or "reconnected"
            self._seen_connects = self.control.connects
            self._rebuilt_at = None
        loop_time = asyncio.get_running_loop().time()
        if loop_time >= self._next_config_check:
            self._next_config_check = loop_time + self.options.config_check_every
            self.check_policies()
        if self._reconcile is None and loop_time >= self._next_reconcile:
            self._reconcile = "periodic"
        if self._reconcile is not None:
            await self._guarded(self.reconcile(self._reconcile))
            return
        batch = await self.cursor.pending()
        self.stats.read(to_apply(batch))
        if batch:
            await self._guarded(self.apply(batch))
            return
        if loop_time >= self.enforce.next_crl:
            await self._guarded(self.enforce.refresh_crl())
        if loop_time - self._saved_at > 5 and self.cursor.saved != self.cursor.position:
            await self.cursor.advance(self.cursor.position)
            self._saved_at = loop_time
        await self.cursor.wait(self.options.poll_interval)

    async def _guarded(self, work: Any) -> None:
        """Run one unit of work; a Mosquitto failure schedules a reconcile instead of crashing the follower."""
        try:
            await work
        except MosquittoUnavailable as exc:
            self.stats.failures["mosquitto-unavailable"] += 1
            log.warning("Mosquitto unavailable (%s): will reconcile once it is back", exc)
        except MosquittoControlError as exc:
            self.stats.failures["control-error"] += 1
            log.error("%s: reconciling", exc)
        else:
            self._failures = 0
            return
        self._reconcile = self._reconcile or "recovery"
        self._failures += 1
        await asyncio.sleep(self._backoff.delay(self._failures))

    def check_policies(self, force: bool = False) -> bool:
        """Reload the topic policies if ``iotauth.toml`` changed (or ``force``: SIGHUP); reconcile if they did.

        A profile's rules are its devices' roles: changed rules mean new role
        names, so each device of that profile is moved to its new role (one
        kick each). A file that does not parse is logged and the old policies stay.
        """
        stamp = self._stamp()
        if stamp == self._config_stamp and not force:
            return False
        self._config_stamp = stamp
        try:
            policies = PolicySet.from_profiles(load_settings(self.home).profiles.values())
        except IotAuthError as exc:
            log.error("not reloading the topic policies: %s", exc)
            return False
        if policies == self.policies:
            return False
        log.warning("topic policies changed in %s: reconciling Mosquitto's roles", self.home.config_file)
        self.policies = self.enforce.policies = policies
        self._reconcile = self._reconcile or "policy-reloaded"
        return True

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = self.home.config_file.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    async def _without_control(self) -> None:
        """Wait for the control connection; if Mosquitto keeps refusing our credentials, rebuild its state."""
        refusals = self.control.refusals
        now = asyncio.get_running_loop().time()
        if refusals >= self.options.lost_after_refusals and (
                self._rebuilt_at is None or now - self._rebuilt_at > self.options.rebuild_retry):
            self._rebuilt_at = now
            log.error("Mosquitto refuses the follower's credentials (%s): it runs without iotauth's state",
                      self.control.last_refusal)
            await self.rebuild("Mosquitto lost iotauth's state (control login refused)")
            return
        if not await self.control.wait_ready(2.0) and now - self._waiting_logged > 30:
            self._waiting_logged = now
            log.warning("waiting for Mosquitto's control listener at %s:%d (%s)", self.settings.admin_host,
                        self.settings.admin_port, self.control.last_refusal or "not reachable")

    # -- event batches ----------------------------------------------------------------------

    async def apply(self, batch: Sequence[AuditEvent]) -> None:
        """Bring the devices named by ``batch`` in step, then save the position with the audit records."""
        events = [e for e in to_apply(batch) if changes_mosquitto_state(e.kind)]
        if not events:
            self.cursor.position = batch[-1].id
            return
        scope: dict[str, AuditEvent] = {}
        reasons: dict[str, tuple[str, AuditEvent]] = {}
        for event in events:
            if event.device_id and valid(event.device_id):
                scope[event.device_id] = event
                reason = MOSQUITTO_KICKS.get(event.kind)
                if reason is not None and event.id > self.enforce.overtaken.get(event.device_id, 0):
                    reasons[event.device_id] = (reason, event)
        desired = await self.enforce.desired(scope)
        clients, roles = await self.enforce.current(scope, desired)
        todo = plan(desired, clients, roles, scope=scope, kick_missing=[d for d in reasons if d not in desired])
        kicks = sorted(d for d in reasons if d in desired and d in clients and d not in todo.changed)
        proof = await self.enforce.converge(todo, kicks, after=batch[-1].id)
        self.stats.syncs.update(created=len(todo.created), changed=len(todo.changed))
        records = [FollowerRecord(EventKind.MOSQUITTO_DEVICE_SYNCED, d, {
            "action": "created" if d in todo.created else "changed", "role": desired[d].rolename,
            "event_id": scope[d].id, "event": scope[d].kind}) for d in sorted({*todo.created, *todo.changed})]
        for device_id in [*todo.withdraw, *kicks]:
            reason, event = reasons.get(device_id, ("device-not-active", scope[device_id]))
            records.append(self.enforce.kick_record(device_id, reason, proof, event_id=event.id, event=event.kind))
        await self.cursor.advance(batch[-1].id, records)
        self.enforce.settled(batch[-1].id)
        self._saved_at = asyncio.get_running_loop().time()

    # -- the whole registry -----------------------------------------------------------------

    async def reconcile(self, trigger: str) -> None:
        """Compare every client and role in Mosquitto with the registry and fix every difference."""
        started = time.monotonic()
        head = await self.cursor.head()
        desired = desired_roles(await self.registry.list_devices(DeviceStatus.ACTIVE), self.policies)
        listed = await self.control.query([{"command": "listClients", "verbose": True}])
        listed += await self.control.query([{"command": "listRoles", "verbose": True}])
        listed += await self.control.query([{"command": "getDefaultACLAccess"}])
        if any(answer is None for answer in listed):
            raise MosquittoControlError("Mosquitto did not list its clients, roles or default access")
        clients = {c.username: c for c in map(ClientState.from_json, listed[0]["clients"])}  # type: ignore[index]
        roles = {r.rolename: r for r in map(RoleState.from_json, listed[1]["roles"])}  # type: ignore[index]
        access = {a["acltype"]: bool(a.get("allow")) for a in listed[2]["acls"]}  # type: ignore[index]
        todo = plan(desired, clients, roles)
        repairs, strangers = reserved_repairs(clients, roles, access)
        todo.withdraw += strangers
        todo.existing.update(strangers)
        revoked = await self._revoked_since(head)
        kicks = sorted(d for d in revoked if d in desired and d in clients and d not in todo.changed)
        if todo.commands + len(repairs) > self.options.rebuild_threshold and self.process.restart_command:
            await self.rebuild(f"{todo.commands} changes ({trigger})")
            return
        await self.control.run(repairs)
        proof = await self.enforce.converge(todo, kicks, after=head)
        marker = marker_command(clients, str(head))
        if marker is not None:
            await self.control.run([marker])
        seconds = time.monotonic() - started
        self.stats.reconciles[trigger] += 1
        self.stats.syncs.update(created=len(todo.created), changed=len(todo.changed))
        summary = {"trigger": trigger, "to_event": head, "devices": len(desired), "created": len(todo.created),
                   "changed": len(todo.changed), "removed": len(todo.withdraw),
                   "repaired_roles": len(todo.repaired_roles), "repairs": len(repairs),
                   "commands": todo.commands + len(repairs), "seconds": round(seconds, 3),
                   "created_ids": todo.created[:LISTED], "changed_ids": todo.changed[:LISTED],
                   **(proof.as_dict() if proof is not None else {"crl_proven": False})}
        records = [FollowerRecord(EventKind.MOSQUITTO_RECONCILED, None, summary)]
        records += [self.enforce.kick_record(d, "reconcile", proof, trigger=trigger) for d in todo.withdraw]
        records += [self.enforce.kick_record(d, "certificate-revoked", proof, event_id=revoked[d].id,
                                             event=revoked[d].kind, trigger=trigger) for d in kicks]
        await self.cursor.advance(head, records)
        self.enforce.settled(head)
        self._saved_at = asyncio.get_running_loop().time()
        self._reconcile = None
        self._next_reconcile = asyncio.get_running_loop().time() + self.options.reconcile_every
        log.info("reconciled (%s): %d devices, %d commands in %.2f s", trigger, len(desired), summary["commands"],
                 seconds)
        if not self._ready_reported:
            self._ready_reported = True
            self.on_ready({"following": str(self.files.directory), "devices": len(desired), "event_id": head,
                           "control": f"{self.settings.admin_host}:{self.settings.admin_port}",
                           "listener": f"{self.settings.device_host}:{self.settings.device_port}",
                           "mosquitto_pid": self.process.pid(), "reconcile_seconds": round(seconds, 3)})

    async def _revoked_since(self, head: int) -> dict[str, AuditEvent]:
        """Devices with a certificate revoked after the position, up to ``head``: the newest such event of each.

        A reconcile moves the position over these events without applying
        them one by one, so it kicks their devices itself: a session on a
        certificate revoked while the follower was down (or busy) must not
        outlive it. Not on the first start: no position, nothing to catch up.
        """
        if self.cursor.saved is None:
            return {}
        found: dict[str, AuditEvent] = {}
        for event in await self.registry.events(after_id=self.cursor.position,
                                                kinds=(EventKind.CERTIFICATE_REVOKED,), limit=HOLD_SCAN):
            if event.id <= head and event.device_id and valid(event.device_id):
                found[event.device_id] = event
        return found

    async def rebuild(self, reason: str) -> None:
        """Write Mosquitto's whole state (and a fresh CRL) from the registry; restart Mosquitto if we can."""
        head = await self.cursor.head()
        desired = desired_roles(await self.registry.list_devices(DeviceStatus.ACTIVE), self.policies)
        group = self.crl.group
        document = bootstrap_state(self._password, desired.values(), str(head))
        write_public(self.files.state, json.dumps(document, separators=(",", ":")).encode(),
                     mode=0o660 if group is not None else 0o600, group=group)
        try:
            holds = await self.enforce.held()  # the reconcile after the restart kicks their devices, then lets them in
            published = await self.authority.build_crl(extra=self.crl.canaries.revoked(now_utc()),
                                                        hold=[serial for _, serial in holds.values()])
            write_public(self.files.crl, published.pem,
                         mode=0o640 if group is not None else 0o644, group=group)
            self.stats.crl_writes += 1
            self.stats.last_crl = time.time()
        except IotAuthError as exc:
            log.error("could not refresh the CRL for the rebuilt state: %s", exc)
        restarted = await self.process.restart()
        self.stats.rebuilds += 1
        await self.cursor.advance(self.cursor.position, [FollowerRecord(EventKind.MOSQUITTO_STATE_REBUILT, None, {
            "reason": reason, "devices": len(desired), "generation": head, "restarted": restarted})])
        if not restarted:
            log.error("rebuilt %s from the registry (%d devices): RESTART MOSQUITTO to load it (or give the follower "
                      "--restart-command)", self.files.state, len(desired))
            return
        self._reconcile = "rebuilt"
        await self.control.wait_ready(30.0)

