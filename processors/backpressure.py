"""Where requests wait for a provider's budget without starving the others.

A worker admits an event only when one of its ``max_in_flight`` slots is free. A request that must
wait (its provider's rate budget is spent, the provider asked to pause, its circuit is open) gives
its slot back while it waits, and takes one again before it calls the provider: so the worker
keeps admitting events, and requests for other providers flow past the waiting ones.

Waiting requests are bounded by ``capacity`` (``LLMSTREAM_MAX_WAITING``): past it, a request waits
holding its slot, the slots fill up, and the worker stops reading events; the backlog then waits
in the topic, where it costs nothing. Kafka partitions mix providers, so this is the only place
one provider's backlog can be stepped over: the bound is how far.
"""

from __future__ import annotations

import asyncio

__all__ = ["Stay", "WaitingRoom"]


class WaitingRoom:
    """Counts requests waiting without a slot; ``bind()`` hands it the worker's slots."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    def bind(self, slots: asyncio.Semaphore) -> None:
        """The worker's in-flight slots (one held by each request task while it runs)."""
        self._slots = slots

    def stay(self) -> Stay:
        """A handle for one request's waits."""
        return Stay(self)


class Stay:
    """One request's time in the waiting room: ``park()`` before waiting, ``resume()`` after."""

    __slots__ = ("_parked", "_room")

    def __init__(self, room: WaitingRoom) -> None:
        self._room = room
        self._parked = False

    @property
    def parked(self) -> bool:
        return self._parked

    def park(self) -> None:
        """Give the request's slot back for the wait, when the room has space (idempotent)."""
        room = self._room
        if self._parked or room._slots is None or room.waiting >= room.capacity:
            return
        room.waiting += 1
        room._slots.release()
        self._parked = True

    async def resume(self) -> None:
        """Take a slot again (waiting for one if the worker is full).

        Cancelled while waiting for the slot (the request's deadline, a shutdown), the request
        stays parked: it holds no slot, and the worker must not release one for it.
        """
        if not self._parked:
            return
        room = self._room
        assert room._slots is not None
        await room._slots.acquire()
        self._parked = False
        room.waiting -= 1

    def abandon(self) -> None:
        """The request was cancelled (shutdown) while parked: it leaves without a slot.

        The worker then releases the slot it thinks the task held, one more than it has; nothing
        is admitted after a shutdown began, so that extra slot is never used.
        """
        if self._parked:
            self._parked = False
            self._room.waiting -= 1
