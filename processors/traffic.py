"""Traffic control around one request's provider calls: cache, fallbacks, circuit breaking, shared
rate limits, adaptive rate on 429, retries and cost.

:meth:`TrafficControl.complete` replaces a bare retry loop in the pipeline, between the claim and
the settle. For one request:

1. **Cache.** With ``cache: true`` (or ``LLMSTREAM_CACHE_TEMPERATURE_ZERO`` and temperature 0), an
   identical earlier answer is returned without a call (:mod:`llmstream.processors.cache`).
2. **Candidates.** The request's model, then its ``fallbacks`` (or the configured defaults for its
   model, ``LLMSTREAM_FALLBACKS``), in order. The next one is tried when a model fails with
   anything but ``invalid_request`` (the request itself is wrong) or ``expired``, or when its
   circuit is open. The response names the model that answered; ``attempts`` counts every call.
3. For each call: **circuit** (open: go to the next candidate, or wait for the circuit to close
   when there is none), **rate budget** (wait; :mod:`processors.ratelimit`), then the call.
4. **429** after the limiter let the call through: the provider pauses for ``Retry-After``
   (every worker), its rate factor decreases (:mod:`processors.adaptive`), and the request waits
   and calls again. That does not spend its retry budget: a 429 here says the provider is at
   capacity, not that the request fails; ``LLMSTREAM_MAX_RATE_LIMITED_ATTEMPTS`` bounds it.
5. **5xx / timeout / broken connection**: reported to the circuit. A failure after which the
   circuit is open spends no retry budget either: the request waits for the circuit or falls
   back, so no request fails for lack of retries while its provider is known to be down. Other
   retryable failures are retried with full-jitter backoff, up to ``LLMSTREAM_MAX_ATTEMPTS``.
6. **Cost** from the price table (:mod:`processors.pricing`), counted per provider, model, client.

Waits (for budget, a pause or a circuit) give the request's in-flight slot back
(:mod:`processors.backpressure`); they never count as retries, and the request's dedup claim
stays alive through the worker's heartbeat. The deadline (``deadline_ms``) bounds everything.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.adaptive import AdaptiveControl, AdaptiveParams
from llmstream.processors.backpressure import Stay, WaitingRoom
from llmstream.processors.cache import ResponseCache
from llmstream.processors.circuit import Admission, CircuitBreakers, CircuitParams, is_outage
from llmstream.processors.metrics import TrafficMetrics, WorkerMetrics
from llmstream.processors.pricing import PriceTable, load_prices_file
from llmstream.processors.providers import Completion, Provider, ProviderError, ProviderRouter
from llmstream.processors.ratelimit import Grant, RateLimiter, estimate_tokens
from llmstream.processors.retry import RetriesExhausted, RetryPolicy
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.models import LLMRequest

__all__ = ["TrafficControl", "TrafficProgress"]

log = logging.getLogger(__name__)

# Errors after which a fallback is worth trying: everything but a request that is itself wrong,
# or one whose deadline passed.
_NO_FALLBACK = ("invalid_request", "expired")


@dataclass
class TrafficProgress:
    """What one request's traffic went through, readable whether it succeeded or not."""

    attempts: int = 0
    waited_s: float = 0.0
    cost_usd: float | None = None
    cached: bool = False
    last_error: ProviderError | None = None


