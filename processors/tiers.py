"""Service tiers: which one serves a request (standard, flex or batch).

A request names its tier (``service_tier``) or takes the configured default. ``auto`` picks by how
far off the deadline is: batch when it is at least ``batch_min_deadline_s`` away (a batch may take
its providers' 24 h window), flex when at least ``flex_min_deadline_s``, standard otherwise. A tier
the provider does not offer falls back to standard, and the response says which tier served it.

An answer is priced at the tier that served it (:class:`TierCosts`), and what that saved against
the standard price is counted in ``llmstream_saved_usd_total{provider, tier}``.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from llmstream.processors.metrics import TrafficMetrics
from llmstream.processors.pricing import PriceTable
from llmstream.processors.providers import Completion, Provider
from llmstream.schemas.models import LLMRequest

__all__ = ["ServedTier", "TierCosts", "TierParams", "choose_tier", "flex_capable"]

ServedTier = Literal["standard", "flex", "batch"]


class TierParams(BaseModel):
    """Tier knobs; the worker's settings derive from this class (``LLMSTREAM_DEFAULT_SERVICE_TIER``,
    ``LLMSTREAM_BATCH_MAX_REQUESTS``, ``LLMSTREAM_FLEX_MIN_DEADLINE_S``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The tier of a request that names none.
    default_service_tier: Literal["standard", "flex", "batch", "auto"] = "standard"
    # Requests per provider batch (the batch code caps it at OpenAI's 50,000, Anthropic's 100,000).
    batch_max_requests: int = Field(1000, ge=1)
    # How long a batch waits to fill before it is sent anyway.
    batch_max_wait_s: float = Field(60.0, gt=0.0)
    # "auto" sends to batch only a request whose deadline is at least this far (25 h: the
    # providers' 24 h completion window plus margin).
    batch_min_deadline_s: float = Field(90_000.0, gt=0.0)
    batch_poll_interval_s: float = Field(30.0, gt=0.0)
    # "auto" sends to flex only a request whose deadline is at least this far.
    flex_min_deadline_s: float = Field(600.0, ge=0.0)
    # What "auto" means for a request without a deadline.
    auto_tier_without_deadline: ServedTier = "standard"


def choose_tier(
    request: LLMRequest,
    *,
    now_ms: int,
    params: TierParams,
    batch_capable: bool,
    flex_capable: bool,
) -> ServedTier:
    """The tier that serves ``request`` on a provider with (or without) batch and flex."""
    asked = request.service_tier or params.default_service_tier
    tier: ServedTier
    if asked != "auto":
        tier = asked
    elif request.deadline_ms is None:
        tier = params.auto_tier_without_deadline
    else:
        left_s = (request.deadline_ms - now_ms) / 1000
        if left_s >= params.batch_min_deadline_s:
            tier = "batch"
        elif left_s >= params.flex_min_deadline_s:
            tier = "flex"
        else:
            tier = "standard"
    if (tier == "batch" and not batch_capable) or (tier == "flex" and not flex_capable):
        return "standard"
    return tier


def flex_capable(provider: Provider) -> bool:
    """Whether ``provider`` has OpenAI's flex tier (its adapter says so: the OpenAI wire format)."""
    return bool(getattr(provider, "offers_flex", False))


class TierCosts:
    """Prices answers at the tier that served them, counting the cost by provider, model and
    client (``llmstream_cost_usd_total``) and what a cheaper tier saved against the standard
    price (``llmstream_saved_usd_total{provider, tier}``)."""

    def __init__(
        self, prices: PriceTable, metrics: TrafficMetrics, registry: CollectorRegistry
    ) -> None:
        self.prices = prices
        self._metrics = metrics
        self.saved = Counter(
            "llmstream_saved_usd_total",
            "USD saved against standard prices by answers served at a cheaper tier",
            ["provider", "tier"],
            registry=registry,
        )

    def cost(self, request: LLMRequest, completion: Completion, tier: str) -> float | None:
        """What ``completion`` cost at ``tier``, counted; None when its model's price is
        unknown."""
        provider, model = completion.provider, completion.model
        tokens = completion.prompt_tokens, completion.completion_tokens
        cost = self.prices.cost(provider, model, *tokens, tier)
        if cost is None:
            return None
        metrics = self._metrics
        client = metrics.client_label(request.client_id or "")
        metrics.cost.labels(provider, metrics.model_label(model), client).inc(cost)
        if tier != "standard":
            standard = self.prices.standard_cost(provider, model, *tokens)
            if standard is not None and standard > cost:
                self.saved.labels(provider, tier).inc(standard - cost)
        return cost
