"""The RabbitMQ follower's pure parts; its kicks, replay and failures run against the real cluster
(``test_rabbitmq_cluster.py``)."""

from __future__ import annotations

from iotauth.export.rabbitmq_follow import devices_to_kick
from iotauth.registry import AuditEvent


def test_devices_to_kick_once_each_from_the_first_event() -> None:
    def event(event_id: int, kind: str, device: str | None) -> AuditEvent:
        return AuditEvent(event_id, "2026-01-01T00:00:00+00:00", kind, "op", device, {}, "", "")

    events = [event(1, "certificate.revoked", "a"), event(2, "device.revoked", "a"), event(3, "device.active", "b"),
              event(4, "device.suspended", "c"), event(5, "rabbitmq.session.kicked", "d"),
              event(6, "device.pending", "e")]
    assert devices_to_kick(events) == {"a": 1, "c": 4, "e": 6}
