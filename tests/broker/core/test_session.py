"""A session's bounded state: packet ids, the in-flight window, the offline queue."""

from __future__ import annotations

from iotauth.broker.core.session import Flight, Message, Session
from iotauth.limits import SessionLimits


def message(size: int = 10) -> Message:
    return Message("t", b"x" * size, 1, False, b"\x00\x01t")


def test_packet_ids_skip_those_in_flight_and_wrap() -> None:
    session = Session("d", True, SessionLimits(max_inflight=3))
    assert [session.packet_id() for _ in range(3)] == [1, 2, 3]
    session.inflight[4] = Flight(message(), 1, False)
    assert session.packet_id() == 5
    session._next_id = 65_534
    assert [session.packet_id() for _ in range(3)] == [65_535, 1, 2]


def test_the_queue_is_bounded_by_count_and_bytes_and_counts_what_it_drops() -> None:
    session = Session("d", True, SessionLimits(max_queued=3, max_queued_bytes=40))
    assert all(session.enqueue(message(), 1, False) for _ in range(3))  # 3 x 13 bytes
    assert not session.enqueue(message(), 1, False)  # count
    session.dequeue()
    assert not session.enqueue(message(30), 1, False)  # bytes: 26 + 33 > 40
    assert session.enqueue(message(), 1, False)
    assert (len(session.queue), session.queued_bytes, session.dropped) == (3, 39, 2)
    session.discard_queue()
    assert (len(session.queue), session.queued_bytes) == (0, 0)
