"""Traffic control around one request's provider calls: cache, fallbacks, circuit breaking, shared
rate limits, adaptive rate on 429, retries and cost.

:meth:`TrafficControl.complete` is how the pipeline calls a provider, between the claim and the
settle. For one request:

1. **Cache.** With ``cache: true`` (or ``LLMSTREAM_CACHE_TEMPERATURE_ZERO`` and temperature 0), an
   identical earlier answer is returned without a call (:mod:`llmstream.processors.cache`).
2. **Candidates.** The request's model, then its ``fallbacks`` (or the configured defaults for its
   model, ``LLMSTREAM_FALLBACKS``), in order. The next one is tried when a model fails with
   anything but ``invalid_request`` (the request itself is wrong), ``expired`` or
   ``provider_unavailable`` (no time left), or when its circuit is open. A fallback whose
   provider is unknown or not configured is skipped. The response names the model that
   answered; ``attempts`` counts every call.
3. For each call: **circuit** (open: go to the next candidate, or wait for the circuit to close
   when there is none), **rate budget** (wait; :mod:`processors.ratelimit`), then the call.
4. **429** after the limiter let the call through: the provider pauses for ``Retry-After``
   (every worker), its rate factor decreases (:mod:`processors.adaptive`), and the request waits
   and calls again. That does not spend its retry budget: a 429 here says the provider is at
   capacity, not that the request fails; ``LLMSTREAM_MAX_RATE_LIMITED_ATTEMPTS`` bounds it.
   Which failures spend the retry budget is decided in one place, :meth:`TrafficControl._charge`;
   the loop that applies it is :func:`processors.retry.call_with_retries`, the only one.
5. **5xx / timeout / broken connection**: reported to the circuit. A failure after which the
   circuit is open spends no retry budget either: the request waits for the circuit or falls
   back, so no request fails for lack of retries while its provider is known to be down. Other
   retryable failures are retried with full-jitter backoff, up to ``LLMSTREAM_MAX_ATTEMPTS``.
6. **Cost** at the tier that served (:class:`processors.tiers.TierCosts`). A flex request's calls
   go at flex until flex stays busy, then at standard (:mod:`processors.flex`).

A ``stream: true`` request brings an :class:`~processors.streaming.AnswerStream`: each call
streams into it, its chunks numbered by the call (as ``attempts`` counts); a cache hit is one chunk.

No attempt starts without the request's :class:`CallGate` (the worker's dedup store) saying so,
just before the call: a worker whose lease lapsed or whose request was taken over does not call.

Waits (for budget, a pause or a circuit) give the request's in-flight slot back
(:mod:`processors.backpressure`); they never count as retries, and the request's dedup claim
stays alive through the worker's heartbeat. The deadline (``deadline_ms``) bounds everything; a
request without one gets ``LLMSTREAM_MAX_QUEUE_S`` from when traffic control takes it, and fails as
``provider_unavailable`` (not ``expired``: that is the client's own deadline) when it passes, so
an unreachable provider or a circuit that keeps reopening never holds a request forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import AnyRedis
from llmstream.processors.adaptive import AdaptiveControl
from llmstream.processors.backpressure import Stay, WaitingRoom
from llmstream.processors.cache import ResponseCache
from llmstream.processors.circuit import CircuitAdmission, CircuitBreakers, OutageWatch, is_outage
from llmstream.processors.fallbacks import candidates as fallback_candidates
from llmstream.processors.flex import FlexTier, FlexWindow, flex_busy
from llmstream.processors.metrics import TrafficMetrics, WorkerMetrics
from llmstream.processors.pricing import PriceTable, load_prices_file
from llmstream.processors.providers import Completion, Provider, ProviderError, ProviderRouter
from llmstream.processors.ratelimit import Grant, Lane, RateLimiter, estimate_tokens
from llmstream.processors.retry import Charge, RetriesExhausted, call_with_retries, expired
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.streaming import AnswerStream, StreamMetrics
from llmstream.processors.tiers import ServedTier, TierCosts
from llmstream.schemas.models import LLMRequest

__all__ = ["CallGate", "TrafficControl", "TrafficProgress"]

log = logging.getLogger(__name__)

# Errors after which a fallback is worth trying: everything but a request that is itself wrong,
# or one whose deadline (its own, or LLMSTREAM_MAX_QUEUE_S) passed.
_NO_FALLBACK = ("invalid_request", "expired", "provider_unavailable")


class CallGate(Protocol):
    """Asked just before each provider attempt (see :class:`processors.dedup.DedupStore`)."""

    async def before_call(self, request_id: str) -> int:
        """Return the call's number for the request ID over every worker that held it, to let
        the call go; raise to stop the request without calling."""

    def call_over(self) -> None:
        """The attempt failed: the task holds nothing of it any more."""


@dataclass
class TrafficProgress:
    """What one request's traffic went through, readable whether it succeeded or not."""

    attempts: int = 0
    waited_s: float = 0.0
    cost_usd: float | None = None
    cached: bool = False
    last_error: ProviderError | None = None
    service_tier: ServedTier = "standard"  # the tier of the last answer (or the one asked)
    flex: FlexWindow | None = None


