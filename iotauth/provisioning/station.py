"""The provisioning station: one state machine per port, every step journaled in the registry.

For each board on a port the station runs ten steps::

    1 identify   HELLO -> INFO (hardware id, capabilities, what the board holds)
    2 check      hardware id not bound elsewhere, key not a duplicate, key type allowed
    3 assign     device id from the template / CSV / list, consistent with the registry
    4 key        CSR from the board (GENERATE_KEY), or a host key written with PUT_KEY
    5 issue      certificate recorded durably as *pending* (PUT_CONFIG with broker, id and
                 trust anchor goes out meanwhile: it needs no certificate)
    6 write      PUT_CERT (certificate + CA chain), only once its record is durable
    7 verify     READ_BACK hashes compared with what was sent
    8 prove      PROVE with a fresh nonce, verified against the issued certificate's key
    9 commit     COMMIT: the board locks itself
    10 activate  the certificate and the device become *active* in the registry

Crash safety comes from deriving every decision from the two durable sources
of truth, the board's flash (INFO) and the registry, never from station
memory: a board that already holds a key with a pending certificate gets that
certificate again (no second certificate for one hardware id and key); a
board that committed but was never activated is proven and activated; a key
whose certificate was revoked (for instance by the pending TTL) is replaced,
never re-certified; a committed board, or one whose device is active in the
registry, is only re-provisioned with ``force``, which revokes the old
certificate (superseded) before the board is erased.

Step journal events (``provisioning.<step>``) are written durably through the
registry's hash-chained audit log. They are pipelined: a step's record is
group-committed while the next step talks to the board; records are ordered
ahead of the issuance and activation writes, and all of a board's records are
durable before its result is reported. Ordering that safety depends on is
strict: the certificate record is durable before PUT_CERT, and activation
happens only after the board's COMMIT reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

from iotauth.authority import Authority
from iotauth.errors import Conflict, IotAuthError, NotFound, ProvisioningError, RegistryError
from iotauth.identity import validate_hardware_id
from iotauth.certs import fingerprint, serial_hex
from iotauth.pki.keys import check_key_allowed, generate_private_key
from iotauth.certs import public_key_sha256
from iotauth.pki.verify import ClientCertificateVerifier, Rejection
from iotauth.provisioning.ids import IdSource
from iotauth.provisioning.messages import (
    Capability,
    CertAck,
    Commit,
    Committed,
    ConfigAck,
    Csr,
    DeviceState,
    Erase,
    Erased,
    ErrorCode,
    GenerateKey,
    Hashes,
    Hello,
    Info,
    KeyAck,
    KeyType,
    Prove,
    PutCert,
    PutConfig,
    PutKey,
    ReadBack,
    Signature,
)
from iotauth.provisioning.objects import (
    DeviceConfig,
    encode_cert_bundle,
    key_type_of,
    sha256,
    spki_der,
    verify_proof,
)
from iotauth.provisioning.session import DeviceRefused, RetryPolicy, Session, printable
from iotauth.provisioning.transport import Link, LinkClosed, SerialLink
from iotauth.registry import (
    TIMESTAMP_FORMAT,
    CertificateRecord,
    CertificateStatus,
    Device,
    DeviceStatus,
    Registry,
    RevocationReason,
)
from iotauth.registry.service import Credential

PROTOCOL_VERSION = 1
KEY_PREFERENCE = (KeyType.P256, KeyType.P384, KeyType.ED25519)


class Step(IntEnum):
    IDENTIFY = 1
    CHECK = 2
    ASSIGN = 3
    KEY = 4
    ISSUE = 5
    WRITE = 6
    VERIFY = 7
    PROVE = 8
    COMMIT = 9
    ACTIVATE = 10

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def event(self) -> str:
        """The journal event kind written when this step completes."""
        return "provisioning." + _EVENT_NAMES[self]


_EVENT_NAMES = {
    Step.IDENTIFY: "identified",
    Step.CHECK: "checked",
    Step.ASSIGN: "assigned",
    Step.KEY: "keyed",
    Step.ISSUE: "issued",
    Step.WRITE: "written",
    Step.VERIFY: "verified",
    Step.PROVE: "proven",
    Step.COMMIT: "committed",
    Step.ACTIVATE: "activated",
}
STEP_COUNT = len(Step)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Progress:
    """A port's state, as the live view shows it."""

    port: str
    step: Step
    state: str  # "running", "done", "failed"
    hardware_id: str | None = None
    device_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class ProvisionResult:
    """The traceability record of one board on one port."""

    port: str
    station: str
    operator: str
    result: str  # "provisioned", "already-provisioned" or "failed"
    started_at: datetime
    finished_at: datetime
    step: Step
    device_id: str | None = None
    hardware_id: str | None = None
    serial: str | None = None
    fingerprint: str | None = None
    error: str | None = None
    resumed: bool = False
    bytes_exchanged: int = 0

    @property
    def ok(self) -> bool:
        return self.result != "failed"

    def as_row(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "hardware_id": self.hardware_id,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "port": self.port,
            "station": self.station,
            "operator": self.operator,
            "started_at": self.started_at.strftime(TIMESTAMP_FORMAT),
            "finished_at": self.finished_at.strftime(TIMESTAMP_FORMAT),
            "result": self.result,
            "error": self.error,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.as_row(), "step": self.step.label, "resumed": self.resumed,
                "bytes_exchanged": self.bytes_exchanged}


