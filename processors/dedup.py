"""Deduplication by request ID, in Redis, shared by every worker.

One hash per request ID (``{prefix}req:{id}``) records who works on it and what came of it::

    state     queued | claimed | completed | failed
    owner     the token of the worker process that holds the claim
    emitted   "1" once the outcome is acknowledged by the broker
    response  the LLMResponse JSON (completed)      error  the LLMError JSON (failed)

Ownership is a lease: each worker process keeps ``{prefix}worker:{token}`` alive with a short TTL
(renewed several times per lease by :meth:`DedupStore.heartbeat`). A claim whose owner's heartbeat
has lapsed is taken over, so a crashed worker is noticed within one lease (seconds), while a live
worker's claim holds however long its provider call runs.

An event rejected before it could be claimed (not a valid request) but whose request ID could be
read leaves ``{prefix}rejected:{id}`` instead (:meth:`DedupStore.record_rejection`): a hash of
``error`` (the LLMError JSON, without the raw payload) and ``field`` (the first invalid field), so
the ingress can say why. It is a key of its own, so it never overwrites a real request's record,
and the claim never reads it: a later valid request with the same ID is processed as new.

The provider's answer is stored (:meth:`DedupStore.settle`) *before* anything is emitted. A worker
that dies between the call and the emit leaves a stored, un-emitted outcome; whoever takes over
emits that outcome and never calls the provider again. Every decision is one Lua script, so two
workers can never both win a claim.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmstream.core.errors import LLMStreamError


class ClaimUnavailable(LLMStreamError):
    """Redis cannot be reached, or this worker's own lease lapsed: process nothing (fail closed)."""


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"  # this worker now owns the request: call the provider
    BUSY = "busy"  # a live worker owns it: wait and ask again
    DONE = "done"  # an outcome was emitted already: a duplicate
    RECOVER = "recover"  # an outcome is stored but was never emitted: emit it, no call


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    state: str | None = None  # "completed" or "failed" for DONE and RECOVER
    payload: bytes | None = None  # the stored LLMResponse or LLMError JSON
    takeover: bool = False  # CLAIMED from a worker whose lease lapsed


# KEYS[1] request hash, KEYS[2] own heartbeat; ARGV: token, heartbeat key prefix, ttl_s, now_ms.
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'dead'} end
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'emitted')
local state, owner, emitted = h[1], h[2], h[3]
local function owner_alive()
  return owner and (owner == ARGV[1] or redis.call('EXISTS', ARGV[2] .. owner) == 1)
end
if state == 'completed' or state == 'failed' then
  local field = state == 'completed' and 'response' or 'error'
  if emitted == '1' then return {'done', state, redis.call('HGET', KEYS[1], field)} end
  if owner_alive() then return {'busy'} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  return {'recover', state, redis.call('HGET', KEYS[1], field)}
end
if state == 'claimed' then
  if owner_alive() then return {'busy'} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'claimed_at_ms', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
  return {'claimed', 'takeover'}
end
redis.call('HSET', KEYS[1], 'state', 'claimed', 'owner', ARGV[1], 'emitted', '0',
           'claimed_at_ms', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'claimed'}
"""

# KEYS[1] request hash; ARGV: token, state, field, payload, ttl_s, now_ms.
# Fenced: a worker that lost its claim (its lease lapsed and another took over) stores nothing.
# A missing hash is not a lost claim but lost state (Redis restarted empty, or flushed): nobody
# else owns the request, so store the outcome; returning 0 here would ack an unemitted request.
_SETTLE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], ARGV[3], ARGV[4], 'settled_at_ms', ARGV[6],
           'owner', ARGV[1], 'emitted', '0')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: request hashes. Only existing hashes, so an expired one is not recreated without a TTL.
_MARK_EMITTED = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'emitted', '1') end
end
return #KEYS
"""


