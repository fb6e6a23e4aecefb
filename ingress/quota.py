"""The per-client request quota of the HTTP API, shared by every ingress replica through Redis.

Not the provider rate limits the worker keeps (:mod:`processors.ratelimit`): this one counts
what each client asks of the ingress. A second, small budget counts failed authentications per
peer address (:meth:`ClientQuota.failed`): once an address has spent it, its calls with a missing
or wrong key are refused with 429 until the budget refills, so guessing keys is slow.

GCRA (the generic cell rate algorithm): one key per client holds its "theoretical arrival time",
so the state is one number whatever the rate, and one Lua script decides and answers how long to
wait, atomically, on Redis's own clock (replicas with skewed clocks agree). ``burst`` requests
may come at once; after that one every ``60 / per_minute`` seconds.

Why not a library: ``limits`` (the best kept on PyPI) builds its own Redis client from a URL and
needs a second round trip to learn the reset time for ``Retry-After``; its moving window keeps
one entry per request. This is one script and one round trip on the app's own client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmstream.core.record import AnyRedis
from llmstream.ingress.errors import ApiError

# KEYS[1] the client's key; ARGV: emission interval (µs), burst tolerance (µs), '1' to count
# the request or '0' only to ask whether one would pass.
# Returns {allowed (0/1), µs to wait before the next request may pass, requests left now}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - now - tolerance, 0}
end
if ARGV[3] == '0' then return {1, 0, -1} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, 0, math.floor((tolerance - (new_tat - now)) / interval) + 1}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    remaining: int

    def refusal(
        self, what: str = "rate limit exceeded for this client", code: str = "rate_limit_exceeded"
    ) -> ApiError:
        """The 429 for a request the quota refused, saying when to come back."""
        wait_s = max(self.retry_after_s, 0.001)
        return ApiError(
            429,
            f"{what}; retry in {wait_s:.1f} s",
            code=code,
            headers={
                "Retry-After": str(max(1, math.ceil(wait_s))),
                "retry-after-ms": str(math.ceil(wait_s * 1000)),
            },
        )


def _gcra_args(per_minute: int, burst: int) -> list[int]:
    interval_us = 60_000_000 // max(per_minute, 1)
    return [interval_us, interval_us * (burst - 1)]


class ClientQuota:
    """``per_minute`` requests per client on average, ``burst`` at once; 0 turns it off.

    Failed authentications have their own budget per peer address: ``failures_per_minute`` on
    average, ``failures_burst`` at once; 0 turns it off.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        per_minute: int,
        burst: int,
        failures_per_minute: int = 30,
        failures_burst: int = 10,
    ) -> None:
        self._prefix = f"{key_prefix}ratelimit:"
        self._failures_prefix = f"{key_prefix}authfail:"
        self.enabled = per_minute > 0
        self._args = _gcra_args(per_minute, burst)
        self._failures_on = failures_per_minute > 0
        self._failure_args = _gcra_args(failures_per_minute, failures_burst)
        self._script = redis.register_script(_GCRA)

    async def acquire(self, client: str) -> Decision:
        """Count one request of ``client``; raises RedisError when Redis cannot be reached."""
        if not self.enabled:
            return Decision(True, 0.0, -1)
        return await self._run(self._prefix + client, [*self._args, 1])

    async def failed(self, peer: str) -> Decision:
        """Count one failed authentication from ``peer``: refused once its budget is spent."""
        if not self._failures_on:
            return Decision(True, 0.0, -1)
        return await self._run(self._failures_prefix + peer, [*self._failure_args, 1])

    async def _run(self, key: str, args: list[int]) -> Decision:
        allowed, wait_us, remaining = await self._script(keys=[key], args=args)
        return Decision(bool(allowed), int(wait_us) / 1_000_000, int(remaining))