@dataclass(frozen=True)
class StationConfig:
    """How this station provisions.

    Attributes:
        station: this station's name (journal and report).
        operator: who runs it (journal actor and report).
        profile: the profile every device is issued under.
        host_keygen: generate keys on the host and write them with PUT_KEY.
        force: re-provision committed boards (the old certificate is revoked).
        baudrate: serial speed; also used to size timeouts.
    """

    station: str
    operator: str
    profile: str = "default"
    host_keygen: bool = False
    force: bool = False
    baudrate: int = 115200
    rtscts: bool = False
    policy: RetryPolicy = field(default_factory=RetryPolicy)


class Journal:
    """Step records, written durably and in order, without holding up the board.

    Records go into the registry's group-commit writer as one small write
    operation that, when the writer runs it, takes *every* record buffered
    by then (from all ports). At most one such operation waits in the
    writer's queue at a time, so under load the journal costs one operation
    per commit, not one per step; when idle, a record is durable one commit
    after its step. :meth:`barrier` orders the records so far ahead of the
    caller's next registry write (usually in the same commit); :meth:`flush`
    waits until they are durable and surfaces a write failure.
    """

    def __init__(self, registry: Registry, actor: str) -> None:
        self._registry = registry
        self._actor = actor
        self._buffer: list[tuple[str, str | None, dict[str, Any]]] = []
        self._queued = False
        self._pending: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    def record(self, kind: str, device_id: str | None, data: dict[str, Any]) -> None:
        self._buffer.append((kind, device_id, data))
        if not self._queued:
            self._submit()

    def _submit(self) -> None:
        self._queued = True
        taken: list[tuple[str, str | None, dict[str, Any]]] | None = None

        async def op(tx: Any) -> None:
            nonlocal taken
            if taken is None:  # first run; a batch that is retried re-runs the op with the same records
                self._queued = False
                taken, self._buffer = self._buffer, []
            for kind, device_id, data in taken:
                tx.event(kind, self._actor, device_id, data)

        task = asyncio.get_running_loop().create_task(self._registry.write(op), name="iotauth-journal")
        self._pending.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def barrier(self) -> None:
        """Return once every record so far is queued in the registry writer.

        The writer is FIFO, and the journal task enqueues its operation in its
        first step, which the event loop runs before resuming this coroutine.
        """
        if self._buffer and not self._queued:
            self._submit()
        await asyncio.sleep(0)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RegistryError(f"the provisioning journal could not be written: {error}")

    async def flush(self) -> None:
        """Wait until every record so far is durable (records added meanwhile are not waited for)."""
        await self.barrier()
        if self._pending:
            await asyncio.wait(list(self._pending))
        self._raise_error()


@dataclass
class _Plan:
    """What identify/check/assign found, and what the run will therefore do."""

    existing: Device | None = None
    held: Credential | None = None
    key_type: KeyType = KeyType.P256
    device_key: PublicKeyTypes | None = None
    action: str = "provision"  # "provision", "confirm" (already done) or "finish" (committed, not activated)
    revoke: list[CertificateRecord] = field(default_factory=list)
    erase: bool = False