# One script run for every claim, settle and mark waiting. Each single-request script above
# becomes a Lua function of (KEYS, ARGV), so each call is decided exactly as alone, and the
# whole batch is one atomic script. What is the same for every call is sent once, and the
# answers come back as one space-separated string plus the payloads it refers to: redis-py
# spends far more CPU per element it packs or parses than Redis spends running the script.
#   KEYS: own heartbeat, then 1 per claim, 1 per settle, then the keys to mark emitted.
#   ARGV: #claims, #settles, token, heartbeat key prefix, ttl_s, then now_ms per claim, then
#         (c|f, payload, now_ms) per settle (c: completed response, f: failed error).
#   Reply: {answers, payload, ...}; answers holds per claim claimed | takeover | busy | dead |
#         done:<state> | recover:<state> (each of the last two adds one payload), per settle 1|0.
_BATCH = f"""
local function claim(KEYS, ARGV)
{_CLAIM}
end
local function settle(KEYS, ARGV)
{_SETTLE}
end
local function mark_emitted(KEYS, ARGV)
{_MARK_EMITTED}
end
local claims, settles = tonumber(ARGV[1]), tonumber(ARGV[2])
local token, hb_prefix, ttl = ARGV[3], ARGV[4], ARGV[5]
local answers, reply = {{}}, {{''}}
local k, a = 1, 5
for i = 1, claims do
  local r = claim({{KEYS[k + 1], KEYS[1]}}, {{token, hb_prefix, ttl, ARGV[a + 1]}})
  k, a = k + 1, a + 1
  if r[1] == 'claimed' then
    answers[#answers + 1] = r[2] and 'takeover' or 'claimed'
  elseif r[1] == 'done' or r[1] == 'recover' then
    answers[#answers + 1] = r[1] .. ':' .. r[2]
    reply[#reply + 1] = r[3] or ''
  else
    answers[#answers + 1] = r[1]
  end
end
for i = 1, settles do
  local state, field = 'completed', 'response'
  if ARGV[a + 1] == 'f' then state, field = 'failed', 'error' end
  local r = settle({{KEYS[k + 1]}}, {{token, state, field, ARGV[a + 2], ttl, ARGV[a + 3]}})
  answers[#answers + 1] = tostring(r)
  k, a = k + 1, a + 3
end
local marks = {{}}
for i = k + 1, #KEYS do marks[#marks + 1] = KEYS[i] end
if #marks > 0 then mark_emitted(marks, {{}}) end
reply[1] = table.concat(answers, ' ')
return reply
"""

_MAX_BATCH = 512  # calls per script run: bounds how long one run holds Redis


