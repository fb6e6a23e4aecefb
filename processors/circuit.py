"""Circuit breaking per ``provider/model``, with the state shared by every worker in Redis.

One hash per circuit (``{prefix}{traffic}cb:{provider}/{model}``)::

    st      "o" while open; absent when closed
    until   when the cool-down ends (ms); then one probe call may go (half-open)
    probe   the worker token holding the probe, ``pu`` until when (its lease)
    ws, fl, sc
            the failure window: its start (ms), failures and successes in it

A circuit opens when, within ``circuit_window_s``, at least ``circuit_min_failures`` calls failed
with an outage (5xx, timeout, broken connection: not 4xx, not 429) and they are at least
``circuit_failure_ratio`` of the calls. Open, it sends nothing for ``circuit_cooldown_s``; then
exactly one probe goes (the first worker to ask gets it), and its success closes the circuit, its
failure opens it for another cool-down. A probe that never reports (its worker died) is replaced
after ``circuit_probe_lease_s``.

Failures are reported at once (one script run each: the answer says whether the circuit is now
open, which decides whether the failure spends the request's retry budget). Successes are only
counted here and flushed with :meth:`CircuitBreakers.sync`, which also reads the state of every
circuit this worker uses, every ``sync_s``: a healthy provider costs no Redis call per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from llmstream.core.record import AnyRedis
from llmstream.processors.adaptive import lua_factor, traffic_key_prefix
from llmstream.processors.providers import ProviderError

__all__ = ["CircuitAdmission", "CircuitBreakers", "CircuitParams", "OutageWatch", "is_outage"]

log = logging.getLogger(__name__)

_NOW = lua_factor  # redis_now()

# KEYS[1] circuit. ARGV: window_ms, min_failures, ratio, cooldown_ms, token, is_probe (1|0).
# Returns {state "o"|"c", remaining_ms, event "opened"|"reopened"|""}.
_FAILURE = (
    _NOW
    + """
local now = redis_now()
local h = redis.call('HMGET', KEYS[1], 'st', 'until', 'ws', 'fl', 'sc', 'probe')
local cooldown = tonumber(ARGV[4])
if h[1] == 'o' then
  if ARGV[6] == '1' and h[6] == ARGV[5] then
    redis.call('HSET', KEYS[1], 'until', tostring(now + cooldown))
    redis.call('HDEL', KEYS[1], 'probe', 'pu')
    return {'o', tostring(cooldown), 'reopened'}
  end
  return {'o', tostring(math.max(0, (tonumber(h[2]) or 0) - now)), ''}
end
local ws, fl, sc = tonumber(h[3]) or 0, tonumber(h[4]) or 0, tonumber(h[5]) or 0
if now - ws > tonumber(ARGV[1]) then ws, fl, sc = now, 0, 0 end
fl = fl + 1
redis.call('PEXPIRE', KEYS[1], 86400000)
if fl >= tonumber(ARGV[2]) and fl / (fl + sc) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'st', 'o', 'until', tostring(now + cooldown), 'ws', tostring(now),
             'fl', 0, 'sc', 0)
  return {'o', tostring(cooldown), 'opened'}
end
redis.call('HSET', KEYS[1], 'ws', tostring(ws), 'fl', fl, 'sc', sc)
return {'c', '0', ''}
"""
)

# KEYS: circuits. ARGV[1] window_ms, ARGV[i + 1] successes to add to key i.
# Returns {state, remaining_ms} per key.
_SYNC = (
    _NOW
    + """
