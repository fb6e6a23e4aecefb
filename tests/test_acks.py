"""The ordered ack gate: offsets are released only in order, whatever order requests finish in."""

from __future__ import annotations

import random

from llmstream.processors.acks import OrderedAcks


def test_out_of_order_finishes_are_acked_in_offset_order() -> None:
    acked: list[int] = []
    gate: OrderedAcks[int] = OrderedAcks(acked.append)
    tickets = [gate.admit(offset, "p0", offset) for offset in range(5)]
    assert gate.finish(tickets[2]) == 0
    assert gate.finish(tickets[1]) == 0
    assert acked == []  # offset 0 is still in flight: nothing may be committed
    assert gate.finish(tickets[0]) == 3
    assert acked == [0, 1, 2]
    gate.finish(tickets[4])
    gate.finish(tickets[3])
    assert acked == [0, 1, 2, 3, 4]
    assert gate.pending() == 0


def test_partitions_are_independent() -> None:
    acked: list[str] = []
    gate: OrderedAcks[str] = OrderedAcks(acked.append)
    a0, b0 = gate.admit("a0", "A", 0), gate.admit("b0", "B", 0)
    a1 = gate.admit("a1", "A", 1)
    gate.finish(a1)
    gate.finish(b0)
    assert acked == ["b0"]
    gate.finish(a0)
    assert acked == ["b0", "a0", "a1"]


def test_revoked_partitions_ack_nothing_even_when_they_finish_later() -> None:
    acked: list[int] = []
    gate: OrderedAcks[int] = OrderedAcks(acked.append)
    old = [gate.admit(offset, "p0", offset) for offset in range(3)]
    assert gate.revoke(["p0"]) == 3
    new = gate.admit(0, "p0", 0)  # re-read after the partition came back
    for ticket in old:
        assert gate.finish(ticket) == 0
    assert acked == []
    gate.finish(new)
    assert acked == [0]


def test_random_completion_orders_never_ack_past_an_unfinished_event() -> None:
    rng = random.Random(7)
    for _ in range(200):
        acked: list[int] = []
        gate: OrderedAcks[int] = OrderedAcks(acked.append)
        tickets = [gate.admit(offset, "p", offset) for offset in range(20)]
        order = list(range(20))
        rng.shuffle(order)
        finished: set[int] = set()
        for index in order:
            gate.finish(tickets[index])
            finished.add(index)
            assert acked == list(range(len(acked)))  # a prefix, in order
            assert set(acked) <= finished
            unfinished = set(range(20)) - finished
            if unfinished:
                assert len(acked) == min(unfinished)
        assert acked == list(range(20))


def test_a_partition_read_again_from_an_earlier_offset_never_acks_the_stale_queue() -> None:
    # Offsets 10-12 are queued when the partition is re-read from its committed offset 5.
    acked: list[int] = []
    gate: OrderedAcks[int] = OrderedAcks(acked.append)
    stale = [gate.admit(offset, "p", offset) for offset in (10, 11, 12)]
    fresh = [gate.admit(offset, "p", offset) for offset in (5, 6)]
    for ticket in stale:
        gate.finish(ticket)
    assert acked == []  # 10-12 must not be committed while 5 and 6 are unfinished
    gate.finish(fresh[1])
    gate.finish(fresh[0])
    assert acked == [5, 6]
