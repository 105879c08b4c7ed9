"""Every kind of audit event iotauth writes, and which of them each follower of the log acts on.

The values are the exact strings stored in the log and covered by its hash
chain, so they never change. Followers of the change feed (the broker, the
EMQX push, the CRL endpoint, the Mosquitto export watch) classify events with
the small pure functions and sets below rather than with string literals, so
what each reacts to is written down once, next to the kinds themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class EventKind(StrEnum):
    CA_INITIALISED = "ca.initialised"
    CA_ISSUING_SIGNED = "ca.issuing.signed"  # a rollover: the root signed a new issuing CA
    CA_ROOT_CRL_SIGNED = "ca.root_crl.signed"  # the root signed its CRL (the ARL of revoked issuing CAs)

    DEVICE_CREATED = "device.created"
    DEVICE_PENDING = "device.pending"
    DEVICE_ACTIVE = "device.active"
    DEVICE_SUSPENDED = "device.suspended"
    DEVICE_REVOKED = "device.revoked"

    CERTIFICATE_ISSUED = "certificate.issued"
    CERTIFICATE_ACTIVATED = "certificate.activated"
    CERTIFICATE_REVOKED = "certificate.revoked"

    PROVISIONING_IDENTIFIED = "provisioning.identified"
    PROVISIONING_CHECKED = "provisioning.checked"
    PROVISIONING_ASSIGNED = "provisioning.assigned"
    PROVISIONING_KEYED = "provisioning.keyed"
    PROVISIONING_ISSUED = "provisioning.issued"
    PROVISIONING_WRITTEN = "provisioning.written"
    PROVISIONING_VERIFIED = "provisioning.verified"
    PROVISIONING_PROVEN = "provisioning.proven"
    PROVISIONING_COMMITTED = "provisioning.committed"
    PROVISIONING_ACTIVATED = "provisioning.activated"
    PROVISIONING_ERASED = "provisioning.erased"
    PROVISIONING_SUPERSEDED = "provisioning.superseded"
    PROVISIONING_EXPIRED = "provisioning.expired"
    PROVISIONING_FAILED = "provisioning.failed"

    BROKER_STARTED = "broker.started"
    BROKER_STOPPED = "broker.stopped"
    BROKER_CONNECT_ACCEPTED = "broker.connect.accepted"
    BROKER_CONNECT_DENIED = "broker.connect.denied"
    BROKER_SESSION_KICKED = "broker.session.kicked"
    BROKER_PUBLISH_DENIED = "broker.publish.denied"
    BROKER_SUBSCRIBE_DENIED = "broker.subscribe.denied"
    BROKER_RECEIVE_DENIED = "broker.receive.denied"
    BROKER_AUDIT_SUPPRESSED = "broker.audit.suppressed"  # no longer written (refusals are aggregated); older logs
    BROKER_LIMIT_EXCEEDED = "broker.limit.exceeded"
    BROKER_PROTOCOL_VIOLATION = "broker.protocol.violation"
    BROKER_REGISTRY_RECOVERED = "broker.registry.recovered"
    BROKER_REGISTRY_REOPENED = "broker.registry.reopened"
    BROKER_POLICY_RELOADED = "broker.policy.reloaded"
    BROKER_POLICY_RELOAD_FAILED = "broker.policy.reload_failed"

    ROTATION_REQUESTED = "rotation.requested"  # an operator asked a device to renew now (``iotauth rotate``)
    ROTATION_REFUSED = "rotation.refused"  # the renewer refused a device's request or confirmation (aggregated)

    PUSH_STARTED = "push.started"
    PUSH_DELIVERED = "push.delivered"
    PUSH_FAILED = "push.failed"
    RABBITMQ_SESSION_KICKED = "rabbitmq.session.kicked"
    RABBITMQ_KICK_FAILED = "rabbitmq.kick.failed"

    # The Mosquitto follower (``iotauth mosquitto follow``): what it did to a managed Mosquitto.
    MOSQUITTO_SESSION_KICKED = "mosquitto.session.kicked"
    MOSQUITTO_DEVICE_SYNCED = "mosquitto.device.synced"
    MOSQUITTO_RECONCILED = "mosquitto.reconciled"
    MOSQUITTO_STATE_REBUILT = "mosquitto.state.rebuilt"
    MOSQUITTO_CRL_UNPROVEN = "mosquitto.crl.unproven"


def device_status_changed(status: str) -> EventKind:
    """The event written when a device's status becomes ``status`` (a ``DeviceStatus`` value)."""
    return EventKind(f"device.{status}")


def topic_denied(action: str) -> EventKind:
    """The broker's aggregated denial event for a topic ``action`` (publish, subscribe or receive)."""
    return EventKind(f"broker.{action}.denied")


# -- the broker ------------------------------------------------------------------------------

_BROKER_PREFIX = "broker."


def written_by_broker(kind: str) -> bool:
    """The broker's own records (connects, kicks, reloads): nothing for a feed follower to enforce."""
    return kind.startswith(_BROKER_PREFIX)


HARMLESS_TO_SESSIONS: frozenset[str] = frozenset(
    {EventKind.CERTIFICATE_ISSUED, EventKind.CERTIFICATE_ACTIVATED, EventKind.DEVICE_CREATED, EventKind.DEVICE_ACTIVE,
     EventKind.ROTATION_REQUESTED, EventKind.ROTATION_REFUSED}
)
"""Changes that can only grant, never withdraw, a live session's rights: the broker lets them pass."""

