"""One board on one port, from HELLO to activation (or a reasoned failure).

For each board the station runs ten steps::

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

What to do is decided by :mod:`iotauth.provisioning.planner` from what the
board and the registry say (never from station memory, so a rerun after any
crash decides correctly); this module reads them, executes the plan and talks
to the board through :class:`~iotauth.provisioning.board.Board`.

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
import secrets
import time
from dataclasses import replace

from cryptography import x509

from iotauth.certs import fingerprint, now_utc, public_key_sha256, serial_hex
from iotauth.errors import IotAuthError, LinkClosed, NotFound, ProvisioningError
from iotauth.identity import validate_hardware_id
from iotauth.provisioning import planner
from iotauth.provisioning.board import Board
from iotauth.provisioning.certify import Certification
from iotauth.provisioning.context import RunState
from iotauth.provisioning.messages import Capability, DeviceState, KeyType
from iotauth.provisioning.objects import spki_der, verify_proof
from iotauth.provisioning.planner import Action, BoardState, Plan, RegistryState
from iotauth.provisioning.results import Progress, ProvisionResult, Step
from iotauth.provisioning.session import Session, printable
from iotauth.provisioning.transport import Link
from iotauth.registry import EventKind


class Run(RunState):
    """One board on one port (see the module docstring)."""

    def _budget(self, step: Step) -> float:
        policy = self.context.policy
        byte_time = 10.0 / self.context.baudrate
        extra = policy.keygen_timeout if step is Step.KEY else 0.0
        return 12 * policy.request_budget(byte_time, extra) + 30.0

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> ProvisionResult:
        """Run the board's steps; never raises, always returns a result."""
        link: Link | None = None
        try:
            link = await self._open()
            self.session = Session(link, self.context.policy)
            board = Board(self.session, keygen_timeout=self.context.policy.keygen_timeout,
                          restarts=self.context.policy.attempts)
            outcome = await self._steps(board)
            await self.journal.flush()  # a result is reported only once all its step records are durable
            return self.result(outcome)
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
        self.record(EventKind.PROVISIONING_FAILED, {
            "hardware_id": self.hardware_id, "station": self.context.station, "port": self.port,
            "step": self.step.label, "error": reason,
        })
        self.context.progress(Progress(self.port, self.step, "failed", self.hardware_id, self.device_id, reason))
        with contextlib.suppress(IotAuthError):
            await self.journal.flush()
        return self.result("failed", reason)

    async def _open(self) -> Link:
        policy = self.context.policy
        for attempt in range(1, policy.attempts + 1):
            try:
                return await self.context.open_link(self.port)
            except LinkClosed:
                if attempt == policy.attempts:
                    raise
                await asyncio.sleep(max(policy.pause(attempt), 0.05))
        raise LinkClosed(f"cannot open {self.port}")

    async def _steps(self, board: Board) -> str:
        async with asyncio.timeout(self._budget(Step.IDENTIFY)):
            await board.start()
            await self._identify(board)
        state, known, key_type = await self._check()
        plan = await self._assign(state, known, key_type)
        if plan.action is Action.CONFIRM:
            return await self._confirm(board, state, known)
        if plan.action is Action.FINISH:
            self.resumed = True
            return await self._finish(board, state, known, plan)
        await self._prepare(board, plan)
        issue = Certification(self, board, plan, state.key)
        for step, work in (
            (Step.KEY, issue.key),
            (Step.ISSUE, issue.issue),
            (Step.WRITE, issue.write),
            (Step.VERIFY, issue.verify),
            (Step.PROVE, lambda: self._prove(board)),
            (Step.COMMIT, lambda: self._commit(board)),
            (Step.ACTIVATE, lambda: self._activate(plan)),
        ):
            self.begin(step)
            async with asyncio.timeout(self._budget(step)):
                await work()
        return "provisioned"

    # -- 1 identify / 2 check / 3 assign ----------------------------------------------------

    async def _identify(self, board: Board) -> None:
        self.begin(Step.IDENTIFY)
        info = await board.identify()
        self.hardware_id = validate_hardware_id(info.hardware_id)
        self.info = info
        self.done({
            "model": printable(info.model),
            "firmware": printable(info.firmware),
            "state": [str(f.name).lower() for f in DeviceState if f in info.state],
            "capabilities": [str(f.name).lower() for f in Capability if f in info.capabilities],
            "held_fingerprint": info.cert_fingerprint.hex() or None,
        }, detail=self.hardware_id)

    async def _check(self) -> tuple[BoardState, RegistryState, KeyType]:
        self.begin(Step.CHECK)
        state = BoardState.from_info(self.identified())
        owner = await self.registry.find_device_by_hardware_id(state.hardware_id)
        key_sha256 = public_key_sha256(state.key) if state.key is not None else None
        keyed = await self.registry.certificates_with_key(key_sha256) if key_sha256 is not None else []
        held = await self.registry.find_credential(state.cert_fingerprint) if state.cert_fingerprint else None
        known = RegistryState(hardware_owner=owner, key_certificates=tuple(keyed), held=held)
        key_type = planner.check_board(state, known, self.context.options)
        self.done({
            "key_type": key_type.profile_name,
            "known_device": owner.device_id if owner else None,
            "device_key_sha256": key_sha256,
            "held_status": held.certificate.status.value if held else None,
        })
        return state, known, key_type

    async def _assign(self, state: BoardState, known: RegistryState, key_type: KeyType) -> Plan:
        self.begin(Step.ASSIGN)
        ids = self.context.ids
        assigned = await ids.assign(state.hardware_id, self.identified().model, known.hardware_owner)
        device_id = self.context.authority.settings.check_device_id(assigned)  # e.g. no '.' with RabbitMQ
        device = known.hardware_owner
        if device is None:
            with contextlib.suppress(NotFound):
                device = await self.registry.get_device(device_id)
        known = replace(known, device=device)
        planner.check_assignment(state, known, device_id, self.context.options)
        self.device_id = device_id
        certificates = await self.registry.certificates_of(device_id) if device is not None else []
        known = replace(known, device_certificates=tuple(certificates))
        plan = planner.plan(state, known, device_id, key_type, self.context.options, now_utc())
        self.done({"device_id": device_id, "source": ids.describe(), "action": plan.action.value,
                    "force": self.context.options.force}, detail=device_id)
        return plan

    # -- confirm / finish (resume after COMMIT) ---------------------------------------------

    def _held_cert(self, state: BoardState, known: RegistryState) -> x509.Certificate:
        if known.held is None:
            raise ProvisioningError("no held certificate")
        cert = x509.load_pem_x509_certificate(known.held.certificate.pem.encode())
        if state.key is None or spki_der(cert.public_key()) != spki_der(state.key):
            raise ProvisioningError("the board's key does not match the certificate it holds")
        return cert

    async def _confirm(self, board: Board, state: BoardState, known: RegistryState) -> str:
        """The board is committed and active: prove it still holds the key, change nothing."""
        self.cert = self._held_cert(state, known)
        self.begin(Step.PROVE, "already provisioned")
        await self._prove(board)
        return "already-provisioned"

    async def _finish(self, board: Board, state: BoardState, known: RegistryState, plan: Plan) -> str:
        """The board committed but the station never activated it (crash, lost reply): finish the job."""
        self.cert = self._held_cert(state, known)
        self.check_issued(self.cert)
        self.begin(Step.PROVE, "resuming after commit")
        await self._prove(board)
        self.begin(Step.ACTIVATE)
        await self._activate(plan)
        return "provisioned"

    async def _prepare(self, board: Board, plan: Plan) -> None:
        """Revoke what ``force`` replaces, then erase a committed board."""
        if not plan.revoke and not plan.erase:
            return
        self.begin(Step.KEY, "erasing the board" if plan.erase else "revoking the old certificate")
        revoked = await self.supersede(plan.revoke)
        if plan.erase:
            await board.erase(self.identified().hardware_id)
            self.info = replace(self.identified(), state=DeviceState(0), public_key=b"", cert_fingerprint=b"")
        self.record(EventKind.PROVISIONING_ERASED if plan.erase else EventKind.PROVISIONING_SUPERSEDED, {
            "hardware_id": self.hardware_id, "station": self.context.station, "port": self.port,
            "revoked": revoked, "force": self.context.options.force,
        })

    # -- 8 prove / 9 commit / 10 activate -----------------------------------------------------

    async def _prove(self, board: Board) -> None:
        cert = self.certificate()
        nonce = secrets.token_bytes(32)
        reply = await board.prove(nonce)
        if not verify_proof(cert.public_key(), reply.algorithm, reply.signature, nonce):
            raise ProvisioningError("PROVE signature does not verify against the certificate's key")
        self.done({"nonce": nonce.hex(), "algorithm": reply.algorithm.name.lower(),
                    "fingerprint": fingerprint(cert)})

    async def _commit(self, board: Board) -> None:
        digest = bytes.fromhex(fingerprint(self.certificate()))
        if await board.commit(digest) != digest:
            raise ProvisioningError("the device committed a different certificate")
        self.done({"fingerprint": digest.hex()})

    async def _activate(self, plan: Plan) -> None:
        cert = self.certificate()
        serial = serial_hex(cert)
        await self.journal.barrier()
        await self.registry.activate(self.assigned_id(), serial, actor=self.context.operator)
        others = await self.registry.certificates_of(self.assigned_id()) if plan.had_certificates else []
        superseded = await self.supersede(planner.superseded(others, serial))
        self.done({"serial": serial, "fingerprint": fingerprint(cert), "superseded": superseded,
                    "total_ms": round((time.monotonic() - self._t0) * 1000, 1)})
