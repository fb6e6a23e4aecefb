"""The async operations on request records that the worker, the ingress and replay call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from llmstream.core.errors import LLMStreamError
from llmstream.core.record import scripts
from llmstream.core.record.keys import AnyRedis, Field, RecordKeys, State, by_slot
from llmstream.schemas.codec import decode
from llmstream.schemas.models import LLMError, LLMResponse

Outcome = LLMResponse | LLMError
Status = Literal["pending", "completed", "failed"]


class ClaimUnavailable(LLMStreamError):
    """Redis cannot be reached, or this worker's own lease lapsed: process nothing (fail closed)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """The record of one request ID, as the ingress shows it."""

    state: str  # a State
    client: str | None  # who submitted it through the ingress, when API keys are on
    payload: bytes | None  # the LLMResponse (completed) or LLMError (failed) JSON
    digest: str | None = None  # of the request's content, when the ingress published it
    field: str | None = None  # the first invalid field of an event the worker rejected

    @property
    def status(self) -> Status:
        if self.state == State.COMPLETED:
            return "completed"
        return "failed" if self.state == State.FAILED else "pending"

    def outcome(self) -> Outcome | None:
        """The decoded outcome, when there is one."""
        if not self.payload:
            return None
        if self.state == State.COMPLETED:
            return decode(self.payload, LLMResponse)
        if self.state == State.FAILED:
            return decode(self.payload, LLMError)
        return None


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """A request's stored outcome, and whether it is on the broker already."""

    state: str  # State.COMPLETED or State.FAILED
    payload: bytes  # the LLMResponse or LLMError JSON
    emitted: bool


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`RecordStore.reserve` found for one request ID."""

    request_id: str
    publish: bool  # recorded as queued by this call: publish it (and release it on failure)
    existing: Stored | None = None


@dataclass(frozen=True, slots=True)
class WorkerOp:
    """One call of the worker's batched script (see :data:`scripts.WORKER`)."""

    # claim, settle, mark emitted, still owner, a call begins (still owner + count), unclaim;
    # the batch tier's: into a batch, batched, out of a batch, a batch line's outcome
    kind: Literal["c", "s", "m", "o", "a", "u", "b", "B", "x", "r"]
    request_id: str
    args: tuple[Any, Any, Any, Any] = ("", "", "", "")


# Answers of the worker script that carry one extra reply element (an owner or a payload).
_WITH_EXTRA = ("busy:", "done:", "recover:", "batched:", "resolve:")