local now = redis_now()
local window = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'st', 'until', 'ws', 'sc')
  if h[1] == 'o' then
    out[#out + 1] = 'o'
    out[#out + 1] = tostring(math.max(0, (tonumber(h[2]) or 0) - now))
  else
    local n = tonumber(ARGV[i + 1])
    if n > 0 then
      if now - (tonumber(h[3]) or 0) > window then
        redis.call('HSET', key, 'ws', tostring(now), 'fl', 0, 'sc', n)
      else
        redis.call('HINCRBY', key, 'sc', n)
      end
      redis.call('PEXPIRE', key, 86400000)
    end
    out[#out + 1] = 'c'
    out[#out + 1] = '0'
  end
end
return out
"""
)

# KEYS[1] circuit. ARGV: token, lease_ms. Returns {"p" (probe granted) | "o" | "c", remaining_ms}.
_PROBE = (
    _NOW
    + """
local now = redis_now()
local h = redis.call('HMGET', KEYS[1], 'st', 'until', 'probe', 'pu')
if h[1] ~= 'o' then return {'c', '0'} end
local u = tonumber(h[2]) or 0
if now < u then return {'o', tostring(u - now)} end
local pu = tonumber(h[4]) or 0
if h[3] and now < pu then return {'o', tostring(pu - now)} end
redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'pu', tostring(now + tonumber(ARGV[2])))
return {'p', '0'}
"""
)

# KEYS[1] circuit. ARGV: token. The probe succeeded: closed, with a fresh window.
_CLOSE = """
local h = redis.call('HMGET', KEYS[1], 'st', 'probe')
if h[1] == 'o' and h[2] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

_FORGET_AFTER_S = 600.0  # a closed circuit unused this long leaves the local view


class CircuitAdmission(enum.Enum):
    CLOSED = "closed"  # call
    PROBE = "probe"  # call, as the one probe of a half-open circuit; report the outcome
    OPEN = "open"  # do not call: wait (or fall back)


def is_outage(error: ProviderError) -> bool:
    """A failure that says the provider is down: 5xx, timeout, broken connection."""
    if error.error_type in ("timeout", "connection_error"):
        return True
    return error.status_code is not None and error.status_code >= 500


class CircuitParams(BaseModel):
    """When a circuit opens and how it recovers; see the module docstring.

    The fields are the worker's settings of the same names (``LLMSTREAM_CIRCUIT_WINDOW_S``,
    ...): :class:`~llmstream.processors.settings.WorkerSettings` derives from this class.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    circuit_window_s: float = Field(10.0, gt=0.0)
    circuit_min_failures: int = Field(5, ge=1)
    circuit_failure_ratio: float = Field(0.5, gt=0.0, le=1.0)
    circuit_cooldown_s: float = Field(10.0, gt=0.0)
    circuit_probe_lease_s: float = Field(30.0, gt=0.0)


@dataclass
class _View:
    open: bool = False
    reopen_at: float = 0.0  # loop time a probe may go
    successes: int = 0
    used: float = field(default_factory=time.monotonic)
    probing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class CircuitBreakers:
    """This worker's view of every circuit it uses, and the calls that change them."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        key_prefix: str,
        worker_token: str,
        params: CircuitParams,
        sync_s: float,
    ) -> None:
        self.params = params
        # How stale the local view may be: :meth:`sync` runs this often (traffic_sync_s).
        self._sync_s = sync_s
        self._prefix = f"{traffic_key_prefix(key_prefix)}cb:"
        self._token = worker_token
        self._failure = redis.register_script(_FAILURE)
        self._sync = redis.register_script(_SYNC)
        self._probe = redis.register_script(_PROBE)
        self._close = redis.register_script(_CLOSE)
        self._views: dict[tuple[str, str], _View] = {}

    def key(self, provider: str, model: str) -> str:
        return f"{self._prefix}{provider}/{model}"

    def open_circuits(self) -> dict[tuple[str, str], bool]:
        """Every circuit in the local view and whether it is open (for the gauge)."""
        return {name: view.open for name, view in self._views.items()}

    def _view(self, provider: str, model: str) -> _View:
        view = self._views.get((provider, model))
        if view is None:
            view = self._views[(provider, model)] = _View()
        view.used = time.monotonic()
        return view

    def closed_here(self, provider: str, model: str) -> bool:
        """Whether the circuit is closed in the local view (:meth:`admit` answers CLOSED). A
        circuit not seen yet is closed; its view begins with the call's outcome."""
        view = self._views.get((provider, model))
        return view is None or not view.open

    async def admit(self, provider: str, model: str) -> tuple[CircuitAdmission, float]:
        """May a call go now? ``(OPEN, seconds)`` says how long until it is worth asking again."""
        view = self._view(provider, model)
        if not view.open:
            return CircuitAdmission.CLOSED, 0.0
        loop = asyncio.get_running_loop()
        remaining = view.reopen_at - loop.time()
        if remaining > 0:
            return CircuitAdmission.OPEN, remaining
        if view.probing:
            return CircuitAdmission.OPEN, self._sync_s
        view.probing = True
        try:
            state, remaining_ms = await self._probe(
                keys=[self.key(provider, model)],
                args=[self._token, repr(self.params.circuit_probe_lease_s * 1000)],
            )
        except RedisError as exc:
            # The breaker protects the provider; it must not fail requests when Redis does.
            log.warning("circuit %s/%s unreadable (%s); calling", provider, model, exc)
            return CircuitAdmission.CLOSED, 0.0
        finally:
            view.probing = False
        state = state.decode() if isinstance(state, bytes) else state
        if state == "p":
            # Until the probe reports, the others here wait at most its lease.
            view.reopen_at = loop.time() + self.params.circuit_probe_lease_s
            return CircuitAdmission.PROBE, 0.0
        if state == "c":
            self._set(view, False, 0.0)
            return CircuitAdmission.CLOSED, 0.0
        self._set(view, True, float(remaining_ms))
        return CircuitAdmission.OPEN, float(remaining_ms) / 1000

    async def wait(self, provider: str, model: str, at_most_s: float) -> None:
        """Until the circuit's state changes here, or ``at_most_s``."""
        event = self._view(provider, model).changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.001, at_most_s)):
                await event.wait()

    def record_success(self, provider: str, model: str) -> None:
        """Count a success (flushed by :meth:`sync`)."""
        self._view(provider, model).successes += 1

    async def record_probe_success(self, provider: str, model: str) -> None:
        """The probe succeeded: close the circuit for everyone."""
        try:
            await self._close(keys=[self.key(provider, model)], args=[self._token])
        except RedisError as exc:
            log.warning("circuit %s/%s not closed in Redis (%s)", provider, model, exc)
        self._set(self._view(provider, model), False, 0.0)

    async def record_failure(self, provider: str, model: str, *, probe: bool) -> tuple[bool, str]:
        """Report an outage failure; returns (the circuit is open now, "opened"|"reopened"|"")."""
        p = self.params
        try:
            state, remaining_ms, event = await self._failure(
                keys=[self.key(provider, model)],
                args=[
                    repr(p.circuit_window_s * 1000),
                    str(p.circuit_min_failures),
                    repr(p.circuit_failure_ratio),
                    repr(p.circuit_cooldown_s * 1000),
                    self._token,
                    "1" if probe else "0",
                ],
            )
        except RedisError as exc:
            log.warning("failure of %s/%s not recorded (%s)", provider, model, exc)
            return False, ""
        is_open = (state.decode() if isinstance(state, bytes) else state) == "o"
        self._set(self._view(provider, model), is_open, float(remaining_ms))
        return is_open, event.decode() if isinstance(event, bytes) else str(event)

    async def sync(self) -> None:
        """Flush counted successes and read the state of every circuit used here."""
        now = time.monotonic()
        for name in [n for n, v in self._views.items() if not v.open and not v.successes]:
            if now - self._views[name].used > _FORGET_AFTER_S:
                del self._views[name]
        names = list(self._views)
        if not names:
            return
        counts = [self._views[n].successes for n in names]
        for name in names:
            self._views[name].successes = 0
        try:
            reply = await self._sync(
                keys=[self.key(*n) for n in names],
                args=[repr(self.params.circuit_window_s * 1000), *map(str, counts)],
            )
        except BaseException:
            for name, count in zip(names, counts, strict=True):
                if name in self._views:
                    self._views[name].successes += count
            raise
        for i, name in enumerate(names):
            state = reply[2 * i]
            state = state.decode() if isinstance(state, bytes) else state
            view = self._views.get(name)
            if view is not None and not (view.probing and state == "o"):
                self._set(view, state == "o", float(reply[2 * i + 1]))

    def _set(self, view: _View, is_open: bool, remaining_ms: float) -> None:
        loop = asyncio.get_running_loop()
        changed = view.open != is_open
        view.open = is_open
        if is_open:
            reopen_at = loop.time() + remaining_ms / 1000
            # A probe granted here keeps the others waiting for its outcome (or its lease).
            if remaining_ms > 0 or view.reopen_at <= loop.time():
                view.reopen_at = reopen_at
        if changed:
            view.notify()