class _Call:
    __slots__ = ("args", "future", "keys", "kind", "what")

    def __init__(self, kind: str, keys: list[str], args: list[Any], what: str) -> None:
        self.kind = kind  # "claim" | "settle" | "mark"
        self.keys = keys
        self.args = args
        self.what = what
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class _Batcher:
    """Sends the claims, settles and marks of every request in flight to Redis together.

    A Redis round trip through redis-py costs about 100 µs of CPU whatever it carries: with three
    per request it was a fifth of the worker's CPU (measured with `llmstream bench`). Here one
    script run carries every call waiting, and runs start at most every ``interval_s``: a call
    made after a quiet spell goes at once, under load calls wait up to ``interval_s`` and share
    the run. One run is in flight at a time.

    A claim's answer is ``(kind, payload)``, a settle's is True when stored, a mark's is None.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        interval_s: float,
        *,
        heartbeat_key: str,
        shared_args: list[str],
    ) -> None:
        self._heartbeat_key = heartbeat_key
        self._shared_args = shared_args  # token, heartbeat key prefix, ttl_s
        self._script = redis.register_script(_BATCH)
        self._interval_s = interval_s
        self._waiting: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self._next_run = 0.0

    async def __call__(self, call: _Call) -> Any:
        self._waiting.append(call)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await call.future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
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
        claims = [c for c in batch if c.kind == "claim"]
        settles = [c for c in batch if c.kind == "settle"]
        marks = [c for c in batch if c.kind == "mark"]
        keys: list[str] = [self._heartbeat_key]
        args: list[Any] = [len(claims), len(settles), *self._shared_args]
        for call in (*claims, *settles, *marks):
            keys += call.keys
            args += call.args
        try:
            reply = await self._script(keys=keys, args=args)
        except RedisError as exc:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(ClaimUnavailable(f"cannot {call.what}: {exc}"))
            return
        answers = reply[0].decode().split(" ") if reply[0] else []
        payloads = iter(reply[1:])
        results: list[Any] = []
        for answer in answers[: len(claims)]:
            kind, _, state = answer.partition(":")
            results.append((kind, state, (next(payloads) or None) if state else None))
        results += [answer == "1" for answer in answers[len(claims) :]]
        results += [None] * len(marks)
        for call, result in zip((*claims, *settles, *marks), results, strict=True):
            if not call.future.done():
                call.future.set_result(result)


class DedupStore:
    """Claims, leases and stored outcomes of request IDs, for one worker process.

    Claims, settles and marks of concurrent requests go to Redis together, in one script run
    started at most every ``batch_interval_s`` (see :class:`_Batcher`).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        worker_token: str,
        lease_ms: int,
        result_ttl_s: int,
        batch_interval_s: float = 0.002,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._hb_prefix = f"{key_prefix}worker:"
        self.worker_token = worker_token
        self._heartbeat_key = f"{self._hb_prefix}{worker_token}"
        self.lease_ms = lease_ms
        self._ttl = str(result_ttl_s)
        self._batcher = _Batcher(
            redis,
            batch_interval_s,
            heartbeat_key=self._heartbeat_key,
            shared_args=[worker_token, self._hb_prefix, self._ttl],
        )

    def key(self, request_id: str) -> str:
        return f"{self._prefix}req:{request_id}"

    def rejected_key(self, request_id: str) -> str:
        return f"{self._prefix}rejected:{request_id}"

    async def record_rejection(self, request_id: str, *, error: bytes, field: str | None) -> None:
        """Keep why the event with ``request_id`` was rejected, for the result TTL."""
        key = self.rejected_key(request_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"error": error, "field": field or ""})
                pipe.expire(key, int(self._ttl))
                await pipe.execute()
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot record a rejected event: {exc}") from exc

    async def heartbeat(self) -> None:
        """Renew this worker's lease; every claim it holds stays live while this is called."""
        try:
            await self._redis.set(self._heartbeat_key, b"1", px=self.lease_ms)
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot renew the worker lease: {exc}") from exc

    async def resign(self) -> None:
        """Drop this worker's lease at shutdown so its unfinished claims are taken over at once."""
        try:
            await self._redis.delete(self._heartbeat_key)
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot drop the worker lease: {exc}") from exc

    async def claim(self, request_id: str, now_ms: int) -> Claim:
        """Try to take ``request_id``; see :class:`ClaimStatus` for what each answer means."""
        call = _Call("claim", [self.key(request_id)], [now_ms], "claim request")
        kind, state, payload = await self._batcher(call)
        if kind == "dead":
            raise ClaimUnavailable("this worker's lease lapsed; waiting for the heartbeat")
        if kind in ("claimed", "takeover"):
            return Claim(ClaimStatus.CLAIMED, takeover=kind == "takeover")
        return Claim(ClaimStatus(kind), state=state or None, payload=payload)

    async def settle(self, request_id: str, *, failed: bool, payload: bytes, now_ms: int) -> bool:
        """Store the outcome before it is emitted. False when another worker took the claim."""
        args = ["f" if failed else "c", payload, now_ms]
        call = _Call("settle", [self.key(request_id)], args, "store the outcome")
        return bool(await self._batcher(call))

    async def mark_emitted(self, request_ids: Sequence[str]) -> None:
        """Record that these outcomes are on the broker: later copies are duplicates."""
        if request_ids:
            keys = [self.key(r) for r in request_ids]
            await self._batcher(_Call("mark", keys, [], "mark outcomes emitted"))
