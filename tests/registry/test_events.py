"""Event kinds are the exact strings in the log (the hash chain covers them), and each follower's set is explicit."""

from __future__ import annotations

import pytest

from iotauth.policy import Action
from iotauth.registry import DeviceStatus, EventKind
from iotauth.registry.events import (
    DEVICE_KICKS,
    EMQX_KICKS,
    HARMLESS_TO_SESSIONS,
    MOSQUITTO_KICKS,
    PUSH_RESTORES,
    RABBITMQ_KICKS,
    ROTATION_ORDERS,
    changes_crl,
    changes_mosquitto_export,
    changes_mosquitto_state,
    device_status_changed,
    renewal_activated,
    superseded_at_connect,
    superseded_by,
    topic_denied,
    written_by_broker,
    written_by_follower,
    written_by_push,
)

STORED = {
    "ca.initialised", "ca.issuing.signed", "ca.root_crl.signed",
    "device.created", "device.pending", "device.active", "device.suspended", "device.revoked",
    "certificate.issued", "certificate.activated", "certificate.revoked",
    "provisioning.identified", "provisioning.checked", "provisioning.assigned", "provisioning.keyed",
    "provisioning.issued", "provisioning.written", "provisioning.verified", "provisioning.proven",
    "provisioning.committed", "provisioning.activated", "provisioning.erased", "provisioning.superseded",
    "provisioning.expired", "provisioning.failed",
    "broker.started", "broker.stopped", "broker.connect.accepted", "broker.connect.denied", "broker.session.kicked",
    "broker.publish.denied", "broker.subscribe.denied", "broker.receive.denied", "broker.audit.suppressed",
    "broker.registry.recovered", "broker.registry.reopened", "broker.policy.reloaded", "broker.policy.reload_failed",
    "broker.limit.exceeded", "broker.protocol.violation",
    "push.started", "push.delivered", "push.failed",
    "rabbitmq.session.kicked", "rabbitmq.kick.failed",
    "mosquitto.session.kicked", "mosquitto.device.synced", "mosquitto.reconciled", "mosquitto.state.rebuilt",
    "mosquitto.crl.unproven",
    "rotation.requested", "rotation.refused",
}


def test_the_kinds_are_the_strings_already_in_logs() -> None:
    assert {kind.value for kind in EventKind} == STORED


@pytest.mark.parametrize("status", list(DeviceStatus))
def test_every_device_status_has_its_event(status: DeviceStatus) -> None:
    assert device_status_changed(status.value).value == f"device.{status.value}"


@pytest.mark.parametrize("action", list(Action))
def test_every_topic_action_has_its_denial_event(action: Action) -> None:
    assert topic_denied(action.value).value == f"broker.{action.value}.denied"


def test_the_broker_kicks_on_every_status_but_active_and_passes_only_what_grants() -> None:
    assert set(DEVICE_KICKS) == {device_status_changed(s.value) for s in DeviceStatus if s is not DeviceStatus.ACTIVE}
    assert set(DEVICE_KICKS.values()) == {"device-revoked", "device-suspended", "device-pending"}
    assert HARMLESS_TO_SESSIONS.isdisjoint(DEVICE_KICKS) and EventKind.CERTIFICATE_REVOKED not in HARMLESS_TO_SESSIONS
    assert all(written_by_broker(k) == k.value.startswith("broker.") for k in EventKind)


def test_other_followers() -> None:
    assert set(EMQX_KICKS) == {"device.revoked", "device.suspended", "certificate.revoked"}
    assert set(PUSH_RESTORES) == {"device.active"}
    assert {k for k in EventKind if written_by_push(k)} == {"push.started", "push.delivered", "push.failed"}
    crl = {k for k in EventKind if changes_crl(k)}
    assert crl == {k for k in EventKind if k.value.startswith(("certificate.", "device."))}
    assert {k for k in EventKind if changes_mosquitto_export(k)} == crl
    assert changes_crl("device.some-future-kind")  # new device or certificate kinds fail safe
    assert set(RABBITMQ_KICKS) == {"device.revoked", "device.suspended", "device.pending", "certificate.revoked"}
    # The RabbitMQ follower's own records neither change the CRL nor ask for a kick: it never feeds itself.
    assert not any(changes_crl(k) or k in RABBITMQ_KICKS for k in EventKind if k.value.startswith("rabbitmq."))


def test_the_mosquitto_follower_kicks_on_what_the_broker_kicks_and_on_revoked_certificates() -> None:
    assert dict(MOSQUITTO_KICKS) == {**DEVICE_KICKS, "certificate.revoked": "certificate-revoked"}
    assert {k for k in EventKind if changes_mosquitto_state(k)} == {k for k in EventKind if changes_crl(k)}
    assert changes_mosquitto_state("certificate.some-future-kind")  # a later kind re-reads the device: fails safe
    # Records written by brokers and followers about their own work are never work for a follower.
    assert all(written_by_follower(k) == k.value.startswith(("broker.", "mosquitto.", "push.", "rabbitmq."))
               for k in EventKind)
    assert not any(changes_mosquitto_state(k) for k in EventKind if written_by_follower(k))


def test_rotation_events_withdraw_no_rights_and_name_what_the_renewer_acts_on() -> None:
    rotation = {k for k in EventKind if k.value.startswith("rotation.")}
    assert rotation <= HARMLESS_TO_SESSIONS  # an order or a refusal never costs a live session a registry look-up
    assert not any(changes_crl(k) for k in rotation)
    assert set(ROTATION_ORDERS) == {"rotation.requested"}
    assert renewal_activated("certificate.activated", {"serial": "1", "renewal_of": "2"})
    assert not renewal_activated("certificate.activated", {"serial": "1"})  # a provisioned certificate
    revoked = {"serial": "2", "reason": "superseded", "superseded_by": "1"}
    assert superseded_at_connect("certificate.revoked", {**revoked, "via": "connect"})
    assert not superseded_at_connect("certificate.revoked", {**revoked, "via": "confirm"})
    compromised = {"serial": "2", "reason": "key-compromise", "via": "connect"}
    assert not superseded_at_connect("certificate.revoked", compromised)


def test_a_supersession_names_the_renewal_the_mosquitto_follower_holds() -> None:
    revoked = {"serial": "2", "reason": "superseded", "superseded_by": "1", "via": "confirm"}
    assert superseded_by("certificate.revoked", revoked) == "1"
    # Superseded without a successor (the renewer's own identity, an expired pending renewal): nothing to hold.
    assert superseded_by("certificate.revoked", {"serial": "2", "reason": "superseded"}) is None
    assert superseded_by("certificate.revoked", {"serial": "2", "reason": "superseded", "superseded_by": 7}) is None
    assert superseded_by("certificate.revoked", {**revoked, "reason": "key-compromise"}) is None
    assert superseded_by("certificate.activated", revoked) is None
