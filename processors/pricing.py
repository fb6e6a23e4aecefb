"""What a call cost: a price table in US dollars per million input and output tokens.

The built-in table holds list prices of common models for standard (uncached, non-batch) tokens.
Configuration overrides or extends it (``LLMSTREAM_PRICES``, ``LLMSTREAM_PRICES_FILE``), keyed by
``provider/model`` or by the bare model name::

    {"openai/gpt-4o": {"input": 2.5, "output": 10.0}, "my-finetune": {"input": 0.3, "output": 1.2}}

A model is looked up as ``provider/model``, then as the bare model, then without a date or
``-latest`` suffix (``gpt-4o-2024-08-06`` → ``gpt-4o``). A model found nowhere costs ``None``
(unknown), never a guess.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from llmstream.core.once import warn_once
from llmstream.core.settings import load_object_file

__all__ = ["BUILTIN_PRICES", "Price", "PriceTable", "load_prices_file"]


class Price(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)


# List prices per million tokens (input, output), standard tier, as published on the providers'
# pricing pages (openai.com/api/pricing, anthropic.com/pricing); checked 2025-06. Prices change:
# override them with LLMSTREAM_PRICES rather than trusting this table for invoices.
BUILTIN_PRICES: Mapping[str, Price] = {
    name: Price(input=i, output=o)
    for name, (i, o) in {
        # OpenAI
        "gpt-4o": (2.50, 10.00),
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4.1": (2.00, 8.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1-nano": (0.10, 0.40),
        "gpt-4-turbo": (10.00, 30.00),
        "gpt-3.5-turbo": (0.50, 1.50),
        "o1": (15.00, 60.00),
        "o3-mini": (1.10, 4.40),
        "o4-mini": (1.10, 4.40),
        # Anthropic
        "claude-3-5-haiku": (0.80, 4.00),
        "claude-3-5-sonnet": (3.00, 15.00),
        "claude-3-7-sonnet": (3.00, 15.00),
        "claude-sonnet-4": (3.00, 15.00),
        "claude-opus-4": (15.00, 75.00),
        "claude-3-haiku": (0.25, 1.25),
        "claude-3-opus": (15.00, 75.00),
    }.items()
}

# gpt-4o-2024-08-06, claude-3-5-sonnet-20241022, claude-3-5-haiku-latest
log = logging.getLogger(__name__)

_VERSION_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


class PriceTable:
    """Prices by model; ``cost()`` is None for a model it does not know."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self._prices: dict[str, Price] = {**BUILTIN_PRICES, **(overrides or {})}

    def price(self, provider: str, model: str) -> Price | None:
        """The price of ``model`` at ``provider``, if known."""
        for name in (f"{provider}/{model}", model):
            found = self._prices.get(name) or self._prices.get(_VERSION_SUFFIX.sub("", name))
            if found is not None:
                return found
        return None

    def cost(
        self, provider: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> float | None:
        """USD for one call, or None when the model's price is unknown, or the result is
        negative or not finite (a provider's bad counts, an infinite configured price)."""
        price = self.price(provider, model)
        if price is None:
            return None
        cost = (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
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


def load_prices_file(path: Path) -> dict[str, Price]:
    """Prices from a JSON or TOML file (by suffix) of the ``LLMSTREAM_PRICES`` shape."""
    raw = load_object_file(path, "LLMSTREAM_PRICES_FILE", "prices")
    return {name: Price.model_validate(entry) for name, entry in raw.items()}
