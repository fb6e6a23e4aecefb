"""The models a deployment knows by configuration, and the built-in price table.

The worker prices calls with :data:`BUILTIN_PRICES` overridden by ``LLMSTREAM_PRICES`` /
``LLMSTREAM_PRICES_FILE`` (:mod:`llmstream.processors.pricing`); the ingress lists models
(``GET /v1/models``). Both read the same configuration through :class:`CatalogParams`, which a
deployable's settings derive from, so the names the ingress lists are the ones the worker is
configured with, when both are given the same variables.

:meth:`Catalog.from_settings` collects the ``provider/model`` names found in:

- the built-in price table (its models, under the provider that publishes the price);
- ``LLMSTREAM_PRICES`` and ``LLMSTREAM_PRICES_FILE``: keys written ``provider/model`` (a bare
  model name says no provider, so it is not listed);
- ``LLMSTREAM_FALLBACKS``: every model a fallback is configured for, and every fallback;
- ``LLMSTREAM_RATE_LIMITS``: keys written ``provider/model`` (a provider's own limit names none);
- ``LLMSTREAM_PROVIDERS`` and ``LLMSTREAM_PROVIDERS_FILE``: each endpoint's ``models``, when it
  lists them. Only the names are read here; credentials in those entries are dropped unread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmstream.core.settings import load_object_file

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PRICES",
    "TIER_PRICE_SHARE",
    "Catalog",
    "CatalogParams",
    "KnownModel",
    "Price",
    "load_prices_file",
]


# What the batch and flex tiers charge when a price names no tier price of its own: OpenAI's
# Batch API and flex tier and Anthropic's Message Batches all charge half the standard price.
TIER_PRICE_SHARE = 0.5


class Price(BaseModel):
    """USD per million tokens at the standard tier (``input``, ``output``) and at the batch and
    flex tiers (``batch_input``, ...; half the standard price when not given, see
    :data:`TIER_PRICE_SHARE`). A tier serves a request only where its provider offers it, so a
    provider's price for a tier it lacks is never used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    batch_input: float | None = Field(None, ge=0)
    batch_output: float | None = Field(None, ge=0)
    flex_input: float | None = Field(None, ge=0)
    flex_output: float | None = Field(None, ge=0)

    def at(self, tier: str) -> tuple[float, float]:
        """``(input, output)`` per million tokens at ``tier`` ("standard", "batch", "flex")."""
        if tier not in ("batch", "flex"):
            return self.input, self.output
        given_input, given_output = (
            (self.batch_input, self.batch_output)
            if tier == "batch"
            else (self.flex_input, self.flex_output)
        )
        return (
            self.input * TIER_PRICE_SHARE if given_input is None else given_input,
            self.output * TIER_PRICE_SHARE if given_output is None else given_output,
        )


# List prices per million tokens (input, output), standard tier, as published on the providers'
# pricing pages (openai.com/api/pricing, anthropic.com/pricing); checked 2025-06. Their batch and
# flex prices are half these (TIER_PRICE_SHARE). Prices change: override them with
# LLMSTREAM_PRICES rather than trusting this table for invoices.
_BUILTIN: Mapping[str, Mapping[str, tuple[float, float]]] = {
    "openai": {
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
    },
    "anthropic": {
        "claude-3-5-haiku": (0.80, 4.00),
        "claude-3-5-sonnet": (3.00, 15.00),
        "claude-3-7-sonnet": (3.00, 15.00),
        "claude-sonnet-4": (3.00, 15.00),
        "claude-opus-4": (15.00, 75.00),
        "claude-3-haiku": (0.25, 1.25),
        "claude-3-opus": (15.00, 75.00),
    },
}

# Keyed by the bare model name: the same model at another provider (a proxy) costs the same.
BUILTIN_PRICES: Mapping[str, Price] = {
    model: Price(input=i, output=o)
    for models in _BUILTIN.values()
    for model, (i, o) in models.items()
}
BUILTIN_MODELS: tuple[str, ...] = tuple(
    f"{provider}/{model}" for provider, models in _BUILTIN.items() for model in models
)


def load_prices_file(path: Path) -> dict[str, Price]:
    """Prices from a JSON or TOML file (by suffix) of the ``LLMSTREAM_PRICES`` shape."""
    raw = load_object_file(path, "LLMSTREAM_PRICES_FILE", "prices")
    return {name: Price.model_validate(entry) for name, entry in raw.items()}


class _EndpointModels(BaseModel):
    """Of an ``LLMSTREAM_PROVIDERS`` entry, only the models it lists; the rest is not kept."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    models: list[str] = Field(default_factory=list)


class CatalogParams(BaseModel):
    """The configuration that names models; a deployable's settings derive from this class
    (the fields are read as ``LLMSTREAM_PRICES``, ``LLMSTREAM_FALLBACKS``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Prices in USD per million tokens over the built-in table, by "provider/model" or model:
    # {"openai/gpt-4o": {"input": 2.5, "output": 10}}; or a JSON/TOML file of the same shape.
    prices: dict[str, Price] = Field(default_factory=dict)
    prices_file: Path | None = None
    # Fallbacks by model for requests that name none: {"openai/gpt-4o": ["anthropic/..."]}
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # Rate limits by provider or "provider/model" (their values are the worker's concern).
    rate_limits: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Extra provider endpoints; here only their optional "models" lists are read.
    providers: dict[str, _EndpointModels] = Field(default_factory=dict, repr=False)
    providers_file: Path | None = None


@dataclass(frozen=True, slots=True)
class KnownModel:
    """One ``provider/model`` name."""

    id: str
    provider: str


class Catalog:
    """The ``provider/model`` names configuration knows, sorted."""

    def __init__(self, names: Iterable[str], *, created: int | None = None) -> None:
        self.created = int(time.time()) if created is None else created
        self.models = tuple(
            KnownModel(name, name.split("/", 1)[0])
            for name in sorted({n.strip() for n in names if _qualified(n)})
        )
        self._ids = {m.id for m in self.models}

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._ids

    @classmethod
    def from_settings(cls, params: CatalogParams) -> Catalog:
        """Every name the configuration holds (see the module's doc). Raises ValueError when a
        configured file cannot be read."""
        prices = dict(params.prices)
        if params.prices_file is not None:
            prices.update(load_prices_file(params.prices_file))
        endpoints = dict(params.providers)
        if params.providers_file is not None:
            raw = load_object_file(params.providers_file, "LLMSTREAM_PROVIDERS_FILE", "endpoints")
            endpoints = {
                **{name: _EndpointModels.model_validate(entry) for name, entry in raw.items()},
                **endpoints,
            }
        names = [
            *BUILTIN_MODELS,
            *prices,
            *params.fallbacks,
            *(model for chain in params.fallbacks.values() for model in chain),
            *params.rate_limits,
            *(
                f"{name}/{model}"
                for name, endpoint in endpoints.items()
                for model in endpoint.models
            ),
        ]
        return cls(names)


def _qualified(name: str) -> bool:
    provider, slash, model = name.strip().partition("/")
    return bool(provider and slash and model.strip())