DEVICE_KICKS: Mapping[str, str] = MappingProxyType(
    {
        EventKind.DEVICE_REVOKED: "device-revoked",
        EventKind.DEVICE_SUSPENDED: "device-suspended",
        EventKind.DEVICE_PENDING: "device-pending",
    }
)
"""Device status changes after which none of its sessions may live, with the kick reason the broker records.

Any other event that names a device makes the broker ask the registry again
about that device's sessions, so a kind added later fails safe.
"""


# -- rotation ------------------------------------------------------------------------------

ROTATION_ORDERS: frozenset[str] = frozenset({EventKind.ROTATION_REQUESTED})
"""Events after which the renewer tells the device to renew now (``devices/<id>/commands/rotate``)."""

ACTIVATED_AT_CONNECT = "connect"
"""``via`` of a renewal activated by the device's first authentication with its new certificate."""


def renewal_activated(kind: str, data: Mapping[str, object]) -> bool:
    """A renewal certificate became active (the renewer then withdraws the device's rotation order)."""
    return kind == EventKind.CERTIFICATE_ACTIVATED and bool(data.get("renewal_of"))


def superseded_at_connect(kind: str, data: Mapping[str, object]) -> bool:
    """A certificate revoked because its device just authenticated with its renewal.

    The broker that admitted the new certificate has already replaced the old
    session (the client id is the device id, so MQTT's session takeover closes
    it): a follower that can only kick by client id (EMQX) must not kick, or it
    would close the device's new session instead. ``iotauth broker`` kicks by
    certificate and needs no exception.
    """
    return (kind == EventKind.CERTIFICATE_REVOKED and data.get("reason") == "superseded"
            and data.get("via") == ACTIVATED_AT_CONNECT)


def superseded_by(kind: str, data: Mapping[str, object]) -> str | None:
    """The serial of the renewal that superseded a revoked certificate, or None for any other event.

    The Mosquitto follower keeps that renewal on its CRL (certificateHold)
    until it has closed the sessions of the certificate it replaces: Mosquitto
    kicks by user name, which is the device id, so a session the device had
    already opened with its new certificate would be closed too.
    """
    if kind != EventKind.CERTIFICATE_REVOKED or data.get("reason") != "superseded":
        return None
    serial = data.get("superseded_by")
    return serial if isinstance(serial, str) and serial else None


# -- other followers ---------------------------------------------------------------------

EMQX_KICKS: frozenset[str] = frozenset(
    {EventKind.DEVICE_REVOKED, EventKind.DEVICE_SUSPENDED, EventKind.CERTIFICATE_REVOKED}
)
"""Events after which ``iotauth serve`` asks EMQX to disconnect the device (and, with bans on, to ban it)."""

PUSH_RESTORES: frozenset[str] = frozenset({EventKind.DEVICE_ACTIVE})
"""Events after which a push target lifts what it imposed on a device (an EMQX ban after a suspension)."""


def written_by_push(kind: str) -> bool:
    """A push follower's own records (``push.*``): nothing for any follower to enforce."""
    return kind.startswith("push.")

RABBITMQ_KICKS: frozenset[str] = frozenset({*DEVICE_KICKS, EventKind.CERTIFICATE_REVOKED})
"""Events after which the RabbitMQ follower closes the device's connections cluster-wide. A revoked
certificate counts: RabbitMQ decides per username, so the device's other sessions reconnect (the CRL,
rewritten first, refuses the revoked certificate at the handshake)."""

CRL_KIND_PREFIXES: tuple[str, ...] = ("certificate.", "device.")
"""Every certificate and device event may change the CRL (which lists revoked, pending and suspended
certificates); matched by prefix, so the registry can answer "any since event N?" with one indexed query."""


def changes_crl(kind: str) -> bool:
    """Whether a CRL built after this event may differ from one built before it."""
    return kind.startswith(CRL_KIND_PREFIXES)


def changes_mosquitto_export(kind: str) -> bool:
    """Whether the exported Mosquitto files (the CRL, and the ACL of active devices by profile) may be stale."""
    return changes_crl(kind)


# -- the Mosquitto follower ----------------------------------------------------------------

_FOLLOWER_RECORD_PREFIXES: tuple[str, ...] = (_BROKER_PREFIX, "mosquitto.", "push.", "rabbitmq.")


def written_by_follower(kind: str) -> bool:
    """A record that a broker or a follower wrote about its own work: nothing in it to enforce."""
    return kind.startswith(_FOLLOWER_RECORD_PREFIXES)


MOSQUITTO_KICKS: Mapping[str, str] = MappingProxyType(
    {**DEVICE_KICKS, EventKind.CERTIFICATE_REVOKED: "certificate-revoked"}
)
"""Events after which the Mosquitto follower drops the device's live session, with the reason it records.

The device statuses withdraw the device (CRL first, then the session is
kicked and its dynamic-security client deleted). ``certificate.revoked`` of a
device that stays active (a superseded certificate) kicks its session once,
after the CRL refuses the old certificate, so it reconnects with the current
one; a renewal that superseded it is held on the CRL until then
(:func:`superseded_by`). Every other device or certificate event makes the follower re-read that
device from the registry and bring its client and role in step, so a kind
added later fails safe.
"""


def changes_mosquitto_state(kind: str) -> bool:
    """Whether the follower must re-read the named device (and publish a CRL) after this event."""
    return changes_crl(kind)
