"""The ordered ack gate: offsets are released only in order, whatever order requests finish in."""

from __future__ import annotations

import random
from collections.abc import Callable

from llmstream.processors.acks import OrderedAcks


def into(acked: list[int]) -> Callable[[str, int], None]:
    """An ack callback recording the offsets it is given."""
    return lambda _, offset: acked.append(offset)


def test_out_of_order_finishes_are_acked_in_offset_order() -> None:
    acked: list[int] = []
    gate: OrderedAcks[str] = OrderedAcks(into(acked))
    tickets = [gate.admit("p0", offset) for offset in range(5)]
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
    gate: OrderedAcks[str] = OrderedAcks(lambda p, o: acked.append(f"{p.lower()}{o}"))
    a0, b0 = gate.admit("A", 0), gate.admit("B", 0)
    a1 = gate.admit("A", 1)
    gate.finish(a1)
    gate.finish(b0)
    assert acked == ["b0"]
    gate.finish(a0)
    assert acked == ["b0", "a0", "a1"]


def test_revoked_partitions_ack_nothing_even_when_they_finish_later() -> None:
    acked: list[int] = []
    gate: OrderedAcks[str] = OrderedAcks(into(acked))
    old = [gate.admit("p0", offset) for offset in range(3)]
    assert gate.revoke(["p0"]) == 3
    new = gate.admit("p0", 0)  # re-read after the partition came back
    for ticket in old:
        assert gate.finish(ticket) == 0
    assert acked == []
    gate.finish(new)
    assert acked == [0]


def test_random_completion_orders_never_ack_past_an_unfinished_event() -> None:
    rng = random.Random(7)
    for _ in range(200):
        acked: list[int] = []
        gate: OrderedAcks[str] = OrderedAcks(into(acked))
        tickets = [gate.admit("p", offset) for offset in range(20)]
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
    gate: OrderedAcks[str] = OrderedAcks(into(acked))
    stale = [gate.admit("p", offset) for offset in (10, 11, 12)]
    fresh = [gate.admit("p", offset) for offset in (5, 6)]
    for ticket in stale:
        gate.finish(ticket)
    assert acked == []  # 10-12 must not be committed while 5 and 6 are unfinished
    gate.finish(fresh[1])
    gate.finish(fresh[0])
    assert acked == [5, 6]


def test_a_partition_holding_too_many_finished_events_is_paused_until_its_head_finishes() -> None:
    acked: list[int] = []
    calls: list[tuple[str, str]] = []
    gate: OrderedAcks[str] = OrderedAcks(
        lambda _, offset: acked.append(offset),
        max_held=10,
        pause=lambda p: calls.append(("pause", p)),
        resume=lambda p: calls.append(("resume", p)),
    )
    head = gate.admit("p", 0)
    behind = [gate.admit("p", offset) for offset in range(1, 13)]
    other = gate.admit("q", 0)
    for ticket in behind[:10]:
        gate.finish(ticket)
    assert calls == []  # 10 held: at the limit, not over it
    gate.finish(behind[10])
    assert calls == [("pause", "p")]
    assert gate.paused() == frozenset({"p"}) and gate.held() == 11
    gate.finish(behind[11])
    assert calls == [("pause", "p")]  # paused once
    gate.finish(other)  # another partition is not held up
    assert gate.paused() == frozenset({"p"})
    gate.finish(head)
    assert calls == [("pause", "p"), ("resume", "p")]
    assert acked == [0, *range(13)] and gate.held() == 0 and gate.paused() == frozenset()


def test_a_paused_partition_taken_away_is_resumed_so_it_is_read_when_it_comes_back() -> None:
    calls: list[tuple[str, str]] = []
    gate: OrderedAcks[str] = OrderedAcks(
        lambda _, __: None,
        max_held=2,
        pause=lambda p: calls.append(("pause", p)),
        resume=lambda p: calls.append(("resume", p)),
    )
    gate.admit("p", 0)
    for ticket in [gate.admit("p", offset) for offset in range(1, 4)]:
        gate.finish(ticket)
    assert gate.revoke(["p"]) == 1  # the head; the finished ones are re-read by the next owner
    assert calls == [("pause", "p"), ("resume", "p")]
    assert gate.held() == 0 and gate.paused() == frozenset()
