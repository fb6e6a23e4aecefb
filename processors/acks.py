"""Acknowledge events strictly in offset order per partition, whatever order they finish in.

A committed offset says "everything before this is done": committing past a request still in
flight would lose it in a crash. Requests here finish in any order (a retry waits seconds, its
neighbours do not), so this gate holds each finished event until every earlier event of its
partition has finished, and only then releases its offset for commit
(:class:`processors.kafka_io.RequestReader` commits what it releases).

The gate keeps offsets only, never an event or its payload: a request that stays unfinished at the
head of its partition (a slow provider, a long wait for budget) holds up every later one, and the
memory so held must stay small. Past ``max_held`` finished events behind one unfinished head the
partition is paused (``pause``) so the worker stops reading it, and resumed once its held events
fall to half the limit: the head finished, or the partition was taken away.

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

P = TypeVar("P", bound=Hashable)


class Ticket(Generic[P]):
    """One admitted event's place; :meth:`OrderedAcks.finish` it when its outcome is on the
    broker."""

    __slots__ = ("done", "generation", "offset", "partition")

    def __init__(self, partition: P, offset: int, generation: int) -> None:
        self.partition = partition
        self.offset = offset
        self.generation = generation
        self.done = False


def _ignore(partition: object) -> None:
    return None


class OrderedAcks(Generic[P]):
    """Per-partition queues of admitted offsets; releases the finished prefix of each, in order,
    to ``ack(partition, offset)``."""

    def __init__(
        self,
        ack: Callable[[P, int], object],
        *,
        max_held: int = 10_000,
        pause: Callable[[P], object] = _ignore,
        resume: Callable[[P], object] = _ignore,
    ) -> None:
        self._ack = ack
        self._max_held = max_held
        self._pause = pause
        self._resume = resume
        self._queues: dict[P, deque[Ticket[P]]] = {}
        self._generations: dict[P, int] = {}
        # Finished events waiting behind an unfinished one, per partition.
        self._held: dict[P, int] = {}
        self._paused: set[P] = set()

    def admit(self, partition: P, offset: int) -> Ticket[P]:
        """Record an event in arrival (offset) order before its processing starts."""
        queue = self._queues.get(partition)
        if queue and offset <= queue[-1].offset:
            self.revoke([partition])  # re-read from an earlier offset: start a new queue
            queue = None
        if queue is None:
            queue = self._queues[partition] = deque()
        ticket = Ticket(partition, offset, self._generations.get(partition, 0))
        queue.append(ticket)
        return ticket

    def finish(self, ticket: Ticket[P]) -> int:
        """Mark ``ticket`` done and ack every done event at the head of its partition.

        Returns how many events were acked. A ticket of a revoked partition acks nothing.
        """
        ticket.done = True
        partition = ticket.partition
        if ticket.generation != self._generations.get(partition, 0):
            return 0
        queue = self._queues[partition]
        held = self._held.get(partition, 0) + 1
        acked = 0
        while queue and queue[0].done:
            self._ack(partition, queue.popleft().offset)
            acked += 1
        held -= acked
        self._held[partition] = held
        if partition in self._paused:
            if held <= self._max_held // 2:
                self._paused.discard(partition)
                self._resume(partition)
        elif held > self._max_held:
            self._paused.add(partition)
            self._pause(partition)
        return acked

    def revoke(self, partitions: Iterable[P]) -> int:
        """Forget the events of partitions this worker no longer owns (resuming those it
        paused); returns how many were unfinished."""
        dropped = 0
        for partition in partitions:
            self._generations[partition] = self._generations.get(partition, 0) + 1
            queue = self._queues.pop(partition, ())
            dropped += len(queue) - self._held.pop(partition, 0)
            if partition in self._paused:
                self._paused.discard(partition)
                self._resume(partition)
        return dropped

    def pending(self) -> int:
        """Events admitted and not yet acked, over all partitions."""
        return sum(len(q) for q in self._queues.values())

    def held(self) -> int:
        """Finished events not yet acked because an earlier one is unfinished, over all
        partitions."""
        return sum(self._held.values())

    def paused(self) -> frozenset[P]:
        """The partitions paused because they hold more than ``max_held`` finished events."""
        return frozenset(self._paused)
