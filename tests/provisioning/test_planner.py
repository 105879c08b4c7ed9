"""The planner, case by case: every way a board and the registry can meet, with no pty and no database.

Each row is one situation the station can find after a crash, a rerun or an
operator's mistake: what the board's INFO says (fresh, holding a key,
committed), what the registry holds for its hardware id and key, and the
options. The planner is run exactly as the station runs it -- check, then the
assignment, then the plan -- and the row says what must come out: an action
with its data, or a refusal and the step that refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from iotauth.certs import public_key_sha256, timestamp
from iotauth.errors import Conflict, IotAuthError, ProvisioningError
from iotauth.provisioning import planner
from iotauth.provisioning.messages import Capability, KeyType, KeyTypes
from iotauth.provisioning.planner import (
    Action,
    BoardState,
    KeyAction,
    PlanOptions,
    RegistryState,
)
from iotauth.registry import CertificateRecord, CertificateStatus, Credential, Device, DeviceStatus

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
HW = "HW-0001"
DEVICE = "sensor-HW-0001"
KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
OTHER_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
ED_KEY = ed25519.Ed25519PrivateKey.generate().public_key()
ALL_TYPES = KeyTypes.P256 | KeyTypes.P384 | KeyTypes.ED25519
OPTIONS = PlanOptions("default", frozenset({"p256", "p384"}), pending_ttl=timedelta(hours=1))
FORCE = replace(OPTIONS, force=True)
HOST = replace(OPTIONS, host_keygen=True)


def board(*, key: PublicKeyTypes | None = None, committed: bool = False, holds: CertificateRecord | None = None,
          capabilities: Capability = Capability.KEYGEN | Capability.PUT_KEY, key_types: KeyTypes = ALL_TYPES,
          hardware_id: str = HW) -> BoardState:
    return BoardState(hardware_id, committed, capabilities, key_types, key,
                      holds.fingerprint if holds is not None else None)


def device(device_id: str = DEVICE, *, hardware_id: str | None = HW, status: DeviceStatus = DeviceStatus.ACTIVE,
           profile: str = "default") -> Device:
    return Device(device_id, hardware_id, profile, status, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z")


_serials = iter(range(0x1000, 0x10000))


def cert(status: CertificateStatus, *, key: PublicKeyTypes = KEY, device_id: str = DEVICE,
         age: timedelta = timedelta(minutes=5)) -> CertificateRecord:
    serial = format(next(_serials), "x")
    return CertificateRecord(serial, f"fp-{serial}", device_id, public_key_sha256(key), "2026-01-01T00:00:00Z",
                             "2027-01-01T00:00:00Z", status, timestamp(NOW - age), "-----PEM-----")


def held(record: CertificateRecord, owner: Device | None = None) -> Credential:
    return Credential(record, owner or device(record.device_id))


ACTIVE = cert(CertificateStatus.ACTIVE)
PENDING = cert(CertificateStatus.PENDING)
PENDING_2 = cert(CertificateStatus.PENDING, age=timedelta(minutes=1))
OLD_PENDING = cert(CertificateStatus.PENDING, age=timedelta(hours=2))
REVOKED = cert(CertificateStatus.REVOKED)
OTHER_KEY_PENDING = cert(CertificateStatus.PENDING, key=OTHER_KEY)
OLD_OTHER_KEY_PENDING = cert(CertificateStatus.PENDING, key=OTHER_KEY, age=timedelta(hours=3))
FOREIGN = cert(CertificateStatus.ACTIVE, device_id="sensor-someone-else")


@dataclass(frozen=True)
class Case:
    """One row: the board, what the registry holds, the options, and what must come out."""

    board: BoardState
    owner: Device | None = None  # the device the registry binds the hardware id to
    device: Device | None = None  # the device under the assigned id, when the hardware id is unbound
    certificates: tuple[CertificateRecord, ...] = ()  # the device's certificates
    holds: Credential | None = None  # the credential of the certificate the board holds
    options: PlanOptions = OPTIONS
    assigned: str = DEVICE
    # what must come out
    action: Action | None = None
    key: KeyAction | None = None
    key_type: KeyType | None = None
    reuse: CertificateRecord | None = None
    supersede: tuple[CertificateRecord, ...] = ()
    revoke: tuple[CertificateRecord, ...] = ()
    erase: bool = False
    refused: tuple[type[IotAuthError], str, str] | None = None  # (error, message pattern, step)
    extra: dict[str, object] = field(default_factory=dict)


def key_certificates(case: Case) -> tuple[CertificateRecord, ...]:
    """What the registry returns for the board's key: every certificate of that key, of any device."""
    if case.board.key is None:
        return ()
    digest = public_key_sha256(case.board.key)
    every = {c.serial: c for c in (*case.certificates, *case.extra.get("elsewhere", ()))}  # type: ignore[misc]
    return tuple(c for c in every.values() if c.public_key_sha256 == digest)


