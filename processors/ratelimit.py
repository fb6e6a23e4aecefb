"""Shared rate limits: requests and tokens per minute, per provider, per model and per client,
enforced across every worker by one Redis script per decision.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a
bucket of ``limit`` per minute with capacity ``burst`` stores its theoretical arrival time (TAT);
a call of cost ``c`` conforms at ``max(now, TAT + (min(c, burst) - burst) * T)`` where
``T = 60 s / limit``, and then moves TAT to ``max(TAT, now) + c * T``. A request's buckets are
its provider's, its model's and its client's, each with an RPM and/or a TPM bucket; one script
checks them all and either reserves a slot in every one (when the latest of them is at most
``horizon_s`` away) or answers how long to wait. Nothing is reserved far ahead: a reservation
in one bucket would hold back every other request sharing it.

``burst`` defaults to 1 request for RPM (strict pacing: never more than ``limit`` calls in any
window of a minute, which is how providers that count a sliding window see it) and one second
of tokens for TPM. The limiter runs ``margin`` below the configured limit (2% by default) so that
the jitter between the decision and the call's arrival at the provider cannot push a window over.

Tokens are estimated before the call (prompt characters / 4 + ``max_tokens`` or a default) and
corrected with the provider's usage afterwards, moving the TAT back or forth.

Provider and model buckets are scaled by the provider's adaptive factor and held by its pause
(:mod:`processors.adaptive`); client buckets are not: a quota is the client's, whatever the
provider does.

Within a worker, requests with the same buckets (a lane) queue in order and only the first asks
Redis, so a backlog of thousands costs about two script runs per call, not one per waiter per
poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from llmstream.core.record import AnyRedis
from llmstream.processors.adaptive import AdaptiveControl, lua_factor, traffic_key_prefix
from llmstream.processors.backpressure import Stay
from llmstream.schemas.models import ChatMessage, LLMRequest

__all__ = ["Bucket", "Grant", "Lane", "RateLimit", "RateLimiter", "estimate_tokens"]

log = logging.getLogger(__name__)

Scope = Literal["provider", "model", "client"]

# KEYS[1] the provider's adaptive hash, KEYS[2..] bucket TATs (ms).
# ARGV: horizon_ms, recovery_per_ms, slot_ms, deadline_ms (0: none); then per bucket
#       interval_ms (per unit), capacity, cost, adaptive (1|0).
# Returns {status (1 granted, 0 wait, 2 past the deadline), wait_ms, factor, send_at_ms, binding,
# now_ms} where binding is the index of the bucket that decided the wait, 0 for the pause, -1 for
# none.
_ACQUIRE = (
    lua_factor
    + """
local now = redis_now()
local h = redis.call('HMGET', KEYS[1], 'f', 'r', 'pause')
local f = current_factor(tonumber(h[1]) or 1, tonumber(h[2]) or 0, now, tonumber(ARGV[2]))
local pause = tonumber(h[3]) or 0
local held = math.max(now, pause)
local allow, binding = held, -1
if pause > now then binding = 0 end
local n = #KEYS - 1
local tat, itv, base, cost = {}, {}, {}, {}
for i = 1, n do
  local a = 4 + (i - 1) * 4
  local interval, cap, c = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local b = now
  if ARGV[a + 4] == '1' then interval = interval / f; b = held end
  local t = tonumber(redis.call('GET', KEYS[i + 1])) or 0
  local at = math.max(b, t + (math.min(c, cap) - cap) * interval)
  if at > allow then allow, binding = at, i end
  tat[i], itv[i], base[i], cost[i] = t, interval, b, c
end
local wait = allow - now
local deadline = tonumber(ARGV[4])
local reply = {0, tostring(wait), tostring(f), tostring(allow), binding, tostring(now)}
if deadline > 0 and allow > deadline then reply[1] = 2 return reply end
if wait > tonumber(ARGV[1]) then return reply end
for i = 1, n do
  local new = math.max(tat[i], base[i]) + cost[i] * itv[i]
  redis.call('SET', KEYS[i + 1], tostring(new), 'PX', math.floor(new - now) + 60000)
