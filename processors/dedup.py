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

The provider's answer is stored (:meth:`DedupStore.settle`) *before* anything is emitted. A worker
that dies between the call and the emit leaves a stored, un-emitted outcome; whoever takes over
emits that outcome and never calls the provider again. Every decision is one Lua script, so two
workers can never both win a claim.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmstream.errors import LLMStreamError


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


@dataclass(frozen=True, slots=True)
class StoredResult:
    """What the ingress shows for a request ID."""

    state: str  # queued | claimed | completed | failed
    payload: bytes | None


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

# KEYS[1] request hash; ARGV: token. Gives up a claim that never reached the provider.
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] == 'claimed' and h[2] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class DedupStore:
    """Claims, leases and stored outcomes of request IDs, for one worker process."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        worker_token: str,
        lease_ms: int,
        result_ttl_s: int,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._hb_prefix = f"{key_prefix}worker:"
        self.worker_token = worker_token
        self._heartbeat_key = f"{self._hb_prefix}{worker_token}"
        self.lease_ms = lease_ms
        self._ttl = str(result_ttl_s)
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._mark_emitted = redis.register_script(_MARK_EMITTED)
        self._release = redis.register_script(_RELEASE)

    def key(self, request_id: str) -> str:
        return f"{self._prefix}req:{request_id}"

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
        try:
            reply = await self._claim(
                keys=[self.key(request_id), self._heartbeat_key],
                args=[self.worker_token, self._hb_prefix, self._ttl, now_ms],
            )
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot claim request: {exc}") from exc
        kind = reply[0].decode()
        if kind == "dead":
            raise ClaimUnavailable("this worker's lease lapsed; waiting for the heartbeat")
        status = ClaimStatus(kind)
        if status is ClaimStatus.CLAIMED:
            return Claim(status, takeover=len(reply) > 1)
        if status is ClaimStatus.BUSY:
            return Claim(status)
        return Claim(status, state=reply[1].decode(), payload=reply[2])

    async def settle(self, request_id: str, *, failed: bool, payload: bytes, now_ms: int) -> bool:
        """Store the outcome before it is emitted. False when another worker took the claim."""
        state, field = ("failed", "error") if failed else ("completed", "response")
        try:
            stored = await self._settle(
                keys=[self.key(request_id)],
                args=[self.worker_token, state, field, payload, self._ttl, now_ms],
            )
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot store the outcome: {exc}") from exc
        return bool(stored)

    async def mark_emitted(self, request_ids: Sequence[str]) -> None:
        """Record that these outcomes are on the broker: later copies are duplicates."""
        if not request_ids:
            return
        try:
            await self._mark_emitted(keys=[self.key(r) for r in request_ids], args=[])
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot mark outcomes emitted: {exc}") from exc

    async def release(self, request_id: str) -> None:
        """Give up a claim that never reached the provider (shutdown, cancelled task)."""
        try:
            await self._release(keys=[self.key(request_id)], args=[self.worker_token])
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot release the claim: {exc}") from exc

    async def result(self, request_id: str) -> StoredResult | None:
        """The stored state of a request ID, for readers such as the ingress."""
        try:
            state, response, error = await self._redis.hmget(
                self.key(request_id), ["state", "response", "error"]
            )
        except RedisError as exc:
            raise ClaimUnavailable(f"cannot read the result: {exc}") from exc
        if state is None:
            return None
        payload = response or error
        return StoredResult(_text(state), _text(payload).encode() if payload else None)


def _text(value: bytes | str) -> str:
    # The client is built without decode_responses, so replies are bytes; the stubs allow str.
    return value.decode() if isinstance(value, bytes) else value