@dataclass
class _Outage:
    since: float  # the first failure after the last success
    seen: float  # the latest failure, or wait on the open circuit
    last_error: str | None = None
    gave_up: str | None = None  # why a request got no answer within the bound


class OutageWatch:
    """Which ``provider/model`` is down, as this worker sees it, for /ready.

    Down: no successful call here while calls kept failing with outages or were held back by the
    open circuit, for longer than the bound, or a request got no answer within it
    (``provider_unavailable``). A model nobody here called or waited for within the bound is
    forgotten: no evidence either way, and a recovered provider that nobody calls must not keep
    the worker unready.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._outages: dict[tuple[str, str], _Outage] = {}

    def failed(self, provider: str, model: str, error: ProviderError | None = None) -> None:
        """An outage failure, or (``error`` None) a call held back by the open circuit."""
        now = self._clock()
        outage = self._outages.setdefault((provider, model), _Outage(since=now, seen=now))
        outage.seen = now
        if error is not None:
            outage.last_error = str(error)

    def gave_up(self, provider: str, model: str, why: str) -> None:
        """A request got no answer from the model within the bound."""
        self.failed(provider, model)
        self._outages[(provider, model)].gave_up = why

    def succeeded(self, provider: str, model: str) -> None:
        self._outages.pop((provider, model), None)

    def down(self, longer_than_s: float) -> dict[str, str]:
        """``provider/model`` → why, for each down for longer than ``longer_than_s`` (and seen
        failing within the last ``longer_than_s``)."""
        now = self._clock()
        result: dict[str, str] = {}
        for key, outage in list(self._outages.items()):
            if now - outage.seen > longer_than_s:
                del self._outages[key]  # forgotten, not recovered: see the class docstring
                continue
            if outage.gave_up is None and now - outage.since <= longer_than_s:
                continue
            why = outage.gave_up or (
                f"no successful call for {now - outage.since:.0f} s; "
                + (f"last error: {outage.last_error}" if outage.last_error else "circuit open")
            )
            result[f"{key[0]}/{key[1]}"] = why
        return result
