"""The flex tier on the synchronous path: a request sent with ``"service_tier": "flex"`` (OpenAI's
flex processing, at batch prices), retried while flex is busy, then sent as standard.

Traffic control (:meth:`TrafficControl.complete <processors.traffic.TrafficControl.complete>`)
asks :meth:`FlexTier.begin` which tier a request's calls go at: the tier it is given, or else
:func:`~processors.tiers.choose_tier`'s for the request (without batch: traffic control calls
synchronously). A provider without flex (Anthropic) serves it as standard.

Flex answers a 429 ``resource_unavailable`` when it is short of capacity
(:class:`~processors.providers.http.CapacityUnavailable`). That says nothing about the account's
limits, so the provider is neither paused nor slowed (as for other 429s) and no retry budget is
spent: the request waits, with full-jitter backoff on the retry policy's delays
(``LLMSTREAM_RETRY_BASE_DELAY_S`` doubling up to ``LLMSTREAM_RETRY_MAX_DELAY_S``; a
``Retry-After`` is a floor), and calls flex again, as long as

- the wait ends before the request's *flex cut-off*: half-way from when traffic control took it to
  its deadline (its ``deadline_ms``, else ``LLMSTREAM_MAX_QUEUE_S`` from then), so the other half
  is left for a standard call and its own retries; and
- flex has been busy fewer than ``LLMSTREAM_MAX_RATE_LIMITED_ATTEMPTS`` times for it.

Then the next call goes at once, as standard (without ``service_tier``), through the same retry
loop, fallbacks and circuits as any call. The response says which tier served it
(``service_tier``: ``"flex"`` or ``"standard"``), and is priced at that tier.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.backpressure import Stay
from llmstream.processors.providers import Provider, ProviderError
from llmstream.processors.providers.http import CapacityUnavailable
from llmstream.processors.retry import Charge, RetryPolicy
from llmstream.processors.tiers import ServedTier, TierParams, choose_tier, flex_capable
from llmstream.schemas.models import LLMRequest

__all__ = ["FlexTier", "FlexWindow", "flex_busy"]


@dataclass
class FlexWindow:
    """One request's time on flex: until when it may wait for flex, and how often flex was busy."""

    until_ms: int
    busy: int = 0


class _Progress(Protocol):
    """What flex reads and sets of a request's traffic progress."""

    waited_s: float
    service_tier: ServedTier
    flex: FlexWindow | None


class _Calls(Protocol):
    """What flex reads and sets of one request's calls to one model (in traffic control)."""

    request: LLMRequest
    provider: Provider
    stay: Stay

    @property
    def progress(self) -> _Progress: ...


def flex_busy(calls: _Calls, error: ProviderError) -> bool:
    """Whether ``error`` says flex is short of capacity for a flex call (not the account's
    limit). The same answer to a standard call is any 429: bounded, and slowing the provider."""
    return isinstance(error, CapacityUnavailable) and calls.request.service_tier == "flex"


class FlexTier:
    """The flex tier for every request of one worker process."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        params: TierParams,
        policy: RetryPolicy,
        rng: random.Random,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._params = params
        self._policy = policy
        self._rng = rng
        self._now_ms = now_ms
        self.busy_total = Counter(
            "llmstream_flex_busy_total",
            "Flex calls answered 429 resource_unavailable (flex short of capacity)",
            ["provider"],
            registry=registry,
        )
        self.fell_back = Counter(
            "llmstream_flex_fallbacks_total",
            "Flex requests sent as standard after flex stayed busy",
            ["provider"],
            registry=registry,
        )

    def begin(
        self,
        request: LLMRequest,
        provider: Provider,
        tier: ServedTier | None,
        deadline_ms: int,
        progress: _Progress,
    ) -> LLMRequest:
        """The request as its calls send it (``service_tier`` "flex" exactly when they go at
        flex); ``progress`` gets the tier they go at and the flex window (None at standard)."""
        now = self._now_ms()
        if tier is None:
            tier = choose_tier(
                request,
                now_ms=now,
                params=self._params,
                batch_capable=False,
                flex_capable=flex_capable(provider),
            )
        if tier == "batch" or (tier == "flex" and not flex_capable(provider)):
            tier = "standard"
        if (request.service_tier == "flex") != (tier == "flex"):
            request = request.model_copy(update={"service_tier": tier})
        progress.service_tier = tier
        progress.flex = FlexWindow(now + max(0, deadline_ms - now) // 2) if tier == "flex" else None
        return request

    async def busy(self, calls: _Calls, error: ProviderError) -> Charge:
        """After flex answered busy: wait and leave the next call at flex, or make it a
        standard one at once. Either way the failure costs the request nothing."""
        provider, window = calls.provider.name, calls.progress.flex
        self.busy_total.labels(provider).inc()
        if window is not None:
            window.busy += 1
            delay = self._policy.next_delay(window.busy, error, self._rng)
            if (
                window.busy < self._policy.max_rate_limited_attempts
                and self._now_ms() + delay * 1000 < window.until_ms
            ):
                loop = asyncio.get_running_loop()
                started = loop.time()
                calls.stay.park()  # the in-flight slot goes to a request that can call now
                try:
                    await asyncio.sleep(delay)
                finally:
                    calls.progress.waited_s += loop.time() - started
                return Charge.FREE
        self.fell_back.labels(provider).inc()
        calls.request = calls.request.model_copy(update={"service_tier": "standard"})
        return Charge.FREE

    @staticmethod
    def served(request: LLMRequest, provider: Provider) -> ServedTier:
        """The tier a call of ``request`` to ``provider`` went at."""
        return "flex" if request.service_tier == "flex" and flex_capable(provider) else "standard"