class RecordStore:
    """Request records under one key prefix, on a single Redis or on Redis Cluster.

    Scripts over several requests run once per hash slot on Redis Cluster (concurrently), once in
    all on a single Redis.
    """

    def __init__(self, redis: AnyRedis, *, key_prefix: str, ttl_s: int) -> None:
        self.redis = redis
        self.keys = RecordKeys(key_prefix)
        self.ttl_s = ttl_s
        self._worker = redis.register_script(scripts.WORKER)
        self._reject = redis.register_script(scripts.REJECT)
        self._reserve = redis.register_script(scripts.RESERVE)
        self._release = redis.register_script(scripts.RELEASE)
        self._reset = redis.register_script(scripts.RESET)

    # -- the worker ---------------------------------------------------------------------------

    async def run(self, token: str, ops: Sequence[WorkerOp]) -> list[tuple[str, bytes | None]]:
        """Run the worker's calls; per call its answer and extra element (see the script)."""
        keys = [self.keys.record(op.request_id) for op in ops]
        groups = by_slot(self.redis, keys)
        runs = [
            self._worker(
                keys=[keys[i] for i in group],
                args=[
                    token,
                    self.ttl_s,
                    orjson.dumps([(ops[i].kind, *ops[i].args) for i in group], default=_utf8),
                ],
            )
            for group in groups
        ]
        # One run (a single Redis) is awaited as it is: a gather would wrap it in a task.
        replies = [await runs[0]] if len(runs) == 1 else await asyncio.gather(*runs)
        results: list[tuple[str, bytes | None]] = [("", None)] * len(ops)
        for group, reply in zip(groups, replies, strict=True):
            answers = _text(reply[0]).split(" ") if reply[0] else []
            extras = iter(reply[1:])
            for index, answer in zip(group, answers, strict=True):
                extra = next(extras) if answer.startswith(_WITH_EXTRA) else None
                results[index] = (answer, extra)
        return results

    async def heartbeat(self, token: str, lease_ms: int) -> None:
        await self.redis.set(self.keys.heartbeat(token), b"1", px=lease_ms)

    async def resign(self, token: str) -> None:
        await self.redis.delete(self.keys.heartbeat(token))

    async def alive(self, token: str) -> bool:
        """Whether the worker ``token``'s heartbeat lives (a plain read, in its own slot)."""
        return bool(await self.redis.exists(self.keys.heartbeat(token)))

    async def record_rejection(self, request_id: str, *, error: bytes, field: str | None) -> None:
        """Keep why the event with ``request_id`` was rejected, for the result TTL."""
        await self._reject(
            keys=[self.keys.rejected(request_id)], args=[error, field or "", self.ttl_s]
        )

    # -- the ingress --------------------------------------------------------------------------

    async def reserve(
        self,
        requests: Sequence[tuple[str, str]],
        *,
        client: str | None,
        token: str,
        now_ms: int,
        requeue_after_ms: int,
    ) -> list[Reservation]:
        """Record each ``(request ID, content digest)`` as queued unless the ID exists."""
        keys = [self.keys.record(request_id) for request_id, _ in requests]
        groups = by_slot(self.redis, keys)
        shared: list[str | int] = [now_ms, self.ttl_s, client or "", requeue_after_ms, token]
        replies = await asyncio.gather(
            *(
                self._reserve(
                    keys=[keys[i] for i in group],
                    args=[*shared, *(requests[i][1] for i in group)],
                )
                for group in groups
            )
        )
        found: list[Reservation | None] = [None] * len(requests)
        for group, reply in zip(groups, replies, strict=True):
            for index, part in zip(group, reply, strict=True):
                request_id = requests[index][0]
                if _text(part[0]) in ("new", "stale"):
                    found[index] = Reservation(request_id, publish=True)
                    continue
                state, owner, payload, digest = (_text(x) for x in part[1:])
                stored = Stored(
                    state, owner or None, payload.encode() if payload else None, digest or None
                )
                found[index] = Reservation(request_id, publish=False, existing=stored)
        return [r for r in found if r is not None]

    async def release(self, token: str, request_ids: Sequence[str]) -> int:
        """Drop the reservations ``token`` made for these IDs, unless a worker has them."""
        keys = [self.keys.record(r) for r in request_ids]
        counts = await asyncio.gather(
            *(
                self._release(keys=[keys[i] for i in group], args=[token])
                for group in by_slot(self.redis, keys)
            )
        )
        return sum(int(n) for n in counts)

    async def get(self, request_id: str) -> Stored | None:
        state, client, response, error = await self.redis.hmget(
            self.keys.record(request_id), [Field.STATE, Field.CLIENT, Field.RESPONSE, Field.ERROR]
        )
        if state is None:
            return None
        text = _text(state)
        payload = response if text == State.COMPLETED else error if text == State.FAILED else None
        return Stored(text, _text(client) if client else None, _bytes(payload))

    async def outcome(self, request_id: str) -> StoredOutcome | None:
        """The outcome stored for ``request_id`` and whether it was emitted; None while there is
        none (no record, queued or claimed). One read: state, payload and mark agree."""
        state, response, error, emitted = await self.redis.hmget(
            self.keys.record(request_id), [Field.STATE, Field.RESPONSE, Field.ERROR, Field.EMITTED]
        )
        text = _text(state) if state is not None else None
        payload = response if text == State.COMPLETED else error if text == State.FAILED else None
        if text is None or payload is None:
            return None
        return StoredOutcome(text, _bytes(payload) or b"", _text(emitted or b"") == "1")

    async def rejection(self, request_id: str) -> Stored | None:
        """Why the worker rejected an event with this ID (failed, no client), if it did."""
        error, field = await self.redis.hmget(
            self.keys.rejected(request_id), [Field.ERROR, Field.INVALID_FIELD]
        )
        if error is None:
            return None
        return Stored(State.FAILED, None, _bytes(error), field=_text(field) if field else None)

    # -- replay -------------------------------------------------------------------------------

    async def state(self, request_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.record(request_id), Field.STATE)
        return _text(raw) if raw is not None else None

    async def reset_failed(self, request_id: str, *, now_ms: int, token: str) -> str:
        """``failed`` → ``queued``: ``reset``; ``absent`` without a record; else its state."""
        return _text(await self._reset(keys=[self.keys.record(request_id)], args=[now_ms, token]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else value


def _utf8(value: object) -> str:
    """A payload (JSON, so UTF-8) as the JSON string the worker's script reads back as bytes."""
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"a worker call's argument cannot be {type(value).__name__}")