def run_planner(case: Case) -> planner.Plan:
    """The planner's three calls, in the station's order, with what the station would have read."""
    known = RegistryState(hardware_owner=case.owner, key_certificates=key_certificates(case), held=case.holds)
    key_type = planner.check_board(case.board, known, case.options)
    known = replace(known, device=case.owner or case.device)
    planner.check_assignment(case.board, known, case.assigned, case.options)
    known = replace(known, device_certificates=case.certificates if known.device is not None else ())
    return planner.plan(case.board, known, case.assigned, key_type, case.options, NOW)


CASES: dict[str, Case] = {
    # -- fresh boards ------------------------------------------------------------------------
    "fresh board: the board makes a key": Case(board(), action=Action.PROVISION, key=KeyAction.GENERATE,
                                               key_type=KeyType.P256),
    "fresh board, host keys": Case(board(), options=HOST, action=Action.PROVISION, key=KeyAction.HOST),
    "fresh board, the profile allows only p384": Case(
        board(), options=replace(OPTIONS, key_types=frozenset({"p384"})), action=Action.PROVISION,
        key=KeyAction.GENERATE, key_type=KeyType.P384),
    "fresh board under a known, certificate-less device id": Case(
        board(), device=device(hardware_id=None, status=DeviceStatus.PENDING), action=Action.PROVISION,
        key=KeyAction.GENERATE),
    # -- a board that kept its key -----------------------------------------------------------
    "key but no certificate: a CSR over the kept key": Case(
        board(key=KEY), action=Action.PROVISION, key=KeyAction.KEEP, key_type=KeyType.P256),
    "key but no certificate, host keys: a new host key": Case(
        board(key=KEY), options=HOST, action=Action.PROVISION, key=KeyAction.HOST),
    "pending certificate for the board's key: delivered again": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(PENDING,),
        action=Action.PROVISION, key=KeyAction.REUSE, reuse=PENDING),
    "two young pending certificates: the newest is delivered": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(PENDING, PENDING_2),
        action=Action.PROVISION, key=KeyAction.REUSE, reuse=PENDING_2),
    "pending certificate, host keys: still delivered again": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(PENDING,), options=HOST,
        action=Action.PROVISION, key=KeyAction.REUSE, reuse=PENDING),
    "expired pending certificate: the key is replaced, the certificate superseded": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(OLD_PENDING,),
        action=Action.PROVISION, key=KeyAction.REPLACE, supersede=(OLD_PENDING,), key_type=KeyType.P256),
    "young and expired pending: replaced, both superseded": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(OLD_PENDING, PENDING),
        action=Action.PROVISION, key=KeyAction.REPLACE, supersede=(OLD_PENDING, PENDING)),
    "the key's certificate was revoked: replaced, never re-certified": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(REVOKED,),
        action=Action.PROVISION, key=KeyAction.REPLACE),
    "revoked and young pending for the key: replaced, the pending superseded": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(REVOKED, PENDING),
        action=Action.PROVISION, key=KeyAction.REPLACE, supersede=(PENDING,)),
    "expired pending certificate of another key: a CSR over the board's (new) key": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(OLD_OTHER_KEY_PENDING,),
        action=Action.PROVISION, key=KeyAction.KEEP),
    "young pending certificate of another key: another board claims the hardware id": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(OTHER_KEY_PENDING,),
        refused=(Conflict, "another board with hardware id 'HW-0001' is being provisioned; .* use --force",
                 "assign")),
    "young pending certificate of another key, a fresh board: refused too": Case(
        board(), owner=device(status=DeviceStatus.PENDING), certificates=(OTHER_KEY_PENDING,),
        refused=(Conflict, "another board with hardware id", "assign")),
    "young pending certificate of another key, --force: that board's delivery is replaced": Case(
        board(key=KEY), owner=device(status=DeviceStatus.PENDING), certificates=(OTHER_KEY_PENDING,),
        options=FORCE, action=Action.PROVISION, key=KeyAction.REPLACE, key_type=KeyType.P256),
    "key never certified, --force: replaced (a refused CSR's key never sticks)": Case(
        board(key=KEY), options=FORCE, action=Action.PROVISION, key=KeyAction.REPLACE, key_type=KeyType.P256),
    "board key of a type the profile refuses: replaced, nothing read": Case(
        board(key=ED_KEY), action=Action.PROVISION, key=KeyAction.REPLACE, key_type=KeyType.P256),
    # -- committed boards ------------------------------------------------------------------------
    "committed and active: confirm": Case(
        board(key=KEY, committed=True, holds=ACTIVE), owner=device(), certificates=(ACTIVE,), holds=held(ACTIVE),
        action=Action.CONFIRM),
    "committed but never activated: finish": Case(
        board(key=KEY, committed=True, holds=PENDING), owner=device(status=DeviceStatus.PENDING),
        certificates=(PENDING,), holds=held(PENDING), action=Action.FINISH),
    "committed with a revoked certificate, no --force": Case(
        board(key=KEY, committed=True, holds=REVOKED), owner=device(), certificates=(REVOKED,), holds=held(REVOKED),
        refused=(Conflict, r"committed with certificate fp-.* \(revoked\); re-provision it with --force", "assign")),
    "committed with a certificate unknown to the registry, no --force": Case(
        board(committed=True, holds=ACTIVE), refused=(Conflict, "unknown to this registry", "assign")),
    "committed and active, --force: revoke, erase, provision": Case(
        board(key=KEY, committed=True, holds=ACTIVE), owner=device(), certificates=(ACTIVE, REVOKED, PENDING),
        holds=held(ACTIVE), options=FORCE, action=Action.PROVISION, erase=True, revoke=(ACTIVE, PENDING),
        key=KeyAction.GENERATE),
    "committed, --force and host keys": Case(
        board(key=KEY, committed=True, holds=ACTIVE), owner=device(), certificates=(ACTIVE,), holds=held(ACTIVE),
        options=replace(FORCE, host_keygen=True), action=Action.PROVISION, erase=True, revoke=(ACTIVE,),
        key=KeyAction.HOST),
    "committed with another device's certificate, --force": Case(
        board(committed=True, holds=FOREIGN), holds=held(FOREIGN), options=FORCE, action=Action.PROVISION,
        erase=True, key=KeyAction.GENERATE),
    # -- a device that is live elsewhere ---------------------------------------------------------
    "active certificate but an uncommitted board (erased or swapped)": Case(
        board(key=KEY), owner=device(), certificates=(ACTIVE,),
        refused=(Conflict, "has an active certificate but this board is not committed", "assign")),
    "active certificate, uncommitted board, --force: the old certificate is revoked": Case(
        board(), owner=device(), certificates=(ACTIVE,), options=FORCE, action=Action.PROVISION,
        revoke=(ACTIVE,), key=KeyAction.GENERATE),
    # -- refusals at CHECK ---------------------------------------------------------------------
    "hardware id of a revoked device": Case(
        board(), owner=device(status=DeviceStatus.REVOKED), refused=(Conflict, "revocation is final", "check")),
    "a board that cannot make keys, CSR mode": Case(
        board(capabilities=Capability.PUT_KEY), refused=(ProvisioningError, "use --host-keygen", "check")),
    "a board that takes no host keys, host mode": Case(
        board(capabilities=Capability.KEYGEN), options=HOST,
        refused=(ProvisioningError, "does not accept host keys", "check")),
    "no key type both sides allow": Case(
        board(key_types=KeyTypes.ED25519), refused=(ProvisioningError, "no key type both allowed", "check")),
    "duplicate key: the board's key belongs to another device": Case(
        board(key=KEY), extra={"elsewhere": (cert(CertificateStatus.ACTIVE, device_id="sensor-other"),)},
        refused=(Conflict, "duplicate public key: the board's key already belongs to device 'sensor-other'", "check")),
    # -- refusals at ASSIGN ----------------------------------------------------------------------
    "hardware id bound to another device": Case(
        board(), owner=device("sensor-first"), refused=(Conflict, "already bound to device 'sensor-first'", "assign")),
    "device id bound to other hardware": Case(
        board(), device=device(hardware_id="HW-9999"),
        refused=(Conflict, "already belongs to hardware id 'HW-9999'", "assign")),
    "device id of a revoked device": Case(
        board(), device=device(hardware_id=None, status=DeviceStatus.REVOKED),
        refused=(Conflict, "revoked device id cannot be provisioned again", "assign")),
    "device of another profile": Case(
        board(), owner=device(profile="ingest"), refused=(Conflict, "has profile 'ingest', not 'default'", "assign")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_planner(case: Case) -> None:
    if case.refused is not None:
        error, pattern, step = case.refused
        with pytest.raises(error, match=pattern) as caught:
            run_planner(case)
        assert _refusing_step(case) == step, caught.value
        return
    plan = run_planner(case)
    assert plan.action is case.action
    assert plan.erase == case.erase
    assert plan.revoke == case.revoke
    assert plan.had_certificates == bool(case.certificates and (case.owner or case.device))
    if case.action is not Action.PROVISION:
        assert plan.key is None
        return
    assert plan.key is not None
    assert plan.key.action is case.key
    assert plan.key.reuse == case.reuse
    assert plan.key.supersede == case.supersede
    if case.key_type is not None:
        assert plan.key.key_type is case.key_type


def _refusing_step(case: Case) -> str:
    known = RegistryState(hardware_owner=case.owner, key_certificates=key_certificates(case), held=case.holds)
    try:
        planner.check_board(case.board, known, case.options)
    except IotAuthError:
        return "check"
    return "assign"


def test_every_resume_action_and_key_source_has_a_row() -> None:
    rows = [c for c in CASES.values() if c.refused is None]
    assert {c.action for c in rows} == set(Action)
    assert {c.key for c in rows if c.key is not None} == set(KeyAction)


def test_the_board_key_is_parsed_from_info_and_garbage_is_refused() -> None:
    from iotauth.provisioning.messages import DeviceState, Info
    from iotauth.provisioning.objects import spki_der

    info = Info(1, 1024, Capability.KEYGEN, KeyTypes.P256, DeviceState.COMMITTED, HW, "m", "f", spki_der(KEY),
                bytes(32))
    state = BoardState.from_info(info)
    assert state.committed and state.key == KEY and state.cert_fingerprint == "00" * 32
    with pytest.raises(ProvisioningError, match="not valid SubjectPublicKeyInfo"):
        BoardState.from_info(replace(info, public_key=b"\x30\x03garbage"))


Helper = Callable[[list[CertificateRecord], str], list[CertificateRecord]]


@pytest.mark.parametrize(
    ("helper", "argument", "expected"),
    [
        (planner.superseded, ACTIVE.serial, [PENDING, OTHER_KEY_PENDING, OLD_OTHER_KEY_PENDING]),
    ],
    ids=["what an activation supersedes"],
)
def test_after_issuance(helper: Helper, argument: str, expected: list[CertificateRecord]) -> None:
    assert helper([ACTIVE, PENDING, REVOKED, OTHER_KEY_PENDING, OLD_OTHER_KEY_PENDING], argument) == expected


@pytest.mark.parametrize(
    ("force", "expected"),
    [(False, [OLD_OTHER_KEY_PENDING]), (True, [OTHER_KEY_PENDING, OLD_OTHER_KEY_PENDING])],
    ids=["expired deliveries of another key only", "--force: every pending certificate of another key"],
)
def test_orphaned_deliveries_superseded_before_issuing(force: bool, expected: list[CertificateRecord]) -> None:
    certs = [ACTIVE, PENDING, REVOKED, OTHER_KEY_PENDING, OLD_OTHER_KEY_PENDING]
    found = planner.orphaned(certs, public_key_sha256(KEY), pending_ttl=timedelta(hours=1), now=NOW, force=force)
    assert found == expected


REKEY: dict[str, tuple[KeyAction, KeyAction | None]] = {
    "a kept (never certified) key whose CSR was refused is replaced": (KeyAction.KEEP, KeyAction.REPLACE),
    "a key just generated gave a bad CSR: no retry": (KeyAction.GENERATE, None),
    "a key just replaced gave a bad CSR: no retry": (KeyAction.REPLACE, None),
}


@pytest.mark.parametrize(("before", "after"), REKEY.values(), ids=REKEY.keys())
def test_rekey_after_a_refused_csr(before: KeyAction, after: KeyAction | None) -> None:
    retry = planner.rekey_after_rejection(planner.KeyPlan(before, KeyType.P256))
    assert (retry.action if retry is not None else None) is after
    if retry is not None:
        assert retry.key_type is KeyType.P256


@pytest.mark.parametrize(
    ("key_types", "refused"),
    [({"p256", "rsa"}, False), ({"ed25519"}, False), ({"rsa"}, True)],
    ids=["rsa beside a device key type", "ed25519 only", "rsa only: the station cannot provision it"],
)
def test_profile_key_types_the_station_can_provision(key_types: set[str], refused: bool) -> None:
    options = replace(OPTIONS, key_types=frozenset(key_types))
    if refused:
        with pytest.raises(ProvisioningError, match=r"allows only rsa; .*issue RSA devices from a CSR"):
            planner.check_profile(options)
    else:
        planner.check_profile(options)
