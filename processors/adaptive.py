"""Adaptive send rate per provider: what to do when a provider answers 429 although the limiter
let the call through (its real limit is lower than configured, or others share the key).

State lives in one Redis hash per provider (``{prefix}{traffic}ad:{provider}``), shared by every
worker::

    f       send-rate factor after the last decrease (1 = the configured limit)
    r       when recovery starts (ms): the factor grows linearly from ``f`` after ``r``
    d       when the factor was last decreased (ms)
    pause   no call to this provider before this time (ms): ``Retry-After``, provider-wide
    k0..k63, n0..n63
            a ring of 60 slots (one per ``window/60``) counting calls granted by the limiter
            and not answered 429: the provider's observed goodput over its rate window

The controller is AIMD. On a 429 (one Lua script):

- the whole provider pauses for ``Retry-After`` (or ``rate_limit_default_pause_s`` without
  one, and at most ``max_retry_after_s``), so every worker honours it, not only the request
  that got it;
- the factor decreases once per feedback round: only a call let through after the last
  decrease can decrease it again, so the burst of 429s that a full window produces counts once.
  The new factor is the observed goodput of the last window over the configured RPM (what the
  provider actually accepted: for a window-counting provider, exactly its limit), bounded
  between ``_BETA_MIN`` and ``_BETA_MAX`` times the current factor (without a provider RPM,
  ``_BETA_MIN``: classic halving);
- it then recovers additively, ``adaptive_recovery_per_min`` per minute after the pause, up
  to 1.

The limiter (:mod:`processors.ratelimit`) reads the factor and the pause in its own script, so a
decision always sees the newest state. Every time is Redis' ``TIME``, so workers on hosts with
skewed clocks agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field

from llmstream.core.record import AnyRedis
from llmstream.processors.retry import RetryAfterCap

__all__ = ["RING_SLOTS", "AdaptiveControl", "AdaptiveParams", "lua_factor", "traffic_key_prefix"]

RING_SLOTS = 64  # ring size; the window is the last 60 of them


def traffic_key_prefix(key_prefix: str) -> str:
    """The prefix of every traffic-control key (adaptive rates, rate limits, circuits).

    One Redis Cluster hash tag for all of them: a limiter decision takes a provider's adaptive
    hash and its provider, model and client buckets in one script, so on Redis Cluster they must
    share a slot (else CROSSSLOT). They are few (per provider, model and client) and small, so
    one slot holds them easily. A key prefix with a hash tag of its own decides the slot instead:
    still one slot for all of them.
    """
    return f"{key_prefix}{{traffic}}"


# Shared by the scripts here and the limiter's: the factor now, from its stored form.
lua_factor = """
local function current_factor(f, r, now, rec)
  if f < 1 and now > r then return math.min(1, f + (now - r) * rec) end
  return f
end
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# KEYS[1] the provider's hash. ARGV: sent_at_ms, retry_after_ms (<0: none), default_pause_ms,
# max_pause_ms, beta_min, beta_max, min_factor, recovery_per_ms, slot_ms, provider_rpm (0: none),
# decided_at_ms (when the limiter let the call through).
# Returns {factor, pause_remaining_ms, decreased (0|1)}.
_REPORT_429 = (
    lua_factor
    + """
local now = redis_now()
local h = redis.call('HMGET', KEYS[1], 'f', 'r', 'd', 'pause')
local f, r = tonumber(h[1]) or 1, tonumber(h[2]) or 0
local d, pause = tonumber(h[3]) or 0, tonumber(h[4]) or 0
local rec, slot_ms = tonumber(ARGV[8]), tonumber(ARGV[9])
local cur = current_factor(f, r, now, rec)
local sent = tonumber(ARGV[1])
-- Not accepted by the provider: out of the observed goodput.
local s = math.floor(sent / slot_ms)
local i = s % 64
if tonumber(redis.call('HGET', KEYS[1], 'k' .. i)) == s then
  redis.call('HINCRBY', KEYS[1], 'n' .. i, -1)
end
local wait = tonumber(ARGV[2])
if wait < 0 then wait = tonumber(ARGV[3]) end
wait = math.min(wait, tonumber(ARGV[4]))
if now + wait > pause then pause = now + wait end
local decreased = 0
if tonumber(ARGV[11]) >= d then
  local lo, hi = cur * tonumber(ARGV[5]), cur * tonumber(ARGV[6])
  local target = lo
  local rpm = tonumber(ARGV[10])
  if rpm > 0 then
    local fields = {}
    for j = 0, 63 do fields[#fields + 1] = 'k' .. j; fields[#fields + 1] = 'n' .. j end
    local ring = redis.call('HMGET', KEYS[1], unpack(fields))
    local now_slot = math.floor(now / slot_ms)
    local seen = 0
    for j = 1, #ring, 2 do
      local k = tonumber(ring[j])
      if k and k > now_slot - 60 and k <= now_slot then
        seen = seen + (tonumber(ring[j + 1]) or 0)
      end
    end
    -- Accepted calls per minute over the last window, as a share of the configured RPM.
    target = math.max(lo, math.min(hi, seen * 1000 / slot_ms / rpm))
  end
  cur = math.max(tonumber(ARGV[7]), target)
  d = now
  decreased = 1
end
-- Recovery restarts after the pause: nothing is learned while nothing is sent.
redis.call('HSET', KEYS[1], 'f', tostring(cur), 'r', tostring(math.max(now, pause)),
           'd', tostring(d), 'pause', tostring(pause))
redis.call('PEXPIRE', KEYS[1], 86400000)
return {tostring(cur), tostring(math.max(0, pause - now)), decreased}
"""
)

