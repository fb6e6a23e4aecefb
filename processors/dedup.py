"""Deduplication by request ID, shared by every worker: the worker's side of the request record.

The record itself (keys, states, fields, scripts, TTLs, and why takeovers are safe) is
:mod:`llmstream.core.record`. Here is what one worker process adds: its lease, the epochs of the
claims it holds, and the batching of its calls.

Ownership is a lease: each worker process keeps its heartbeat alive with a short TTL (renewed
several times per lease by :meth:`DedupStore.heartbeat`). A claim whose owner's heartbeat has
lapsed is taken over, so a crashed worker is noticed within one lease (seconds), while a live
worker's claim holds however long its provider call runs. A worker whose own lease lapsed (it
could not renew for a lease) claims nothing until it renews: it knows when it last renewed, so
this costs no Redis read.

The provider's answer is stored (:meth:`DedupStore.settle`) *before* anything is emitted. A worker
that dies between the call and the emit leaves a stored, un-emitted outcome; whoever takes over
emits that outcome and never calls the provider again.

No provider attempt starts without a live lease: :meth:`DedupStore.before_call` runs just before
each one (traffic control calls it after every wait). It refuses while this worker's own lease is
lapsed (it waits for the heartbeat), raises :class:`NotOwner` once another worker took the claim
over, and refuses every new attempt once the worker is draining. The window that stays: a worker
that stalls *after* its check, with its call already on the way (or at the provider), is taken
over one lease later and the taker calls too; and a taker that saw this worker's heartbeat gone
just before it was renewed takes over anyway (a lapsed lease is forfeit).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.errors import LLMStreamError
from llmstream.core.loops import BoundLoop
from llmstream.core.record import (
    AnyRedis,
    ClaimUnavailable,
    RecordStore,
    StoredOutcome,
    WorkerOp,
)

__all__ = ["Claim", "ClaimStatus", "ClaimUnavailable", "DedupStore", "NotOwner"]

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisError, RedisClusterException)


class NotOwner(LLMStreamError):
    """Another worker took the request over: this one neither calls, stores nor emits for it."""


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"  # this worker now owns the request: call the provider
    BUSY = "busy"  # a live worker owns it: wait and ask again
    DONE = "done"  # an outcome was emitted already: a duplicate
    RECOVER = "recover"  # an outcome is stored but was never emitted: emit it, no call
    BATCHED = "batched"  # a batch holds it (``submission``): its poller answers, nobody calls
    # Claimed from a worker that died submitting it in a batch (``submission``): find out
    # whether that batch exists before anything else (processors.batches).
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    state: str | None = None  # "completed" or "failed" for DONE and RECOVER
    payload: bytes | None = None  # the stored LLMResponse or LLMError JSON
    takeover: bool = False  # CLAIMED from a worker whose lease lapsed
    submission: str | None = None  # BATCHED and RESOLVE: the batch submission


_MAX_BATCH = 512  # calls per run: bounds how long one script run holds Redis


class _Call:
    __slots__ = ("future", "op", "what")

    def __init__(
        self, op: WorkerOp, what: str, future: asyncio.Future[tuple[str, bytes | None]]
    ) -> None:
        self.op = op
        self.what = what
        self.future = future


class _Batcher:
    """Sends the claims, settles and marks of every request in flight to Redis together.

    A Redis round trip through redis-py costs about 100 µs of CPU whatever it carries: with three
    per request it was a fifth of the worker's CPU (measured with `llmstream bench`). Here one
    run carries every call waiting (one script run on a single Redis, one per hash slot on Redis
    Cluster), and runs start at most every ``interval_s``: a call made after a quiet spell goes
    at once, under load calls wait up to ``interval_s`` and share the run. One run is in flight
    at a time.
    """

    def __init__(self, records: RecordStore, token: str, interval_s: float) -> None:
        self._records = records
        self._token = token
        self._interval_s = interval_s
        self._waiting: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._next_run = 0.0
        self._loop = BoundLoop()

    def submit(self, op: WorkerOp, what: str) -> asyncio.Future[tuple[str, bytes | None]]:
        """Queue ``op`` for the next run; the future resolves with its answer."""
        loop = self._loop.get()
        call = _Call(op, what, loop.create_future())
        self._waiting.append(call)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return call.future

    async def _flush(self) -> None:
        loop = self._loop.get()
        batch: list[_Call] = []
        try:
            while self._waiting:
                pause = self._next_run - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                self._next_run = loop.time() + self._interval_s
                batch = self._waiting[:_MAX_BATCH]
                del self._waiting[:_MAX_BATCH]
                await self._run(batch)
        except BaseException as exc:
            # A bug, or this task cancelled at shutdown: no caller may wait forever.
            for call in [*batch, *self._waiting]:
                if not call.future.done():
                    call.future.set_exception(
                        ClaimUnavailable(f"cannot {call.what}: {type(exc).__name__}")
                    )
            self._waiting.clear()
            raise
        finally:
            self._flusher = None

    async def _run(self, batch: list[_Call]) -> None:
        try:
            results = await self._records.run(self._token, [call.op for call in batch])
        except _REDIS_ERRORS as exc:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(ClaimUnavailable(f"cannot {call.what}: {exc}"))
            return
        for call, result in zip(batch, results, strict=True):
            if not call.future.done():
                call.future.set_result(result)


class DedupStore:
    """Claims, leases and stored outcomes of request IDs, for one worker process."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        worker_token: str,
        lease_ms: int,
        result_ttl_s: int,
        batch_interval_s: float = 0.002,
    ) -> None:
        self.records = RecordStore(redis, key_prefix=key_prefix, ttl_s=result_ttl_s)
        self.worker_token = worker_token
        self.lease_ms = lease_ms
        self._lease_until = 0.0  # event-loop time by which this worker's heartbeat surely lapsed
        self._epochs: dict[str, str] = {}  # request ID -> epoch of the claim this worker holds
        self._batcher = _Batcher(self.records, worker_token, batch_interval_s)
        # Set by the worker's drain: no new provider attempt starts.
        self.draining = False
        # Tasks whose provider call is in flight, or whose answer is not stored yet: a drain
        # never cancels them (the next owner would pay for that call again).
        self._calling: set[asyncio.Task[Any]] = set()
        self._loop = BoundLoop()

    def key(self, request_id: str) -> str:
        return self.records.keys.record(request_id)

    async def record_rejection(self, request_id: str, *, error: bytes, field: str | None) -> None:
        """Keep why the event with ``request_id`` was rejected, for the result TTL."""
        try:
            await self.records.record_rejection(request_id, error=error, field=field)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot record a rejected event: {exc}") from exc

    async def heartbeat(self) -> None:
        """Renew this worker's lease; every claim it holds stays live while this is called."""
        # Counted from before the write: the key cannot outlive this by Redis's clock.
        started = self._loop.get().time()
        try:
            await self.records.heartbeat(self.worker_token, self.lease_ms)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot renew the worker lease: {exc}") from exc
        self._lease_until = started + self.lease_ms / 1000

    async def resign(self) -> None:
        """Drop this worker's lease at shutdown so its unfinished claims are taken over at once."""
        self._lease_until = 0.0
        try:
            await self.records.resign(self.worker_token)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot drop the worker lease: {exc}") from exc

    def suspend(self) -> None:
        """Claim nothing more until the next successful :meth:`heartbeat` (Redis unreachable or
        without its state); the lease key is left alone, so other workers do not take over."""
        self._lease_until = 0.0

    def _check_lease(self) -> None:
        if self._loop.get().time() >= self._lease_until:
            raise ClaimUnavailable("this worker's lease lapsed; waiting for the heartbeat")

    async def _alive(self, token: str) -> bool:
        try:
            return await self.records.alive(token)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot read a worker's lease: {exc}") from exc

    async def claim(self, request_id: str, now_ms: int) -> Claim:
        """Try to take ``request_id``; see :class:`ClaimStatus` for what each answer means."""
        self._check_lease()
        answer, extra = await self._batcher.submit(
            WorkerOp("c", request_id, (now_ms, "", "", "")), "claim request"
        )
        if answer.startswith("busy:") and extra is not None:
            owner = extra.decode()
            if owner != self.worker_token and not await self._alive(owner):
                # Seen dead: take over only if it still owns the record at the epoch seen.
                epoch = answer.partition(":")[2]
                answer, extra = await self._batcher.submit(
                    WorkerOp("c", request_id, (now_ms, owner, epoch, "")), "take over request"
                )
        kind, _, rest = answer.partition(":")
        if kind in ("claimed", "takeover"):
            self._epochs[request_id] = rest
            return Claim(ClaimStatus.CLAIMED, takeover=kind == "takeover")
        if kind == "busy":
            return Claim(ClaimStatus.BUSY)
        if kind in ("batched", "resolve"):
            submission = (extra or b"").decode()
            if kind == "resolve":
                self._epochs[request_id] = rest
                return Claim(ClaimStatus.RESOLVE, takeover=True, submission=submission)
            return Claim(ClaimStatus.BATCHED, submission=submission)
        if kind == "recover":
            state, _, epoch = rest.partition(":")
            self._epochs[request_id] = epoch
            return Claim(ClaimStatus.RECOVER, state=state, payload=extra or None)
        self._epochs.pop(request_id, None)
        return Claim(ClaimStatus.DONE, state=rest, payload=extra or None)

    def epoch(self, request_id: str) -> str:
        """The epoch of the claim this worker holds on ``request_id`` ('' for none)."""
        return self._epochs.get(request_id, "")

    def hold(self, request_id: str, epoch: str) -> None:
        """This worker holds ``request_id`` at ``epoch`` now, by a batch operation of the record
        (taken out of a batch, or a batch line's outcome stored): it may call, settle, emit."""
        self._epochs[request_id] = epoch

    def forget(self, request_id: str) -> None:
        """This worker holds ``request_id`` no more (a batch holds it now)."""
        self._epochs.pop(request_id, None)

    async def still_owner(self, request_id: str) -> bool:
        """Whether this worker still holds the claim on ``request_id``: ask just before each
        provider attempt. False once another worker took it over (it calls, not this one);
        raises :class:`ClaimUnavailable` while this worker's own lease is lapsed."""
        self._check_lease()
        epoch = self._epochs.get(request_id, "")
        answer, _ = await self._batcher.submit(
            WorkerOp("o", request_id, (epoch, "", "", "")), "check"
        )
        return answer == "1"

    async def before_call(self, request_id: str) -> int:
        """Just before each provider attempt for ``request_id``: return only while this worker's
        lease is live and the claim still its own, and then count the task as calling.

        Returns the call's number for this request ID over every worker that held it (1, 2, …;
        a taker goes on from a dead worker's count). Raises :class:`NotOwner` when another
        worker took the claim over, and cancels the task (``CancelledError``: not acked, the
        next owner reads the event again) when draining. While this worker's own lease is
        lapsed or Redis is unreachable, it waits.
        """
        delay = 0.05
        while True:
            if self.draining:
                raise asyncio.CancelledError("draining: no new provider attempt")
            try:
                number = await self._begin_call(request_id)
                break
            except ClaimUnavailable as exc:
                log.warning("no provider call for %s until the lease is live: %s", request_id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if not number:
            self._epochs.pop(request_id, None)
            log.warning("%s was taken over by another worker; not calling", request_id)
            raise NotOwner(f"{request_id} was taken over by another worker")
        task = self._loop.current_task()
        if task is not None:
            self._calling.add(task)
        return number

    async def _begin_call(self, request_id: str) -> int:
        self._check_lease()
        epoch = self._epochs.get(request_id, "")
        answer, _ = await self._batcher.submit(
            WorkerOp("a", request_id, (epoch, "", "", "")), "check"
        )
        return int(answer)

    def call_over(self) -> None:
        """The current task holds no call any more: it failed, or its answer is stored."""
        task = self._loop.current_task()
        if task is not None:
            self._calling.discard(task)

    def calling(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` has a provider call in flight or an answer not yet stored."""
        return task in self._calling

    async def settle(self, request_id: str, *, failed: bool, payload: bytes, now_ms: int) -> bool:
        """Store the outcome before it is emitted. False when another worker took the claim."""
        epoch = self._epochs.get(request_id, "")
        op = WorkerOp("s", request_id, ("f" if failed else "c", payload, now_ms, epoch))
        answer, _ = await self._batcher.submit(op, "store the outcome")
        if answer != "1":
            self._epochs.pop(request_id, None)
        return answer == "1"

    async def release(self, request_id: str) -> bool:
        """Give back the claim on ``request_id`` of a task that ended without settling it (a bug,
        or cancelled outside a drain), so that another worker takes it at once rather than once
        this worker's lease ends. True when released; False when this worker held no unsettled
        claim (the record is untouched: a stored outcome, or a claim taken over, stays)."""
        epoch = self._epochs.pop(request_id, None)
        if epoch is None:
            return False
        answer, _ = await self._batcher.submit(
            WorkerOp("u", request_id, (epoch, "", "", "")), "release"
        )
        return answer == "1"

    async def outcome(self, request_id: str) -> StoredOutcome | None:
        """The outcome stored for ``request_id`` and whether it was emitted (None: none yet)."""
        try:
            return await self.records.outcome(request_id)
        except _REDIS_ERRORS as exc:
            raise ClaimUnavailable(f"cannot read the record: {exc}") from exc

    async def mark_emitted(self, request_ids: Sequence[str]) -> None:
        """Record that these outcomes are on the broker: later copies are duplicates."""
        # Each mark is queued at once (they share the batcher's next run); awaiting them in turn
        # spares the gather a request would otherwise pay for its single mark.
        calls = [
            self._batcher.submit(WorkerOp("m", r), "mark outcomes emitted") for r in request_ids
        ]
        for call in calls:
            await call
        for request_id in request_ids:
            self._epochs.pop(request_id, None)