class Station:
    """Provision boards on serial ports through one :class:`Authority`.

    Args:
        authority: issues and records certificates (it holds the registry and settings).
        config: station name, operator, profile, modes and retry policy.
        ids: where device ids come from.
        on_progress: called (synchronously) at every step start and end, for a live view.
        link_factory: opens a port (tests may hand in another :class:`Link`).
    """

    def __init__(
        self,
        authority: Authority,
        config: StationConfig,
        ids: IdSource,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        link_factory: Callable[[str], Awaitable[Link]] | None = None,
    ) -> None:
        self.authority = authority
        self.registry = authority.registry
        self.settings = authority.settings
        self.config = config
        self.ids = ids
        self.profile = self.settings.profile(config.profile)
        self.journal = Journal(self.registry, config.operator)
        self.verifier = ClientCertificateVerifier(
            [authority.ca.root_cert], [authority.ca.issuing_cert], self.settings.trust_domain
        )
        self._on_progress = on_progress
        self._link_factory = link_factory or self._open_serial
        self._busy: set[str] = set()

    async def _open_serial(self, port: str) -> Link:
        return await SerialLink.open(port, baudrate=self.config.baudrate, rtscts=self.config.rtscts)

    def progress(self, update: Progress) -> None:
        if self._on_progress is not None:
            with contextlib.suppress(Exception):  # a broken display must never break provisioning
                self._on_progress(update)

    async def expire_pending(self) -> list[CertificateRecord]:
        """Revoke (superseded) pending certificates older than ``pending_ttl``: deliveries that never finished."""
        cutoff = _now() - self.settings.pending_ttl
        expired = await self.registry.expire_pending(cutoff, RevocationReason.SUPERSEDED, actor=self.config.operator)
        if expired:
            self.journal.record("provisioning.expired", None, {
                "station": self.config.station,
                "serials": [c.serial for c in expired],
                "ttl_seconds": self.settings.pending_ttl.total_seconds(),
            })
            await self.journal.flush()
        return expired

    async def provision(self, port: str) -> ProvisionResult:
        """Run the ten steps for the board on ``port``; never raises, always returns a result."""
        if port in self._busy:
            now = _now()
            return ProvisionResult(port, self.config.station, self.config.operator, "failed", now, now, Step.IDENTIFY,
                                   error="port is already being provisioned")
        self._busy.add(port)
        try:
            return await _Run(self, port).run()
        finally:
            self._busy.discard(port)

    async def provision_all(
        self, ports: Sequence[str], on_result: Callable[[ProvisionResult], Any] | None = None
    ) -> list[ProvisionResult]:
        """Provision every port concurrently; results in the order of ``ports``."""

        errors: list[Exception] = []

        async def one(port: str) -> ProvisionResult:
            result = await self.provision(port)
            await _notify(on_result, result, errors)
            return result

        results = list(await asyncio.gather(*(one(p) for p in ports)))
        if errors:
            raise errors[0]
        return results

    async def watch(
        self,
        patterns: Sequence[str],
        stop: asyncio.Event,
        on_result: Callable[[ProvisionResult], Any] | None = None,
        poll_interval: float = 0.5,
    ) -> list[ProvisionResult]:
        """Provision each port that appears (hot-plug) until ``stop`` is set.

        A port is provisioned once per appearance: it must disappear (board
        unplugged) and reappear before it is provisioned again.
        """
        results: list[ProvisionResult] = []
        tasks: dict[str, asyncio.Task[ProvisionResult]] = {}
        done: set[str] = set()
        replugged: set[str] = set()  # vanished while being provisioned: whatever is there now is new
        errors: list[Exception] = []

        async def one(port: str) -> ProvisionResult:
            result = await self.provision(port)
            results.append(result)
            await _notify(on_result, result, errors)
            return result

        while not stop.is_set():
            present = set(expand_ports(patterns, require_match=False))
            done &= present
            replugged |= set(tasks) - present
            for port in [p for p, t in tasks.items() if t.done()]:
                del tasks[port]
                if port in replugged:
                    replugged.discard(port)
                else:
                    done.add(port)
            for port in sorted(present - done - set(tasks)):
                tasks[port] = asyncio.get_running_loop().create_task(one(port))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await stop.wait()
        if tasks:
            await asyncio.gather(*tasks.values())
        if errors:
            raise errors[0]
        return results

    async def close(self) -> None:
        await self.journal.flush()


async def _notify(
    on_result: Callable[[ProvisionResult], Any] | None, result: ProvisionResult, errors: list[Exception]
) -> None:
    """Hand a result to the caller (e.g. the report writer); keep its failure for after the other ports."""
    if on_result is None:
        return
    try:
        outcome = on_result(result)
        if asyncio.iscoroutine(outcome):
            await outcome
    except Exception as exc:
        errors.append(exc)


def expand_ports(patterns: Iterable[str], *, require_match: bool = True) -> list[str]:
    """Expand glob patterns (``/dev/ttyUSB*``); plain paths pass through unchanged."""
    ports: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches and require_match:
                raise ProvisioningError(f"no serial port matches {pattern!r}")
            ports.extend(matches)
        else:
            ports.append(pattern)
    return list(dict.fromkeys(ports))


