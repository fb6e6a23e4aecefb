"""Acknowledge events strictly in offset order per partition, whatever order they finish in.

faust commits the offset after the highest run of acked messages, and its gap guard is off by one
(faust-streaming #606): acks that arrive out of order can commit past a message still in flight,
and a crash then loses it. Requests here finish in any order (a retry waits seconds, its neighbours
do not), so this gate holds each finished event until every earlier event of its partition has
finished, and only then hands it to faust. faust never sees a gap, so it can only commit offsets
whose requests are done.

A partition taken away by a rebalance is dropped here: its unfinished events are never acked by
this worker (the new owner re-reads them from the committed offset; dedup stops a second call).
The same happens when a partition's offsets go backwards (it was re-assigned and re-read from the
committed offset while older events were still queued): the older queue could otherwise ack ahead
of the re-read events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

E = TypeVar("E")


class Ticket(Generic[E]):
    """One admitted event; :meth:`OrderedAcks.finish` it when its outcome is on the broker."""

    __slots__ = ("done", "event", "generation", "offset", "partition")

    def __init__(self, event: E, partition: Hashable, offset: int, generation: int) -> None:
        self.event = event
        self.partition = partition
        self.offset = offset
        self.generation = generation
        self.done = False


class OrderedAcks(Generic[E]):
    """Per-partition queues of admitted events; releases the finished prefix of each, in order."""

    def __init__(self, ack: Callable[[E], object]) -> None:
        self._ack = ack
        self._queues: dict[Hashable, deque[Ticket[E]]] = {}
        self._generations: dict[Hashable, int] = {}

    def admit(self, event: E, partition: Hashable, offset: int) -> Ticket[E]:
        """Record an event in arrival (offset) order before its processing starts."""
        queue = self._queues.get(partition)
        if queue and offset <= queue[-1].offset:
            self.revoke([partition])  # re-read from an earlier offset: start a new queue
            queue = None
        if queue is None:
            queue = self._queues[partition] = deque()
        ticket = Ticket(event, partition, offset, self._generations.get(partition, 0))
        queue.append(ticket)
        return ticket

    def finish(self, ticket: Ticket[E]) -> int:
        """Mark ``ticket`` done and ack every done event at the head of its partition.

        Returns how many events were acked. A ticket of a revoked partition acks nothing.
        """
        ticket.done = True
        if ticket.generation != self._generations.get(ticket.partition, 0):
            return 0
        queue = self._queues.get(ticket.partition)
        acked = 0
        while queue and queue[0].done:
            self._ack(queue.popleft().event)
            acked += 1
        return acked

    def revoke(self, partitions: Iterable[Hashable]) -> int:
        """Forget the events of partitions this worker no longer owns; returns how many."""
        dropped = 0
        for partition in partitions:
            self._generations[partition] = self._generations.get(partition, 0) + 1
            dropped += len(self._queues.pop(partition, ()))
        return dropped

    def pending(self) -> int:
        """Events admitted and not yet acked, over all partitions."""
        return sum(len(q) for q in self._queues.values())