class TrafficControl:
    """Traffic control for every request of one worker process."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        redis: aioredis.Redis,
        router: ProviderRouter,
        metrics: WorkerMetrics,
        worker_token: str,
        rng: random.Random | None = None,
    ) -> None:
        s = settings
        self._settings = s
        self._router = router
        self._worker_metrics = metrics
        self.metrics = TrafficMetrics(metrics.registry, model_label=metrics.model_label)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.room = WaitingRoom(s.max_waiting)
        provider_rpm = {
            name: limit.rpm
            for name, limit in s.rate_limits.items()
            if "/" not in name and limit.rpm
        }
        self.adaptive = AdaptiveControl(
            redis,
            key_prefix=s.redis_key_prefix,
            params=AdaptiveParams(
                window_s=s.adaptive_window_s,
                min_factor=s.adaptive_min_factor,
                recovery_per_min=s.adaptive_recovery_per_min,
                default_pause_s=s.rate_limit_default_pause_s,
                max_pause_s=s.max_retry_after_s,
            ),
            provider_rpm=provider_rpm,
        )
        self.limiter = RateLimiter(
            redis,
            key_prefix=s.redis_key_prefix,
            limits=s.rate_limits,
            client_quotas=s.client_quotas,
            adaptive=self.adaptive,
            margin=s.rate_limit_margin,
            horizon_s=s.rate_limit_horizon_s,
        )
        self.circuits = (
            CircuitBreakers(
                redis,
                key_prefix=s.redis_key_prefix,
                worker_token=worker_token,
                params=CircuitParams(
                    window_s=s.circuit_window_s,
                    min_failures=s.circuit_min_failures,
                    failure_ratio=s.circuit_failure_ratio,
                    cooldown_s=s.circuit_cooldown_s,
                    probe_lease_s=s.circuit_probe_lease_s,
                    sync_s=s.traffic_sync_s,
                ),
            )
            if s.circuit_breaker
            else None
        )
        self.cache = ResponseCache(redis, key_prefix=s.redis_key_prefix, ttl_s=s.cache_ttl_s)
        prices = load_prices_file(s.prices_file) if s.prices_file else {}
        self.prices = PriceTable({**prices, **s.prices})
        self._policy = RetryPolicy(
            max_attempts=s.max_attempts,
            base_delay_s=s.retry_base_delay_s,
            max_delay_s=s.retry_max_delay_s,
            max_retry_after_s=s.max_retry_after_s,
        )
        self._providers_seen: set[str] = set()

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
        self, request: LLMRequest, provider: Provider, model: str, progress: TrafficProgress
    ) -> tuple[Completion, int]:
        """The answer to ``request`` and the number of calls made; raises ProviderError (with
        ``attempts``) when no candidate answered."""
        stay = self.room.stay()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await self._complete(request, provider, model, progress, stay)
        except asyncio.CancelledError:
            stay.abandon()
            raise
        finally:
            await stay.resume()
            if progress.waited_s > 0:
                self.metrics.rate_limit_wait.labels(provider.name).observe(progress.waited_s)
            log.debug("%s: %.3f s in traffic control", request.request_id, loop.time() - started)

    async def _complete(
        self,
        request: LLMRequest,
        provider: Provider,
        model: str,
        progress: TrafficProgress,
        stay: Stay,
    ) -> tuple[Completion, int]:
        cache_key = None
        if request.cache or (self._settings.cache_temperature_zero and request.temperature == 0):
            cache_key = self.cache.key(request, provider.name, model)
            hit, outcome = await self.cache.get(cache_key)
            self.metrics.cache.labels(outcome).inc()
            if hit is not None:
                progress.cached = True
                progress.cost_usd = 0.0  # no call, nothing paid
                return hit, 0
        candidates = self._candidates(request, f"{provider.name}/{model}")
        previous = ""
        for index, (candidate, label) in enumerate(candidates):
            if previous:
                self.metrics.fallbacks.labels(
                    self.metrics.model_label(previous), self.metrics.model_label(label)
                ).inc()
            previous = label
            if index == 0:
                target, target_model = provider, model
            else:
                try:
                    target, target_model = self._router.resolve(candidate)
                except ProviderError as exc:
                    log.warning("fallback %s of %s skipped: %s", label, request.request_id, exc)
                    progress.last_error = progress.last_error or exc
                    continue
            has_next = index < len(candidates) - 1
            try:
                completion = await self._call_model(
                    candidate, target, target_model, has_next, progress, stay
                )
            except ProviderError as exc:
                progress.last_error = exc
                if not has_next or exc.error_type in _NO_FALLBACK:
                    exc.attempts = progress.attempts
                    raise
                log.info(
                    "%s: %s failed (%s); falling back", request.request_id, label, exc.error_type
                )
                continue
            if completion is None:  # circuit open: next candidate
                continue
            progress.cost_usd = self._charge(request, completion)
            if cache_key is not None and index == 0:
                self.metrics.cache.labels(await self.cache.put(cache_key, completion)).inc()
            return completion, progress.attempts
        error = progress.last_error or ProviderError(
            f"no candidate model of {request.model!r} could be called",
            provider=provider.name,
            error_type="provider_error",
            retryable=True,
        )
        error.attempts = progress.attempts
        raise error

    async def _call_model(
        self,
        request: LLMRequest,
        provider: Provider,
        model: str,
        has_next: bool,
        progress: TrafficProgress,
        stay: Stay,
    ) -> Completion | None:
        """Calls to one model until it answers (the completion), its circuit is open and there
        is a next candidate (None), or it fails for good (ProviderError)."""
        loop = asyncio.get_running_loop()
        settings = self._settings
        name = provider.name
        self._providers_seen.add(name)
        lane = self.limiter.lane(name, model, request.client_id) if self.limiter.enabled else None
        tokens = 0
        if lane is not None and lane.counts_tokens:
            tokens = estimate_tokens(request, settings.tpm_default_completion_tokens)
        deadline_ms = request.deadline_ms
        counted = 0  # failures that spend the retry budget
        limited = 0  # 429s answered after the limiter let the call through
        # After this request's own 429, waiting out the pause is its retry's wait: provider
        # time (latency_ms), as a retry's backoff is, not time waiting for others' budget.
        retrying = False
        while True:
            if deadline_ms is not None and wall_clock_ms() >= deadline_ms:
                raise self._expired(progress)
            probe = False
            if self.circuits is not None:
                admission, remaining = await self.circuits.admit(name, model)
                if admission is Admission.OPEN:
                    if has_next:
                        return None
                    self.metrics.rate_limited.labels(name, "circuit").inc()
                    stay.park()
                    t0 = loop.time()
                    await self.circuits.wait(
                        name, model, min(remaining, self._until_deadline(deadline_ms))
                    )
                    progress.waited_s += loop.time() - t0
                    continue
                probe = admission is Admission.PROBE
            pause = self.adaptive.pause_remaining(name)
            if pause > 0 and lane is None:  # with a lane, the limiter's script holds the call
                self.metrics.rate_limited.labels(name, "pause").inc()
                stay.park()
                t0 = loop.time()
                await asyncio.sleep(min(pause, self._until_deadline(deadline_ms)))
                if not retrying:
                    progress.waited_s += loop.time() - t0
                continue
            grant: Grant | None = None
            if lane is not None:
                grant, waited_for = await self.limiter.acquire(
                    lane, tokens, deadline_ms=deadline_ms, stay=stay
                )
                if waited_for is not None:
                    self.metrics.rate_limited.labels(name, waited_for).inc()
                if grant is None:
                    raise self._expired(progress)
                if not retrying:
                    progress.waited_s += grant.waited_s
                if self.adaptive.pause_remaining(name) > 0:
                    continue  # paused (a 429 elsewhere) while this call waited for its slot
            await stay.resume()
            retrying = False
            progress.attempts += 1
            sent_at_ms = grant.send_at_ms if grant is not None else float(wall_clock_ms())
            decided_at_ms = grant.decided_at_ms if grant is not None else sent_at_ms
            scope = asyncio.timeout(self._deadline_timeout(deadline_ms))
            try:
                async with scope:
                    completion = await provider.complete(request, model)
            except TimeoutError:
                if scope.expired():
                    raise self._expired(progress) from None
                raise
            except ProviderError as error:
                error.attempts = progress.attempts
                progress.last_error = error
                if grant is not None and grant.tokens:
                    await self.limiter.correct(grant, 0)
                if error.error_type == "rate_limited" and error.retryable:
                    limited += 1
                    retrying = True
                    await self._rate_limited(name, error, sent_at_ms, decided_at_ms)
                    if limited >= settings.max_rate_limited_attempts:
                        raise RetriesExhausted(
                            f"{name}: still rate limited after {limited} calls: {error}",
                            reason="max_attempts",
                            last_error=error,
                            attempts=progress.attempts,
                        ) from error
                    continue
                if self.circuits is not None and is_outage(error):
                    is_open, event = await self.circuits.record_failure(name, model, probe=probe)
                    if event:
                        self.metrics.circuit_transitions.labels(
                            name, self.metrics.model_label(model), event
                        ).inc()
                        log.warning("circuit %s/%s %s after: %s", name, model, event, error)
                    if is_open:
                        self._worker_metrics.retries.labels(name, error.error_type).inc()
                        continue  # wait for the circuit or fall back; no retry budget spent
                if not error.retryable:
                    raise
                counted += 1
                if counted >= settings.max_attempts:
                    raise RetriesExhausted(
                        f"gave up after {counted} attempts: {error}",
                        reason="max_attempts",
                        last_error=error,
                        attempts=progress.attempts,
                    ) from error
                delay = self._policy.next_delay(counted, error, self._rng)
                if deadline_ms is not None and wall_clock_ms() + delay * 1000 >= deadline_ms:
                    raise self._expired(progress) from error
                self._worker_metrics.retries.labels(name, error.error_type).inc()
                await asyncio.sleep(delay)
                continue
            if self.circuits is not None:
                if probe:
                    await self.circuits.record_probe_success(name, model)
                    self.metrics.circuit_transitions.labels(
                        name, self.metrics.model_label(model), "closed"
                    ).inc()
                    log.info("circuit %s/%s closed: the probe succeeded", name, model)
                else:
                    self.circuits.record_success(name, model)
            if grant is not None and grant.tokens:
                await self.limiter.correct(grant, completion.total_tokens)
            return completion

    async def _rate_limited(
        self, provider: str, error: ProviderError, sent_at_ms: float, decided_at_ms: float
    ) -> None:
        self.metrics.rate_limited.labels(provider, "upstream_429").inc()
        self._worker_metrics.retries.labels(provider, error.error_type).inc()
        try:
            feedback = await self.adaptive.report_429(
                provider,
                sent_at_ms=sent_at_ms,
                decided_at_ms=decided_at_ms,
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

    def _candidates(self, request: LLMRequest, primary: str) -> list[tuple[LLMRequest, str]]:
        """The request for each model to try, with the model's name, primary first."""
        names = list(request.fallbacks) or list(
            self._settings.fallbacks.get(request.model)
            or self._settings.fallbacks.get(primary)
            or ()
        )
        result = [(request, primary)]
        seen = {primary, request.model}
        for name in names:
            if name not in seen:
                seen.add(name)
                result.append((request.model_copy(update={"model": name, "provider": None}), name))
        return result

    def _charge(self, request: LLMRequest, completion: Completion) -> float | None:
        cost = self.prices.cost(
            completion.provider,
            completion.model,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        if cost is not None:
            self.metrics.cost.labels(
                completion.provider,
                self.metrics.model_label(completion.model),
                self.metrics.client_label(request.client_id or ""),
            ).inc(cost)
        return cost

    @staticmethod
    def _until_deadline(deadline_ms: int | None) -> float:
        if deadline_ms is None:
            return float("inf")
        return max(0.0, (deadline_ms - wall_clock_ms()) / 1000)

    @staticmethod
    def _deadline_timeout(deadline_ms: int | None) -> float | None:
        return None if deadline_ms is None else (deadline_ms - wall_clock_ms()) / 1000

    @staticmethod
    def _expired(progress: TrafficProgress) -> RetriesExhausted:
        last = progress.last_error
        detail = f"; last error: {last}" if last else ""
        return RetriesExhausted(
            f"deadline passed after {progress.attempts} attempts{detail}",
            reason="deadline",
            last_error=last,
            attempts=progress.attempts,
        )