class _Run:
    """One board on one port, from HELLO to activation (or a reasoned failure)."""

    def __init__(self, station: Station, port: str) -> None:
        self.station = station
        self.config = station.config
        self.registry = station.registry
        self.journal = station.journal
        self.port = port
        self.started_at = _now()
        self.step = Step.IDENTIFY
        self.session: Session | None = None
        self.info: Info | None = None
        self.hardware_id: str | None = None
        self.device_id: str | None = None
        self.resumed = False
        self.csr: x509.CertificateSigningRequest | None = None
        self.public_key: PublicKeyTypes | None = None
        self.reuse: CertificateRecord | None = None
        self.cert: x509.Certificate | None = None
        self.had_certificates = True  # until the registry says this device has none
        self._t0 = time.monotonic()
        self._step_started = self._t0

    # -- plumbing --------------------------------------------------------------------------

    def _budget(self, step: Step) -> float:
        policy = self.config.policy
        byte_time = 10.0 / self.config.baudrate
        extra = policy.keygen_timeout if step is Step.KEY else 0.0
        return 12 * policy.request_budget(byte_time, extra) + 30.0

    def _begin(self, step: Step, detail: str = "") -> None:
        self.step = step
        self._step_started = time.monotonic()
        self.station.progress(Progress(self.port, step, "running", self.hardware_id, self.device_id, detail))

    def _done(self, data: dict[str, Any] | None = None, detail: str = "") -> None:
        elapsed_ms = round((time.monotonic() - self._step_started) * 1000, 1)
        record = {"hardware_id": self.hardware_id, "station": self.config.station, "port": self.port,
                  "elapsed_ms": elapsed_ms, **(data or {})}
        self.journal.record(self.step.event, self.device_id, record)
        self.station.progress(Progress(self.port, self.step, "done", self.hardware_id, self.device_id, detail))

    @property
    def s(self) -> Session:
        if self.session is None:
            raise ProvisioningError("no session")
        return self.session

    def _result(self, outcome: str, error: str | None = None) -> ProvisionResult:
        session = self.session
        return ProvisionResult(
            port=self.port,
            station=self.config.station,
            operator=self.config.operator,
            result=outcome,
            started_at=self.started_at,
            finished_at=_now(),
            step=self.step,
            device_id=self.device_id,
            hardware_id=self.hardware_id,
            serial=serial_hex(self.cert) if self.cert is not None else None,
            fingerprint=fingerprint(self.cert) if self.cert is not None else None,
            error=error,
            resumed=self.resumed,
            bytes_exchanged=session.bytes_sent + session.bytes_received if session else 0,
        )

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> ProvisionResult:
        link: Link | None = None
        try:
            link = await self._open()
            self.session = Session(link, self.config.policy)
            outcome = await self._steps()
            await self.journal.flush()  # a result is reported only once all its step records are durable
            return self._result(outcome)
        except IotAuthError as exc:
            return await self._failed(printable(f"{self.step.label}: {exc}", 300))
        except TimeoutError:
            return await self._failed(f"{self.step.label}: step did not finish within its time budget")
        except Exception as exc:  # one board's surprise must not take the other ports down
            return await self._failed(printable(f"{self.step.label}: internal error {type(exc).__name__}: {exc}", 300))
        finally:
            if link is not None:
                await link.close()

    async def _failed(self, reason: str) -> ProvisionResult:
        self.journal.record("provisioning.failed", self.device_id, {
            "hardware_id": self.hardware_id, "station": self.config.station, "port": self.port,
            "step": self.step.label, "error": reason,
        })
        self.station.progress(Progress(self.port, self.step, "failed", self.hardware_id, self.device_id, reason))
        with contextlib.suppress(IotAuthError):
            await self.journal.flush()
        return self._result("failed", reason)

    async def _open(self) -> Link:
        policy = self.config.policy
        for attempt in range(1, policy.attempts + 1):
            try:
                link: Link = await self.station._link_factory(self.port)
                return link
            except LinkClosed:
                if attempt == policy.attempts:
                    raise
                await asyncio.sleep(max(policy.pause(attempt), 0.05))
        raise LinkClosed(f"cannot open {self.port}")

    async def _steps(self) -> str:
        async with asyncio.timeout(self._budget(Step.IDENTIFY)):
            await self.s.start()
            await self._identify()
        plan = await self._check()
        plan = await self._assign(plan)
        if plan.action == "confirm":
            return await self._confirm(plan)
        if plan.action == "finish":
            return await self._finish(plan)
        await self._prepare(plan)
        for step, work in (
            (Step.KEY, self._key),
            (Step.ISSUE, self._issue),
            (Step.WRITE, self._write),
            (Step.VERIFY, self._verify),
            (Step.PROVE, self._prove),
            (Step.COMMIT, self._commit),
            (Step.ACTIVATE, self._activate),
        ):
            self._begin(step)
            async with asyncio.timeout(self._budget(step)):
                await work(plan)
        return "provisioned"

    # -- 1 identify ------------------------------------------------------------------------

    async def _identify(self) -> None:
        self._begin(Step.IDENTIFY)
        info = await self.s.request(Hello(), Info)
        if info.protocol_version != PROTOCOL_VERSION:
            raise ProvisioningError(f"device speaks protocol version {info.protocol_version}, not {PROTOCOL_VERSION}")
        self.hardware_id = validate_hardware_id(info.hardware_id)
        self.info = info
        self._done({
            "model": printable(info.model),
            "firmware": printable(info.firmware),
            "state": [str(f.name).lower() for f in DeviceState if f in info.state],
            "capabilities": [str(f.name).lower() for f in Capability if f in info.capabilities],
            "held_fingerprint": info.cert_fingerprint.hex() or None,
        }, detail=self.hardware_id)

    def _info(self) -> Info:
        if self.info is None:
            raise ProvisioningError("device not identified")
        return self.info

    # -- 2 check ---------------------------------------------------------------------------

    async def _check(self) -> _Plan:
        self._begin(Step.CHECK)
        info = self._info()
        plan = _Plan()
        plan.existing = await self.registry.find_device_by_hardware_id(info.hardware_id)
        if plan.existing is not None and plan.existing.status is DeviceStatus.REVOKED:
            raise Conflict(f"hardware id {info.hardware_id!r} belongs to revoked device {plan.existing.device_id!r}; "
                           "revocation is final")
        needed = Capability.PUT_KEY if self.config.host_keygen else Capability.KEYGEN
        if not info.capabilities & needed:
            hint = "the device does not accept host keys" if self.config.host_keygen else \
                "the device cannot generate keys; use --host-keygen"
            raise ProvisioningError(hint)
        plan.key_type = self._choose_key_type(info)
        if info.public_key:
            plan.device_key = _load_public_key(info.public_key)
            owner = plan.existing.device_id if plan.existing is not None else None
            for record in await self.registry.certificates_with_key(public_key_sha256(plan.device_key)):
                if record.device_id != owner:
                    raise Conflict(f"duplicate public key: the board's key already belongs to device "
                                   f"{record.device_id!r}")
        if info.cert_fingerprint:
            plan.held = await self.registry.find_credential(info.cert_fingerprint.hex())
        self._done({
            "key_type": plan.key_type.profile_name,
            "known_device": plan.existing.device_id if plan.existing else None,
            "device_key_sha256": public_key_sha256(plan.device_key) if plan.device_key is not None else None,
            "held_status": plan.held.certificate.status.value if plan.held else None,
        })
        return plan

    def _choose_key_type(self, info: Info) -> KeyType:
        allowed = self.station.profile.key_types
        for kind in KEY_PREFERENCE:
            if kind.profile_name in allowed and info.key_types & kind.flag:
                return kind
        raise ProvisioningError(f"no key type both allowed by profile {self.station.profile.name!r} "
                                f"({', '.join(sorted(allowed))}) and supported by the device")

    # -- 3 assign --------------------------------------------------------------------------

    async def _assign(self, plan: _Plan) -> _Plan:
        self._begin(Step.ASSIGN)
        info = self._info()
        hardware_id = info.hardware_id
        device_id = await self.station.ids.assign(hardware_id, info.model, plan.existing)
        if plan.existing is not None and plan.existing.device_id != device_id:
            raise Conflict(f"hardware id {hardware_id!r} is already bound to device {plan.existing.device_id!r}, "
                           f"not {device_id!r}")
        device = plan.existing
        if device is None:
            with contextlib.suppress(NotFound):
                device = await self.registry.get_device(device_id)
            if device is not None and device.hardware_id not in (None, hardware_id):
                raise Conflict(f"device id {device_id!r} already belongs to hardware id {device.hardware_id!r}")
            if device is not None and device.status is DeviceStatus.REVOKED:
                raise Conflict(f"device {device_id!r} is revoked; a revoked device id cannot be provisioned again")
        if device is not None and device.profile != self.station.profile.name:
            raise Conflict(f"device {device_id!r} has profile {device.profile!r}, not {self.station.profile.name!r}")
        self.device_id = device_id
        plan = await self._decide(plan, device)
        self._done({"device_id": device_id, "source": self.station.ids.describe(), "action": plan.action,
                    "force": self.config.force}, detail=device_id)
        return plan

    async def _decide(self, plan: _Plan, device: Device | None) -> _Plan:
        """Confirm, finish or provision; refuse to overwrite a live identity without ``force``."""
        info = self._info()
        certs = await self.registry.certificates_of(self._device_id()) if device is not None else []
        self.had_certificates = bool(certs)
        live = [c for c in certs if c.status is CertificateStatus.ACTIVE]
        held = plan.held
        if DeviceState.COMMITTED in info.state:
            mine = held is not None and held.certificate.device_id == self.device_id
            if mine and held is not None and not self.config.force:
                if held.certificate.status is CertificateStatus.ACTIVE:
                    return replace(plan, action="confirm")
                if held.certificate.status is CertificateStatus.PENDING:
                    self.resumed = True
                    return replace(plan, action="finish")
            if not self.config.force:
                status = held.certificate.status.value if held else "unknown to this registry"
                raise Conflict(f"the board is committed with certificate {info.cert_fingerprint.hex()[:16]} "
                               f"({status}); re-provision it with --force")
            return replace(plan, erase=True, revoke=[c for c in certs if c.status is not CertificateStatus.REVOKED])
        if live and not self.config.force:
            raise Conflict(f"device {self.device_id!r} has an active certificate but this board is not committed "
                           "(erased or swapped?); re-provision it with --force")
        return replace(plan, revoke=live)

    # -- confirm / finish (resume after COMMIT) ---------------------------------------------

    def _held_cert(self, plan: _Plan) -> x509.Certificate:
        if plan.held is None:
            raise ProvisioningError("no held certificate")
        cert = x509.load_pem_x509_certificate(plan.held.certificate.pem.encode())
        if plan.device_key is None or spki_der(cert.public_key()) != spki_der(plan.device_key):
            raise ProvisioningError("the board's key does not match the certificate it holds")
        return cert

    async def _confirm(self, plan: _Plan) -> str:
        """The board is committed and active: prove it still holds the key, change nothing."""
        self.cert = self._held_cert(plan)
        self._begin(Step.PROVE, "already provisioned")
        await self._prove(plan)
        return "already-provisioned"

    async def _finish(self, plan: _Plan) -> str:
        """The board committed but the station never activated it (crash, lost reply): finish the job."""
        self.cert = self._held_cert(plan)
        self._check_issued(self.cert)
        self._begin(Step.PROVE, "resuming after commit")
        await self._prove(plan)
        self._begin(Step.ACTIVATE)
        await self._activate(plan)
        return "provisioned"

    async def _prepare(self, plan: _Plan) -> None:
        """Revoke what ``force`` replaces, then erase a committed board."""
        if not plan.revoke and not plan.erase:
            return
        self._begin(Step.KEY, "erasing the board" if plan.erase else "revoking the old certificate")
        revoked = []
        for record in plan.revoke:
            await self.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED,
                                                   actor=self.config.operator)
            revoked.append(record.serial)
        if plan.erase:
            await self.s.request(Erase(self._info().hardware_id), Erased)
            plan.device_key = None
            self.info = replace(self._info(), state=DeviceState(0), public_key=b"", cert_fingerprint=b"")
        self.journal.record("provisioning.erased" if plan.erase else "provisioning.superseded", self.device_id, {
            "hardware_id": self.hardware_id, "station": self.config.station, "port": self.port,
            "revoked": revoked, "force": self.config.force,
        })

    # -- 4 key -----------------------------------------------------------------------------

    async def _key(self, plan: _Plan) -> None:
        replace_key = False
        if plan.device_key is not None:
            replace_key, self.reuse = await self._existing_key(plan)
        if self.reuse is not None:
            self.resumed = True
            self.public_key = plan.device_key
            self._done({"key_source": "board", "reused_certificate": self.reuse.serial,
                        "public_key_sha256": self.reuse.public_key_sha256}, detail="resuming")
            return
        if self.config.host_keygen:
            await self._put_host_key(plan)
            return
        der = await self._read_csr(plan.key_type if replace_key or plan.device_key is None
                                   else _key_type(plan.device_key), replace_key)
        try:
            csr = x509.load_der_x509_csr(der)
        except ValueError:
            raise ProvisioningError("the device's CSR is not valid DER") from None
        if not csr.is_signature_valid:
            raise ProvisioningError("the device's CSR signature does not verify (no proof of possession)")
        key = csr.public_key()
        if plan.device_key is not None and not replace_key and spki_der(key) != spki_der(plan.device_key):
            raise ProvisioningError("the CSR's key is not the key the device reported")
        check_key_allowed(key, self.station.profile.key_types, self.station.profile.rsa_min_bits)
        self.csr, self.public_key = csr, key
        self.resumed = self.resumed or (plan.device_key is not None and not replace_key)
        self._done({"key_source": "board", "key_type": _key_type(key).profile_name,
                    "public_key_sha256": public_key_sha256(key), "csr_sha256": sha256(der).hex(),
                    "new_key": replace_key or plan.device_key is None})

    async def _existing_key(self, plan: _Plan) -> tuple[bool, CertificateRecord | None]:
        """Should the board's stored key be replaced, and is there a pending certificate to reuse?

        A key is certified at most once: its pending certificate (if young
        enough) is delivered again; a key whose certificate was revoked or
        expired is replaced, never re-certified.
        """
        key = plan.device_key
        if key is None:
            return False, None
        kind = key_type_of(key)
        if kind is None or kind.profile_name not in self.station.profile.key_types:
            return True, None
        records = await self.registry.certificates_with_key(public_key_sha256(key))
        mine = [r for r in records if r.device_id == self.device_id]
        cutoff = (_now() - self.station.settings.pending_ttl).strftime(TIMESTAMP_FORMAT)
        pending = [r for r in mine if r.status is CertificateStatus.PENDING and r.issued_at >= cutoff]
        if pending and len(pending) == len(mine):
            return False, pending[-1]
        if mine:
            for record in mine:
                if record.status is CertificateStatus.PENDING:
                    await self.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED,
                                                           actor=self.config.operator)
            return True, None
        return self.config.host_keygen, None

    async def _read_csr(self, key_type: KeyType, replace_key: bool) -> bytes:
        extra = self.config.policy.keygen_timeout
        first = await self.s.request(GenerateKey(key_type, replace_key, 0), Csr, extra_timeout=extra)
        if first.offset != 0:
            raise ProvisioningError("device returned a CSR chunk at the wrong offset")
        data = bytearray(first.data)
        while len(data) < first.total:
            chunk = await self.s.request(GenerateKey(key_type, False, len(data)), Csr, extra_timeout=extra)
            if chunk.total != first.total or chunk.offset != len(data) or not chunk.data:
                raise ProvisioningError("device returned an inconsistent CSR chunk")
            data += chunk.data
        return bytes(data)

    async def _put_host_key(self, plan: _Plan) -> None:
        """Host-key mode: make the key here, write it, and drop it.

        The private key exists only in this function: as the OpenSSL key
        object (freed, and its scalar cleared by OpenSSL, when dropped) and as
        one bytearray that is zeroed after the write. It is never logged,
        journaled or written anywhere but the device. (Python cannot promise
        that transient immutable copies, such as the frame bytes, are wiped
        before the memory is reused.)
        """
        private_key = generate_private_key(plan.key_type.profile_name)
        public_key = private_key.public_key()
        secret = bytearray(private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        del private_key
        try:
            await self.station.authority.check_public_key_free(public_key, self._device_id())
            digest = await self._put_object(PutKey, bytes(secret), KeyAck)
            if digest != sha256(bytes(secret)):
                raise ProvisioningError("the device stored a different key than was sent")
        finally:
            secret[:] = bytes(len(secret))
        self.public_key = public_key
        self._done({"key_source": "host", "key_type": plan.key_type.profile_name,
                    "public_key_sha256": public_key_sha256(public_key), "new_key": True})

    # -- 5 issue ---------------------------------------------------------------------------

    def _device_id(self) -> str:
        if self.device_id is None:
            raise ProvisioningError("no device id assigned")
        return self.device_id

    async def _issue(self, plan: _Plan) -> None:
        """Issue (durably, as pending) while the config, which needs no certificate, is written.

        The config carries the device id, broker and trust anchor, nothing
        secret and nothing that depends on the certificate, so writing it
        during issuance hides the registry's commit behind the wire. The
        certificate itself is only sent (step 6) after its record is durable.
        """
        config = self._config_object()
        certify = asyncio.ensure_future(self._certify())
        try:
            if await self._put_object(PutConfig, config, ConfigAck) != sha256(config):
                raise ProvisioningError("the device acknowledged a different config object")
        except BaseException:
            await asyncio.wait([certify])  # never abandon a registry write half way
            if not certify.cancelled():
                certify.exception()
            raise
        self.cert = await certify
        self._check_issued(self.cert)
        self._done({"serial": serial_hex(self.cert), "fingerprint": fingerprint(self.cert),
                    "reused": self.reuse is not None})

    async def _certify(self) -> x509.Certificate:
        if self.reuse is not None:
            return x509.load_pem_x509_certificate(self.reuse.pem.encode())
        device_id = self._device_id()
        key = self.public_key
        if key is None:
            raise ProvisioningError("no public key to certify")
        await self._revoke_orphans(public_key_sha256(key))
        await self.journal.barrier()
        authority, profile, operator = self.station.authority, self.station.profile.name, self.config.operator
        if self.csr is not None:
            issued = await authority.issue(self.csr, device_id, profile, hardware_id=self.hardware_id,
                                           activate=False, actor=operator)
        else:
            issued = await authority.issue_for_key(_certifiable(key), device_id, profile,
                                                   hardware_id=self.hardware_id, activate=False, actor=operator)
        return issued.certificate

    def _check_issued(self, cert: x509.Certificate) -> None:
        try:
            identity = self.station.verifier.verify(cert)
        except Rejection as exc:
            raise ProvisioningError(f"the issued certificate does not verify ({exc.code}): {exc}") from None
        if identity.device_id != self.device_id:
            raise ProvisioningError(f"the certificate names {identity.device_id!r}, not {self.device_id!r}")
        if self.public_key is not None and spki_der(cert.public_key()) != spki_der(self.public_key):
            raise ProvisioningError("the certificate's key is not the board's key")

    async def _revoke_orphans(self, key_sha256: str) -> None:
        """Pending certificates of this device for a key it no longer holds can never be delivered."""
        if not self.had_certificates:
            return
        for record in await self.registry.certificates_of(self._device_id()):
            if record.status is CertificateStatus.PENDING and record.public_key_sha256 != key_sha256:
                await self.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED,
                                                       actor=self.config.operator)

    # -- 6 write / 7 verify ------------------------------------------------------------------

    def _cert_object(self) -> bytes:
        der = serialization.Encoding.DER
        issuing = self.station.authority.ca.issuing_cert
        return encode_cert_bundle([self._cert().public_bytes(der), issuing.public_bytes(der)])

    def _config_object(self) -> bytes:
        settings, root = self.station.settings, self.station.authority.ca.root_cert
        anchors = (root.public_bytes(serialization.Encoding.DER),)
        return DeviceConfig(self._device_id(), settings.broker_host, settings.broker_port, anchors).encode()

    def _cert(self) -> x509.Certificate:
        if self.cert is None:
            raise ProvisioningError("no certificate")
        return self.cert

    async def _write(self, plan: _Plan) -> None:
        bundle = self._cert_object()
        if await self._put_object(PutCert, bundle, CertAck) != sha256(bundle):
            raise ProvisioningError("the device acknowledged a different certificate object")
        self._done({"cert_object_bytes": len(bundle), "config_bytes": len(self._config_object())})

    async def _put_object(self, kind: type[PutKey | PutCert | PutConfig], obj: bytes,
                          ack: type[KeyAck | CertAck | ConfigAck]) -> bytes:
        """Upload ``obj`` in chunks; resume or restart where the device says it stands."""
        chunk = min(self._info().max_payload, 1024) - 4
        offset, restarts = 0, 0
        while True:
            try:
                reply = await self.s.request(kind(len(obj), offset, obj[offset : offset + chunk]), ack)
            except DeviceRefused as exc:
                if exc.error.code != ErrorCode.BAD_OFFSET or restarts >= self.config.policy.attempts:
                    raise
                restarts += 1
                offset = exc.error.arg if exc.error.arg < offset else 0
                continue
            if reply.complete:
                return reply.sha256
            if not offset < reply.received <= len(obj):
                raise ProvisioningError(f"device acknowledged {reply.received} bytes at offset {offset}")
            offset = reply.received

    async def _verify(self, plan: _Plan) -> None:
        bundle, config = self._cert_object(), self._config_object()
        cert = self._cert()
        hashes = await self.s.request(ReadBack(), Hashes)
        expected = {
            "key": sha256(spki_der(cert.public_key())),
            "cert": bytes.fromhex(fingerprint(cert)),
            "chain": sha256(bundle),
            "config": sha256(config),
        }
        wrong = [name for name, digest in expected.items() if getattr(hashes, name) != digest]
        if wrong:
            raise ProvisioningError(f"read-back mismatch: {', '.join(wrong)}")
        self._done({name: digest.hex() for name, digest in expected.items()})

    # -- 8 prove / 9 commit / 10 activate -----------------------------------------------------

    async def _prove(self, plan: _Plan) -> None:
        cert = self._cert()
        nonce = secrets.token_bytes(32)
        reply = await self.s.request(Prove(nonce), Signature)
        if not verify_proof(cert.public_key(), reply.algorithm, reply.signature, nonce):
            raise ProvisioningError("PROVE signature does not verify against the certificate's key")
        self._done({"nonce": nonce.hex(), "algorithm": reply.algorithm.name.lower(),
                    "fingerprint": fingerprint(cert)})

    async def _commit(self, plan: _Plan) -> None:
        digest = bytes.fromhex(fingerprint(self._cert()))
        reply = await self.s.request(Commit(digest), Committed)
        if reply.fingerprint != digest:
            raise ProvisioningError("the device committed a different certificate")
        self._done({"fingerprint": digest.hex()})

    async def _activate(self, plan: _Plan) -> None:
        cert = self._cert()
        serial = serial_hex(cert)
        await self.journal.barrier()
        await self.registry.activate(self._device_id(), serial, actor=self.config.operator)
        superseded = []
        for record in await self.registry.certificates_of(self._device_id()) if self.had_certificates else []:
            if record.serial != serial and record.status is not CertificateStatus.REVOKED:
                await self.registry.revoke_certificate(record.serial, RevocationReason.SUPERSEDED,
                                                       actor=self.config.operator)
                superseded.append(record.serial)
        self._done({"serial": serial, "fingerprint": fingerprint(cert), "superseded": superseded,
                    "total_ms": round((time.monotonic() - self._t0) * 1000, 1)})


def _load_public_key(spki: bytes) -> PublicKeyTypes:
    try:
        return serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        raise ProvisioningError("the device reports a public key that is not valid SubjectPublicKeyInfo DER") from None


def _key_type(key: PublicKeyTypes) -> KeyType:
    kind = key_type_of(key)
    if kind is None:
        raise ProvisioningError(f"unsupported key algorithm {type(key).__name__}")
    return kind


def _certifiable(key: PublicKeyTypes) -> CertificatePublicKeyTypes:
    _key_type(key)
    return key  # type: ignore[return-value]