end
-- Counted in the provider's observed goodput at the time it will be sent (adaptive.py).
local slot_ms = tonumber(ARGV[3])
local s = math.floor(allow / slot_ms)
local j = s % 64
if tonumber(redis.call('HGET', KEYS[1], 'k' .. j)) == s then
  redis.call('HINCRBY', KEYS[1], 'n' .. j, 1)
else
  redis.call('HSET', KEYS[1], 'k' .. j, s, 'n' .. j, 1)
end
redis.call('PEXPIRE', KEYS[1], 86400000)
reply[1] = 1
return reply
"""
)

# KEYS: token buckets; ARGV[i]: how far to move key i's TAT (ms, negative gives tokens back).
_CORRECT = """
for i, key in ipairs(KEYS) do
  local t = tonumber(redis.call('GET', key))
  if t then
    local delta = tonumber(ARGV[i])
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = 60000 end
    redis.call('SET', key, tostring(t + delta), 'PX', math.max(1000, ttl + math.floor(delta)))
  end
end
return #KEYS
"""

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


class RateLimit(BaseModel):
    """Limits of one scope: a provider, a ``provider/model``, or a client."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    rpm_burst: int = Field(default=1, ge=1)
    tpm_burst: int | None = Field(default=None, ge=1)  # default: one second of tokens


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    interval_ms: float  # per request or per token, margin included
    capacity: float
    tokens: bool
    adaptive: bool  # scaled by the provider's factor and held by its pause
    scope: Scope


@dataclass(frozen=True, slots=True)
class Lane:
    """The buckets a request must pass; requests with the same buckets queue together."""

    provider: str
    buckets: tuple[Bucket, ...]

    @property
    def key(self) -> str:
        return "|".join(b.key for b in self.buckets)

    @property
    def counts_tokens(self) -> bool:
        return any(b.tokens for b in self.buckets)


@dataclass(frozen=True, slots=True)
class Grant:
    """A reserved call: due at ``send_at_ms``, decided at ``decided_at_ms`` (Redis time);
    ``tokens`` were charged."""

    lane: Lane
    tokens: int
    send_at_ms: float
    decided_at_ms: float
    factor: float
    waited_s: float


@dataclass
class _Queue:
    busy: bool = False
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


