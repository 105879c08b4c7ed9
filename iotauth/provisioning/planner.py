"""What to do with a board, decided from the board's flash and the registry alone. Pure: no I/O.

Crash safety comes from deriving every decision from the two durable sources
of truth, the board's flash (its INFO) and the registry, never from station
memory, so a station that died at any point decides correctly when it runs
again. The station reads both (:class:`BoardState`, :class:`RegistryState`)
and asks this module, at three points:

* **check** (:func:`check_board`): a hardware id of a revoked device, a board
  that cannot make (or take) keys, no key type both sides allow, or a board
  key that belongs to another device are refused; otherwise the key type is chosen.
* **assign** (:func:`check_assignment`, then :func:`plan`): the assigned id
  must agree with the registry; then the board is *confirmed* (committed and
  active: prove, change nothing), *finished* (committed but never activated:
  prove and activate) or *provisioned*. A committed board, or a device with an
  active certificate, is only re-provisioned with ``force``, which revokes the
  old certificates (superseded) and erases a committed board first.
* **key** (:class:`KeyPlan`, part of the plan): a key is certified at most
  once. A board key whose young pending certificates are all it has gets that
  certificate again (no second certificate for one hardware id and key); a
  key that was certified before (revoked, expired pending) or that the
  profile does not allow is replaced, never re-certified.
* **one board per hardware id**: a young pending certificate of *another*
  key means another board claiming this hardware id is in flight (or was
  erased mid-run); it is refused without ``force``. The registry enforces the
  same rule inside the issuing transaction, so two boards racing on two ports
  or two stations cannot both get a certificate.
* **re-key** (:func:`rekey_after_rejection`): a key that was never certified
  is safe to replace, since nothing in the field depends on it. So a CSR over
  a *kept* key that the station refuses (not DER, bad signature, wrong key
  type) is answered at once, in the same run, with GENERATE_KEY(REPLACE); and
  ``force`` replaces an uncommitted board's uncertified key outright. A fresh
  key whose CSR is refused is not retried: that firmware makes bad CSRs.

Refusals are raised as :class:`~iotauth.errors.Conflict` (the registry says
no) or :class:`~iotauth.errors.ProvisioningError` (the board cannot).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from iotauth.certs import public_key_sha256, timestamp
from iotauth.errors import Conflict, ProvisioningError
from iotauth.provisioning.messages import Capability, DeviceState, Info, KeyType, KeyTypes
from iotauth.provisioning.objects import wire_key_type
from iotauth.registry import CertificateRecord, CertificateStatus, Credential, Device, DeviceStatus

KEY_PREFERENCE = (KeyType.P256, KeyType.P384, KeyType.ED25519)


class Action(Enum):
    """What the station does with a board once it knows who the board is."""

    PROVISION = "provision"  # steps 4-10: key, issue, write, verify, prove, commit, activate
    CONFIRM = "confirm"  # committed and active: prove the board still holds the key, change nothing
    FINISH = "finish"  # committed but never activated (crash, lost reply): prove, then activate


class KeyAction(Enum):
    """Where the key to certify comes from (step 4)."""

    REUSE = "reuse"  # the board's key has a young pending certificate: deliver that certificate again
    KEEP = "keep"  # the board's key was never certified: the board signs a CSR with it
    REPLACE = "replace"  # the board's key was certified before or is not allowed: the board makes a new one
    GENERATE = "generate"  # the board holds no key: it makes one
    HOST = "host"  # host-key mode: the station makes the key and writes it


@dataclass(frozen=True)
class BoardState:
    """What the board's INFO says it is and holds."""

    hardware_id: str
    committed: bool
    capabilities: Capability
    key_types: KeyTypes
    key: PublicKeyTypes | None = None
    cert_fingerprint: str | None = None

    @classmethod
    def from_info(cls, info: Info) -> BoardState:
        """Read INFO; a public key that is not valid SubjectPublicKeyInfo DER is refused."""
        key = None
        if info.public_key:
            try:
                key = serialization.load_der_public_key(info.public_key)
            except (ValueError, UnsupportedAlgorithm):
                raise ProvisioningError(
                    "the device reports a public key that is not valid SubjectPublicKeyInfo DER"
                ) from None
        return cls(
            hardware_id=info.hardware_id,
            committed=DeviceState.COMMITTED in info.state,
            capabilities=info.capabilities,
            key_types=info.key_types,
            key=key,
            cert_fingerprint=info.cert_fingerprint.hex() or None,
        )


@dataclass(frozen=True)
class RegistryState:
    """What the station read from the registry about this board.

    Attributes:
        hardware_owner: the device the board's hardware id is bound to.
        key_certificates: every certificate for the board's public key.
        held: the certificate the board says it holds, with its device.
        device: the device under the assigned id (read once the id is assigned).
        device_certificates: that device's certificates.
    """

    hardware_owner: Device | None = None
    key_certificates: tuple[CertificateRecord, ...] = ()
    held: Credential | None = None
    device: Device | None = None
    device_certificates: tuple[CertificateRecord, ...] = ()