class _CircuitOpen(Exception):
    """The model's circuit is open and the request has a next candidate: fall back."""


@dataclass
class _ModelCalls:
    """One request's calls to one candidate model, and what the next call needs to know."""

    request: LLMRequest
    provider: Provider
    model: str
    has_next: bool
    lane: Lane | None
    tokens: int
    progress: TrafficProgress
    stay: Stay
    # The request's deadline_ms, or the LLMSTREAM_MAX_QUEUE_S bound when it has none.
    deadline_ms: int
    gate: CallGate | None = None
    chunks: AnswerStream | None = None  # the request streams: each call's deltas go here
    probe: bool = False
    grant: Grant | None = None
    sent_at_ms: float = 0.0
    # After this request's own 429, waiting out the pause is its retry's wait: provider time
    # (latency_ms), as a retry's backoff is, not time waiting for others' budget.
    retrying: bool = False


class TrafficControl:
    """Traffic control for every request of one worker process, composed of the parts passed
    in; :meth:`from_settings` builds a worker's. The retry policy is the settings' own
    (:class:`WorkerSettings` is a :class:`~llmstream.processors.retry.RetryPolicy`)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        router: ProviderRouter,
        metrics: WorkerMetrics,
        room: WaitingRoom,
        adaptive: AdaptiveControl,
        limiter: RateLimiter,
        circuits: CircuitBreakers | None,
        cache: ResponseCache,
        prices: PriceTable,
        outages: OutageWatch | None = None,
        rng: random.Random | None = None,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._settings = settings
        self._router = router
        self._retries = metrics.retries
        self.metrics = TrafficMetrics(metrics.registry, model_label=metrics.model_label)
        self.stream_metrics = StreamMetrics(metrics.registry)
        self.room = room
        self.adaptive = adaptive
        self.limiter = limiter
        self.circuits = circuits
        self.cache = cache
        self.costs = TierCosts(prices, self.metrics, metrics.registry)
        # Which provider/models keep failing here (for the worker's /ready).
        self.outages = outages or OutageWatch()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._now_ms = now_ms
        self.flex = FlexTier(
            metrics.registry, params=settings, policy=settings, rng=self._rng, now_ms=now_ms
        )
        self._providers_seen: set[str] = set()

    @classmethod
    def from_settings(
        cls,
        settings: WorkerSettings,
        *,
        redis: AnyRedis,
        router: ProviderRouter,
        metrics: WorkerMetrics,
        worker_token: str,
        rng: random.Random | None = None,
    ) -> TrafficControl:
        """A worker's traffic control: every part configured from ``settings``, state in
        ``redis`` under the settings' key prefix."""
        s = settings
        prefix = s.redis_key_prefix
        adaptive = AdaptiveControl(
            redis,
            key_prefix=prefix,
            params=s,
            provider_rpm={
                name: limit.rpm
                for name, limit in s.rate_limits.items()
                if "/" not in name and limit.rpm
            },
        )
        circuits = None
        if s.circuit_breaker:
            circuits = CircuitBreakers(
                redis,
                key_prefix=prefix,
                worker_token=worker_token,
                params=s,
                sync_s=s.traffic_sync_s,
            )
        prices = load_prices_file(s.prices_file) if s.prices_file else {}
        return cls(
            s,
            router=router,
            metrics=metrics,
            room=WaitingRoom(s.max_waiting),
            adaptive=adaptive,
            limiter=RateLimiter(
                redis,
                key_prefix=prefix,
                limits=s.rate_limits,
                client_quotas=s.client_quotas,
                adaptive=adaptive,
                margin=s.rate_limit_margin,
                horizon_s=s.rate_limit_horizon_s,
            ),
            circuits=circuits,
            cache=ResponseCache(redis, key_prefix=prefix, ttl_s=s.cache_ttl_s),
            prices=PriceTable({**prices, **s.prices}),
            rng=rng,
        )

    # -- the background sync ----------------------------------------------------------------

    async def run(self) -> None:
        """Every ``traffic_sync_s``: flush circuit counts, read circuits, pauses and factors
        that other workers changed. Runs until cancelled."""
        while True:
            await asyncio.sleep(self._settings.traffic_sync_s)
            try:
                await self.sync()
            except (RedisError, OSError) as exc:
                log.warning("traffic state not synchronised (%s)", exc)

    async def sync(self) -> None:
        if self.circuits is not None:
            await self.circuits.sync()
            for (provider, model), is_open in self.circuits.open_circuits().items():
                self.metrics.circuit_open.labels(provider, self.metrics.model_label(model)).set(
                    1 if is_open else 0
                )
        await self.adaptive.refresh(self._providers_seen)
        for provider, factor in self.adaptive.factors.items():
            self.metrics.adaptive_factor.labels(provider).set(factor)

    # -- one request ------------------------------------------------------------------------

    async def complete(
        self,
        request: LLMRequest,
        provider: Provider,
        model: str,
        progress: TrafficProgress,
        gate: CallGate | None = None,
        chunks: AnswerStream | None = None,
        tier: ServedTier | None = None,
    ) -> tuple[Completion, int]:
        """The answer to ``request`` and the number of calls made; raises ProviderError (with
        ``attempts``) when no candidate answered. ``gate`` is asked before every attempt;
        ``chunks``, for a request that streams, gets the answer as it comes. ``tier`` is the
        one chosen for it (None: chosen here); ``progress.service_tier`` says which served."""
        stay = self.room.stay()
        deadline_ms = request.deadline_ms
        if deadline_ms is None:
            deadline_ms = self._now_ms() + int(self._settings.max_queue_s * 1000)
        request = self.flex.begin(request, provider, tier, deadline_ms, progress)
        try:
            cache_key = self._cache_key(request, provider, model)
            if cache_key is not None:
                hit, outcome = await self.cache.get(cache_key)
                self.metrics.cache.labels(outcome).inc()
                if hit is not None:
                    progress.cached = True
                    progress.cost_usd = 0.0  # no call, nothing paid
                    if chunks is not None:
                        await chunks.whole(hit)
                    return hit, 0
            completion, by_primary = await self._first_answer(
                request, provider, model, progress, stay, deadline_ms, gate, chunks
            )
            progress.cost_usd = self.costs.cost(request, completion, progress.service_tier)
            if cache_key is not None and by_primary:
                self.metrics.cache.labels(await self.cache.put(cache_key, completion)).inc()
            return completion, progress.attempts
        except asyncio.CancelledError:
            stay.abandon()
            raise
        finally:
            if stay.parked:
                await stay.resume()
            if progress.waited_s > 0:
                self.metrics.rate_limit_wait.labels(provider.name).observe(progress.waited_s)

    def _cache_key(self, request: LLMRequest, provider: Provider, model: str) -> str | None:
        """Where the request's answer is cached; None when it is not to be."""
        if request.cache or (self._settings.cache_temperature_zero and request.temperature == 0):
            return self.cache.key(request, provider.name, model)
        return None

    async def _first_answer(
        self,
        request: LLMRequest,
        provider: Provider,
        model: str,
        progress: TrafficProgress,
        stay: Stay,
        deadline_ms: int,
        gate: CallGate | None,
        chunks: AnswerStream | None,
    ) -> tuple[Completion, bool]:
        """The answer of the first candidate model that gives one, and whether that was the
        request's own model."""
        candidates = fallback_candidates(
            request, f"{provider.name}/{model}", self._settings.fallbacks
        )
        for index, (candidate, label) in enumerate(candidates):
            target = (provider, model) if index == 0 else self._resolve(candidate, label, progress)
            if target is None:
                continue  # an unknown or unconfigured fallback is skipped, not taken
            if index:
                self.metrics.fallbacks.labels(
                    self.metrics.model_label(candidates[index - 1][1]),
                    self.metrics.model_label(label),
                ).inc()
            has_next = index < len(candidates) - 1
            calls = self._model_calls(candidate, *target, has_next, progress, stay, deadline_ms)
            calls.gate, calls.chunks = gate, chunks
            try:
                return await self._call_model(calls), index == 0
            except _CircuitOpen:
                continue
            except ProviderError as exc:
                failure = exc
                if isinstance(exc, RetriesExhausted) and exc.reason == "deadline":
                    # Counted over every candidate, not only this one.
                    if request.deadline_ms is None:
                        failure = self._unavailable(label, progress)
                        self.outages.gave_up(calls.provider.name, calls.model, str(failure))
                    else:
                        failure = expired(progress.attempts, progress.last_error)
                progress.last_error = failure
                if not has_next or failure.error_type in _NO_FALLBACK:
                    failure.attempts = progress.attempts
                    if failure is exc:
                        raise
                    raise failure from exc
                log.info(
                    "%s: %s failed (%s); falling back",
                    request.request_id,
                    label,
                    failure.error_type,
                )
        error = progress.last_error or ProviderError(
            f"no candidate model of {request.model!r} could be called",
            provider=provider.name,
            error_type="provider_error",
            retryable=True,
        )
        error.attempts = progress.attempts
        raise error

    def _unavailable(self, label: str, progress: TrafficProgress) -> ProviderError:
        """The failure of a request without a deadline that got no answer within the bound."""
        last = progress.last_error
        calls = f"{progress.attempts} call{'s' if progress.attempts != 1 else ''}"
        detail = f"; last error: {last}" if last else " (none could be made)"
        return ProviderError(
            f"no answer from {label} within LLMSTREAM_MAX_QUEUE_S "
            f"({self._settings.max_queue_s:g} s) after {calls}{detail}",
            provider=last.provider if last else label.partition("/")[0],
            error_type="provider_unavailable",
            # The same request may well succeed once the provider is back (replay it).
            retryable=True,
            status_code=last.status_code if last else None,
        )

    def _resolve(
        self, candidate: LLMRequest, label: str, progress: TrafficProgress
    ) -> tuple[Provider, str] | None:
        try:
            return self._router.resolve(candidate)
        except ProviderError as exc:
            log.warning("fallback %s of %s skipped: %s", label, candidate.request_id, exc)
            progress.last_error = progress.last_error or exc
            return None

    def _model_calls(
        self,
        request: LLMRequest,
        provider: Provider,
        model: str,
        has_next: bool,
        progress: TrafficProgress,
        stay: Stay,
        deadline_ms: int,
    ) -> _ModelCalls:
        self._providers_seen.add(provider.name)
        lane = None
        if self.limiter.enabled:
            lane = self.limiter.lane(provider.name, model, request.client_id)
        tokens = 0
        if lane is not None and lane.counts_tokens:
            tokens = estimate_tokens(request, self._settings.tpm_default_completion_tokens)
        return _ModelCalls(
            request, provider, model, has_next, lane, tokens, progress, stay, deadline_ms
        )

    async def _call_model(self, calls: _ModelCalls) -> Completion:
        """Calls to one model until it answers, or fails for good (ProviderError), or its
        circuit is open and there is a next candidate (_CircuitOpen)."""
        name = calls.provider.name

        def on_retry(attempt: int, delay: float, error: ProviderError) -> None:
            self._retries.labels(name, error.error_type).inc()

        completion, _ = await call_with_retries(
            lambda: self._attempt(calls),
            self._settings,
            deadline_ms=calls.deadline_ms,
            rng=self._rng,
            now_ms=self._now_ms,
            on_retry=on_retry,
            charge=lambda error: self._charge(calls, error),
        )
        return completion

    async def _attempt(self, calls: _ModelCalls) -> Completion:
        """One call, once the circuit, a pause and the rate budget let it go."""
        if self._clear_to_call(calls):
            calls.probe, calls.grant = False, None
        else:
            await self._admit(calls)
        if calls.stay.parked:
            await calls.stay.resume()
        number = calls.progress.attempts + 1
        if calls.gate is not None:
            # After every wait, right before the call: a lapsed lease or a takeover stops it.
            # Its number goes on from a dead previous owner's calls: chunks stay told apart.
            number = max(number, await calls.gate.before_call(calls.request.request_id))
        calls.retrying = False
        calls.progress.attempts = number
        name = calls.provider.name
        grant = calls.grant
        calls.sent_at_ms = grant.send_at_ms if grant is not None else float(self._now_ms())
        try:
            if calls.chunks is None:
                completion = await calls.provider.complete(calls.request, calls.model)
            else:
                on_delta = calls.chunks.attempt(calls.progress.attempts, name, calls.model)
                completion = await calls.provider.stream(calls.request, calls.model, on_delta)
        except BaseException as error:
            # A failed call, or one cut off by the deadline or a shutdown: no tokens were used,
            # so the estimate reserved in the shared token budget goes back.
            if calls.gate is not None:
                calls.gate.call_over()
            if isinstance(error, ProviderError):
                calls.progress.last_error = error
            if grant is not None and grant.tokens:
                await self.limiter.correct(grant, 0)
            raise
        await self._succeeded(calls, completion)
        return completion

    def _clear_to_call(self, calls: _ModelCalls) -> bool:
        """Whether a call may go at once, as :meth:`_admit` would let it without waiting or
        asking Redis: no rate lane, the circuit closed as last seen here, no pause."""
        if calls.lane is not None:
            return False
        name = calls.provider.name
        if self.circuits is not None and not self.circuits.closed_here(name, calls.model):
            return False
        return self.adaptive.pause_remaining(name) <= 0

    async def _admit(self, calls: _ModelCalls) -> None:
        """Wait until the circuit, the provider's pause and the rate budget let a call go."""
        name, model, progress = calls.provider.name, calls.model, calls.progress
        while True:
            calls.probe = False
            calls.grant = None
            if self.circuits is not None:
                admission, remaining = await self.circuits.admit(name, model)
                if admission is CircuitAdmission.OPEN:
                    self.outages.failed(name, model)
                    if calls.has_next:
                        raise _CircuitOpen
                    self.metrics.rate_limited.labels(name, "circuit").inc()
                    calls.stay.park()
                    try:
                        wait = self.circuits.wait(name, model, remaining)
                        await self._waiting(calls, wait, True)
                    finally:
                        self.outages.failed(name, model)  # still waiting: still down
                    continue
                calls.probe = admission is CircuitAdmission.PROBE
            pause = self.adaptive.pause_remaining(name)
            if calls.lane is None:
                if pause <= 0:
                    return
                self.metrics.rate_limited.labels(name, "pause").inc()
                calls.stay.park()
                await self._waiting(calls, asyncio.sleep(pause), not calls.retrying)
                continue
            # With a lane, the limiter's script holds the call through a pause.
            grant, waited_for = await self.limiter.acquire(
                calls.lane, calls.tokens, deadline_ms=calls.deadline_ms, stay=calls.stay
            )
            if waited_for is not None:
                self.metrics.rate_limited.labels(name, waited_for).inc()
            if grant is None:
                raise expired(progress.attempts, progress.last_error)
            if not calls.retrying:
                progress.waited_s += grant.waited_s
            if self.adaptive.pause_remaining(name) <= 0:
                calls.grant = grant
                return
            # Paused (a 429 elsewhere) while this call waited for its slot: ask again.

    async def _waiting(self, calls: _ModelCalls, wait: Awaitable[object], counted: bool) -> None:
        """Wait; with ``counted``, the time is waiting (not provider time), even if cut short."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await wait
        finally:
            if counted:
                calls.progress.waited_s += loop.time() - started

    async def _charge(self, calls: _ModelCalls, error: ProviderError) -> Charge:
        """What a failed call costs the request: the one place that decides that a 429 and a
        failure that leaves the circuit open spend no retry budget."""
        name, model = calls.provider.name, calls.model
        if flex_busy(calls, error):  # flex short of capacity: wait for it or go standard, for free
            return await self.flex.busy(calls, error)
        if error.error_type == "rate_limited" and error.retryable:
            calls.retrying = True
            await self._report_429(calls, error)
            return Charge.RATE_LIMITED
        if is_outage(error):
            self.outages.failed(name, model, error)
        if self.circuits is not None and is_outage(error):
            is_open, event = await self.circuits.record_failure(name, model, probe=calls.probe)
            if event:
                self._count_transition(name, model, event)
                log.warning("circuit %s/%s %s after: %s", name, model, event, error)
            if is_open:
                return Charge.FREE  # wait for the circuit or fall back
        return Charge.RETRY

    async def _succeeded(self, calls: _ModelCalls, completion: Completion) -> None:
        name, model = calls.provider.name, calls.model
        calls.progress.service_tier = self.flex.served(calls.request, calls.provider)
        self.outages.succeeded(name, model)
        if self.circuits is not None:
            if calls.probe:
                await self.circuits.record_probe_success(name, model)
                self._count_transition(name, model, "closed")
                log.info("circuit %s/%s closed: the probe succeeded", name, model)
            else:
                self.circuits.record_success(name, model)
        if calls.grant is not None and calls.grant.tokens:
            await self.limiter.correct(calls.grant, completion.total_tokens)

    def _count_transition(self, provider: str, model: str, transition: str) -> None:
        self.metrics.circuit_transitions.labels(
            provider, self.metrics.model_label(model), transition
        ).inc()

    async def _report_429(self, calls: _ModelCalls, error: ProviderError) -> None:
        provider = calls.provider.name
        self.metrics.rate_limited.labels(provider, "upstream_429").inc()
        grant = calls.grant
        try:
            feedback = await self.adaptive.report_429(
                provider,
                sent_at_ms=calls.sent_at_ms,
                decided_at_ms=grant.decided_at_ms if grant is not None else calls.sent_at_ms,
                retry_after_s=error.retry_after,
            )
        except RedisError as exc:
            # Not shared, but still honoured here: wait as the provider asked before calling.
            log.warning("429 from %s not recorded (%s)", provider, exc)
            await asyncio.sleep(min(error.retry_after or 1.0, self._settings.max_retry_after_s))
            return
        self.metrics.adaptive_factor.labels(provider).set(feedback.factor)
        if feedback.decreased:
            log.info(
                "%s answered 429: rate factor %.3f, paused %.2f s",
                provider,
                feedback.factor,
                feedback.pause_s,
            )
