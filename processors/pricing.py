"""What a call cost: a price table in US dollars per million input and output tokens.

The built-in table holds list prices of common models for standard (uncached, non-batch) tokens;
the batch and flex tiers cost half of those. Configuration overrides or extends it
(``LLMSTREAM_PRICES``, ``LLMSTREAM_PRICES_FILE``), keyed by ``provider/model`` or by the bare model
name, with the tier prices optional (half the standard ones when left out)::

    {"openai/gpt-4o": {"input": 2.5, "output": 10.0},
     "my-finetune": {"input": 0.3, "output": 1.2, "batch_input": 0.2, "batch_output": 0.8}}

A model is looked up as ``provider/model``, then as the bare model, then without a date or
``-latest`` suffix (``gpt-4o-2024-08-06`` → ``gpt-4o``). A model found nowhere costs ``None``
(unknown), never a guess.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

from llmstream.core.catalog import BUILTIN_PRICES, Price, load_prices_file
from llmstream.core.once import warn_once

# The table and its configuration are read in core (the ingress lists the models it names).
__all__ = ["BUILTIN_PRICES", "Price", "PriceTable", "load_prices_file"]

log = logging.getLogger(__name__)

# gpt-4o-2024-08-06, claude-3-5-sonnet-20241022, claude-3-5-haiku-latest
_VERSION_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


_KNOWN_MODELS = 1024


class PriceTable:
    """Prices by model; ``cost()`` is None for a model it does not know."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self._prices: dict[str, Price] = {**BUILTIN_PRICES, **(overrides or {})}
        # Each answer is priced: what a (provider, model) resolved to, up to _KNOWN_MODELS of
        # them (model names come from providers' answers, so the memo is bounded).
        self._resolved: dict[tuple[str, str], Price | None] = {}

    def price(self, provider: str, model: str) -> Price | None:
        """The price of ``model`` at ``provider``, if known."""
        key = (provider, model)
        if key in self._resolved:
            return self._resolved[key]
        found = None
        for name in (f"{provider}/{model}", model):
            found = self._prices.get(name) or self._prices.get(_VERSION_SUFFIX.sub("", name))
            if found is not None:
                break
        if len(self._resolved) < _KNOWN_MODELS:
            self._resolved[key] = found
        return found

    def cost(
        self,
        provider: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        tier: str = "standard",
    ) -> float | None:
        """USD for one call served at ``tier`` ("standard", "batch" or "flex"), or None when the
        model's price is unknown, or the result is negative or not finite (a provider's bad
        counts, an infinite configured price)."""
        price = self.price(provider, model)
        if price is None:
            return None
        input_price, output_price = price.at(tier)
        cost = (prompt_tokens * input_price + completion_tokens * output_price) / 1_000_000
        if math.isfinite(cost) and cost >= 0:
            return cost
        # Only a bad count or price gets here; the answer is paid for and must not become a
        # failure because the cost counter refuses the value. Unknown, not a guess.
        warn_once(
            log,
            (provider, model),
            "cost of %s/%s came out as %r (%d prompt, %d completion tokens); reported as "
            "unknown (said once per process)",
            provider,
            model,
            cost,
            prompt_tokens,
            completion_tokens,
        )
        return None

    def standard_cost(
        self, provider: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """What the call would have cost at the standard tier (what a cheaper tier saves
        against)."""
        return self.cost(provider, model, prompt_tokens, completion_tokens, "standard")