@dataclass(frozen=True)
class PlanOptions:
    """The station's choices that decisions depend on."""

    profile: str
    key_types: Collection[str]
    host_keygen: bool = False
    force: bool = False
    pending_ttl: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class KeyPlan:
    """Step 4: the key to certify.

    Attributes:
        action: where the key comes from.
        key_type: what to ask the board for (the board's own type for ``KEEP``).
        reuse: the pending certificate to deliver again (``REUSE``).
        supersede: pending certificates of the board's key that can never be delivered, to revoke first.
    """

    action: KeyAction
    key_type: KeyType
    reuse: CertificateRecord | None = None
    supersede: tuple[CertificateRecord, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What the run will do with the board.

    Attributes:
        action: provision, confirm or finish.
        key: step 4 (``PROVISION`` only).
        revoke: certificates ``force`` replaces, revoked (superseded) before anything else.
        erase: erase the committed board before provisioning it again.
        had_certificates: the device had certificates before this run (otherwise there are none to supersede).
    """

    action: Action
    key: KeyPlan | None = None
    revoke: tuple[CertificateRecord, ...] = field(default=())
    erase: bool = False
    had_certificates: bool = False


# -- check -----------------------------------------------------------------------------------


def check_profile(options: PlanOptions) -> None:
    """Refuse, before any board is touched, a profile whose key types a board cannot hold.

    The wire protocol carries P-256, P-384 and Ed25519 keys. RSA is not one of
    them on purpose: an RSA SubjectPublicKeyInfo does not fit INFO's ``bytes8``
    public key, and generating an RSA key on a device takes seconds to minutes.
    A profile that also allows RSA is fine (the station picks a key type the
    board can hold); one that allows only RSA cannot be provisioned here.
    """
    wire = {kind.profile_name for kind in KeyType}
    if not wire & set(options.key_types):
        raise ProvisioningError(
            f"profile {options.profile!r} allows only {', '.join(sorted(options.key_types))}; the provisioning "
            f"station can give devices {', '.join(sorted(wire))} keys (RSA keys do not fit the serial protocol); "
            "issue RSA devices from a CSR with 'iotauth issue'"
        )



def check_board(board: BoardState, registry: RegistryState, options: PlanOptions) -> KeyType:
    """Refuse a board that cannot be provisioned here; return the key type to ask it for."""
    owner = registry.hardware_owner
    if owner is not None and owner.status is DeviceStatus.REVOKED:
        raise Conflict(f"hardware id {board.hardware_id!r} belongs to revoked device {owner.device_id!r}; "
                       "revocation is final")
    needed = Capability.PUT_KEY if options.host_keygen else Capability.KEYGEN
    if not board.capabilities & needed:
        raise ProvisioningError("the device does not accept host keys" if options.host_keygen
                                else "the device cannot generate keys; use --host-keygen")
    key_type = choose_key_type(board.key_types, options)
    owner_id = owner.device_id if owner is not None else None
    for record in registry.key_certificates:
        if record.device_id != owner_id:
            raise Conflict(f"duplicate public key: the board's key already belongs to device {record.device_id!r}")
    return key_type


def choose_key_type(supported: KeyTypes, options: PlanOptions) -> KeyType:
    """The most preferred key type that both the profile and the board allow."""
    for kind in KEY_PREFERENCE:
        if kind.profile_name in options.key_types and supported & kind.flag:
            return kind
    raise ProvisioningError(f"no key type both allowed by profile {options.profile!r} "
                            f"({', '.join(sorted(options.key_types))}) and supported by the device")


# -- assign ----------------------------------------------------------------------------------


def check_assignment(board: BoardState, registry: RegistryState, device_id: str, options: PlanOptions) -> None:
    """Refuse an assigned id that the registry binds to other hardware, to a revoked device or another profile."""
    owner = registry.hardware_owner
    if owner is not None and owner.device_id != device_id:
        raise Conflict(f"hardware id {board.hardware_id!r} is already bound to device {owner.device_id!r}, "
                       f"not {device_id!r}")
    device = registry.device
    if owner is None and device is not None:
        if device.hardware_id not in (None, board.hardware_id):
            raise Conflict(f"device id {device_id!r} already belongs to hardware id {device.hardware_id!r}")
        if device.status is DeviceStatus.REVOKED:
            raise Conflict(f"device {device_id!r} is revoked; a revoked device id cannot be provisioned again")
    if device is not None and device.profile != options.profile:
        raise Conflict(f"device {device_id!r} has profile {device.profile!r}, not {options.profile!r}")


def plan(board: BoardState, registry: RegistryState, device_id: str, key_type: KeyType, options: PlanOptions,
         now: datetime) -> Plan:
    """Confirm, finish or provision; refuse to overwrite a live identity without ``force``."""
    certs = registry.device_certificates
    had = bool(certs)
    held = registry.held
    if board.committed:
        if held is not None and held.certificate.device_id == device_id and not options.force:
            if held.certificate.status is CertificateStatus.ACTIVE:
                return Plan(Action.CONFIRM, had_certificates=had)
            if held.certificate.status is CertificateStatus.PENDING:
                return Plan(Action.FINISH, had_certificates=had)
        if not options.force:
            status = held.certificate.status.value if held else "unknown to this registry"
            raise Conflict(f"the board is committed with certificate {(board.cert_fingerprint or '')[:16]} "
                           f"({status}); re-provision it with --force")
        revoke = tuple(c for c in certs if c.status is not CertificateStatus.REVOKED)
        key = plan_key(None, (), device_id, key_type, options, now)
        return Plan(Action.PROVISION, key, revoke, erase=True, had_certificates=had)
    live = tuple(c for c in certs if c.status is CertificateStatus.ACTIVE)
    if live and not options.force:
        raise Conflict(f"device {device_id!r} has an active certificate but this board is not committed "
                       "(erased or swapped?); re-provision it with --force")
    in_flight = in_flight_elsewhere(certs, board.key, options.pending_ttl, now)
    if in_flight and not options.force:
        raise Conflict(f"device {device_id!r} has a pending certificate {in_flight[0].serial} issued "
                       f"{in_flight[0].issued_at} for another key: another board with hardware id "
                       f"{board.hardware_id!r} is being provisioned; if that board is gone, use --force")
    key = plan_key(board.key, registry.key_certificates, device_id, key_type, options, now)
    return Plan(Action.PROVISION, key, live, had_certificates=had)


def in_flight_elsewhere(certificates: Sequence[CertificateRecord], board_key: PublicKeyTypes | None,
                        pending_ttl: timedelta, now: datetime) -> list[CertificateRecord]:
    """Young pending certificates of the device for a key the board does not hold: another board's delivery."""
    key_sha256 = public_key_sha256(board_key) if board_key is not None else None
    cutoff = timestamp(now - pending_ttl)
    return [c for c in certificates if c.status is CertificateStatus.PENDING and c.issued_at >= cutoff
            and c.public_key_sha256 != key_sha256]


def rekey_after_rejection(key: KeyPlan) -> KeyPlan | None:
    """The station refused the CSR the board sent for ``key``: the plan to try once more, or None.

    Only a *kept* key is replaced: it was never certified, so nothing depends
    on it. A key the board just made (GENERATE, REPLACE) gave a bad CSR at
    once; asking again would only loop.
    """
    if key.action is KeyAction.KEEP:
        return replace(key, action=KeyAction.REPLACE)
    return None


def plan_key(board_key: PublicKeyTypes | None, key_certificates: Sequence[CertificateRecord], device_id: str,
             key_type: KeyType, options: PlanOptions, now: datetime) -> KeyPlan:
    """Step 4 for a board holding ``board_key`` (None: none, or erased) with these certificates for it."""
    fresh = KeyAction.HOST if options.host_keygen else KeyAction.GENERATE
    if board_key is None:
        return KeyPlan(fresh, key_type)
    kind = wire_key_type(board_key)
    if kind is None or kind.profile_name not in options.key_types:
        return KeyPlan(KeyAction.HOST if options.host_keygen else KeyAction.REPLACE, key_type)
    mine = [r for r in key_certificates if r.device_id == device_id]
    cutoff = timestamp(now - options.pending_ttl)
    young = [r for r in mine if r.status is CertificateStatus.PENDING and r.issued_at >= cutoff]
    if young and len(young) == len(mine):
        return KeyPlan(KeyAction.REUSE, kind, reuse=young[-1])
    if mine:
        stale = tuple(r for r in mine if r.status is CertificateStatus.PENDING)
        return KeyPlan(KeyAction.HOST if options.host_keygen else KeyAction.REPLACE, key_type, supersede=stale)
    if options.host_keygen:
        return KeyPlan(KeyAction.HOST, key_type)
    if options.force:  # never certified, so safe to replace: --force always starts from a fresh key
        return KeyPlan(KeyAction.REPLACE, key_type)
    return KeyPlan(KeyAction.KEEP, kind)


# -- after issuance ----------------------------------------------------------------------------


def orphaned(certificates: Sequence[CertificateRecord], key_sha256: str, *, pending_ttl: timedelta, now: datetime,
             force: bool) -> list[CertificateRecord]:
    """Pending certificates of the device for a key the board no longer holds, to supersede before issuing.

    An expired one can never be delivered. A young one may be another board's
    delivery in flight (same hardware id), so it is superseded only with
    ``force``; otherwise the issuing transaction refuses this board.
    """
    cutoff = timestamp(now - pending_ttl)
    return [c for c in certificates if c.status is CertificateStatus.PENDING and c.public_key_sha256 != key_sha256
            and (force or c.issued_at < cutoff)]


def superseded(certificates: Sequence[CertificateRecord], serial: str) -> list[CertificateRecord]:
    """Every other unrevoked certificate of a device whose certificate ``serial`` was just activated."""
    return [c for c in certificates if c.serial != serial and c.status is not CertificateStatus.REVOKED]