# KEYS: provider hashes. ARGV[1] recovery_per_ms. Returns {factor, pause_remaining_ms} per key.
_READ = (
    lua_factor
    + """
local now = redis_now()
local out = {}
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'f', 'r', 'pause')
  local f = current_factor(tonumber(h[1]) or 1, tonumber(h[2]) or 0, now, tonumber(ARGV[1]))
  out[#out + 1] = tostring(f)
  out[#out + 1] = tostring(math.max(0, (tonumber(h[3]) or 0) - now))
end
return out
"""
)


# How far one feedback round may decrease the factor: to between these shares of the current one.
_BETA_MIN = 0.5
_BETA_MAX = 0.9


class AdaptiveParams(RetryAfterCap):
    """How the controller reacts; see the module docstring.

    The fields are the worker's settings of the same names (``LLMSTREAM_ADAPTIVE_WINDOW_S``,
    ...): :class:`~llmstream.processors.settings.WorkerSettings` derives from this class. A pause
    lasts at most ``max_retry_after_s``, the cap a retry's wait has too.
    """

    # The providers' rate window (their limits count calls over it).
    adaptive_window_s: float = Field(60.0, gt=0.0)
    # Recovery per minute after a decrease, as a share of the configured rate.
    adaptive_recovery_per_min: float = Field(0.1, ge=0.0)
    # The lowest factor a provider's rate decreases to.
    adaptive_min_factor: float = Field(0.05, gt=0.0, le=1.0)
    # The pause after a 429 without Retry-After.
    rate_limit_default_pause_s: float = Field(1.0, ge=0.0)

    @property
    def slot_ms(self) -> float:
        return self.adaptive_window_s * 1000 / 60

    @property
    def recovery_per_ms(self) -> float:
        return self.adaptive_recovery_per_min / 60_000


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a reported 429 changed."""

    factor: float
    pause_s: float
    decreased: bool


class AdaptiveControl:
    """Reports 429s to the shared state and keeps a local view of each provider's pause."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        params: AdaptiveParams,
        provider_rpm: dict[str, float],
    ) -> None:
        self.params = params
        self._prefix = f"{traffic_key_prefix(key_prefix)}ad:"
        self._provider_rpm = provider_rpm
        self._report = redis.register_script(_REPORT_429)
        self._read = redis.register_script(_READ)
        # provider -> loop time the pause ends (the local view, for providers without buckets
        # and for calls granted before a pause began).
        self._paused_until: dict[str, float] = {}
        self.factors: dict[str, float] = {}

    def key(self, provider: str) -> str:
        return f"{self._prefix}{provider}"

    def pause_remaining(self, provider: str) -> float:
        """Seconds this provider is still paused, as last seen here."""
        until = self._paused_until.get(provider)
        if until is None:
            return 0.0
        return max(0.0, until - asyncio.get_running_loop().time())

    async def report_429(
        self,
        provider: str,
        *,
        sent_at_ms: float,
        retry_after_s: float | None,
        decided_at_ms: float | None = None,
    ) -> Feedback:
        """A call sent at ``sent_at_ms`` (Redis time; let through by the limiter at
        ``decided_at_ms``) was answered 429: pause, maybe decrease."""
        p = self.params
        retry_ms = -1.0 if retry_after_s is None else retry_after_s * 1000
        reply = await self._report(
            keys=[self.key(provider)],
            args=[
                repr(sent_at_ms),
                repr(retry_ms),
                repr(p.rate_limit_default_pause_s * 1000),
                repr(p.max_retry_after_s * 1000),
                repr(_BETA_MIN),
                repr(_BETA_MAX),
                repr(p.adaptive_min_factor),
                repr(p.recovery_per_ms),
                repr(p.slot_ms),
                repr(self._provider_rpm.get(provider, 0.0)),
                repr(sent_at_ms if decided_at_ms is None else decided_at_ms),
            ],
        )
        factor, pause_ms, decreased = float(reply[0]), float(reply[1]), int(reply[2])
        self._set(provider, factor, pause_ms)
        return Feedback(factor, pause_ms / 1000, bool(decreased))

    async def refresh(self, providers: Iterable[str]) -> None:
        """Read every provider's factor and pause (what other workers reported)."""
        names = sorted(set(providers))
        if not names:
            return
        reply = await self._read(
            keys=[self.key(n) for n in names], args=[repr(self.params.recovery_per_ms)]
        )
        for i, name in enumerate(names):
            self._set(name, float(reply[2 * i]), float(reply[2 * i + 1]))

    def _set(self, provider: str, factor: float, pause_ms: float) -> None:
        self.factors[provider] = factor
        if pause_ms > 0:
            self._paused_until[provider] = asyncio.get_running_loop().time() + pause_ms / 1000
        else:
            self._paused_until.pop(provider, None)