def estimate_tokens(request: LLMRequest, default_completion_tokens: int) -> int:
    """A pre-call estimate of a request's tokens: prompt characters / 4, plus the completion."""
    chars = sum(_message_chars(m) // _CHARS_PER_TOKEN for m in request.messages)
    prompt = chars + _TOKENS_PER_MESSAGE * len(request.messages)
    return prompt + (request.max_tokens or default_completion_tokens)


def _message_chars(message: ChatMessage) -> int:
    """What a message sends the model: its text and the arguments of the tools it called."""
    calls = message.tool_calls or ()
    return len(message.content or "") + sum(len(call.function.arguments) for call in calls)


class RateLimiter:
    """Decides when each call may go; see the module docstring."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        limits: Mapping[str, RateLimit],
        client_quotas: Mapping[str, RateLimit],
        adaptive: AdaptiveControl,
        margin: float = 0.02,
        horizon_s: float = 0.5,
    ) -> None:
        self._prefix = f"{traffic_key_prefix(key_prefix)}rl:"
        self._limits = dict(limits)
        self._quotas = dict(client_quotas)
        self.adaptive = adaptive
        self._margin = margin
        self._horizon_s = horizon_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._correct = redis.register_script(_CORRECT)
        self._queues: dict[str, _Queue] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._limits or self._quotas)

    def lane(self, provider: str, model: str, client_id: str | None) -> Lane | None:
        """The buckets of a call to ``provider/model`` for ``client_id``; None when unlimited."""
        client = client_id or ""
        scopes: list[tuple[Scope, str, RateLimit | None, bool]] = [
            ("provider", provider, self._limits.get(provider), True),
            ("model", f"{provider}/{model}", self._limits.get(f"{provider}/{model}"), True),
            ("client", client, self._quotas.get(client) or self._quotas.get("default"), False),
        ]
        buckets: list[Bucket] = []
        for scope, name, limit, adaptive in scopes:
            if limit is None:
                continue
            stem = f"{self._prefix}{scope[0]}:{name}"
            if limit.rpm:
                buckets.append(
                    Bucket(
                        f"{stem}:r",
                        self._interval_ms(limit.rpm),
                        limit.rpm_burst,
                        False,
                        adaptive,
                        scope,
                    )
                )
            if limit.tpm:
                burst = limit.tpm_burst or max(1, int(limit.tpm / 60))
                buckets.append(
                    Bucket(f"{stem}:t", self._interval_ms(limit.tpm), burst, True, adaptive, scope)
                )
        return Lane(provider, tuple(buckets)) if buckets else None

    def _interval_ms(self, per_minute: float) -> float:
        return 60_000 / (per_minute * (1 - self._margin))

    async def acquire(
        self, lane: Lane, tokens: int, *, deadline_ms: int | None, stay: Stay
    ) -> tuple[Grant | None, Scope | Literal["pause"] | None]:
        """Wait for the lane's budget. Returns the grant (None when the call could not go before
        the deadline) and what made it wait, if anything."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue = self._queues.setdefault(lane.key, _Queue())
        queued = queue.busy
        if queued:
            stay.park()
            waiter: asyncio.Future[None] = loop.create_future()
            queue.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._hand_off(lane.key, queue)  # made first just now: pass it on
                elif waiter in queue.waiters:
                    queue.waiters.remove(waiter)
                raise
        else:
            queue.busy = True
        binding = -1
        try:
            while True:
                status, wait_ms, factor, send_at, binding, decided_at = await self._poll(
                    lane, tokens, deadline_ms
                )
                self.adaptive.factors[lane.provider] = factor
                if status != 0:
                    break
                stay.park()
                await asyncio.sleep(max(wait_ms / 1000 - self._horizon_s / 2, 0.002))
        finally:
            self._hand_off(lane.key, queue)
        waited_for: Scope | Literal["pause"] | None = None
        if binding == 0:
            waited_for = "pause"
        elif binding > 0 and (wait_ms > 1 or queued):
            waited_for = lane.buckets[binding - 1].scope
        elif queued:
            waited_for = lane.buckets[0].scope
        if status == 2:
            return None, waited_for
        if wait_ms > 1:
            stay.park()
            await asyncio.sleep(wait_ms / 1000)
        grant = Grant(lane, tokens, send_at, decided_at, factor, loop.time() - started)
        return grant, waited_for

    async def correct(self, grant: Grant, actual_tokens: int) -> None:
        """Replace the estimate charged to the token buckets by the real usage."""
        delta = actual_tokens - grant.tokens
        buckets = [b for b in grant.lane.buckets if b.tokens]
        if not delta or not buckets:
            return
        moves = [
            repr(delta * b.interval_ms / (grant.factor if b.adaptive else 1.0)) for b in buckets
        ]
        try:
            await self._correct(keys=[b.key for b in buckets], args=moves)
        except RedisError as exc:
            # Lost only the correction: the bucket stays charged with the estimate.
            log.warning("token usage correction not stored (%s)", exc)

    async def _poll(
        self, lane: Lane, tokens: int, deadline_ms: int | None
    ) -> tuple[int, float, float, float, int, float]:
        args: list[str] = [
            repr(self._horizon_s * 1000),
            repr(self.adaptive.params.recovery_per_ms),
            repr(self.adaptive.params.slot_ms),
            str(deadline_ms or 0),
        ]
        for b in lane.buckets:
            cost = tokens if b.tokens else 1
            args += [repr(b.interval_ms), repr(b.capacity), str(cost), "1" if b.adaptive else "0"]
        keys = [self.adaptive.key(lane.provider), *(b.key for b in lane.buckets)]
        delay = 0.1
        while True:
            try:
                reply = await self._acquire(keys=keys, args=args)
            except RedisError as exc:
                # Fail closed, as the claims do: no call without a decision.
                log.warning("rate limiter unreachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            return (
                int(reply[0]),
                float(reply[1]),
                float(reply[2]),
                float(reply[3]),
                int(reply[4]),
                float(reply[5]),
            )

    def _hand_off(self, key: str, queue: _Queue) -> None:
        while queue.waiters:
            waiter = queue.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        queue.busy = False
        if self._queues.get(key) is queue:
            del self._queues[key]
