"""Prices per tier: the batch and flex prices a price names, or half its standard ones; read from
LLMSTREAM_PRICES and LLMSTREAM_PRICES_FILE; and what a cheaper tier saved, counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from llmstream.processors.metrics import TrafficMetrics, WorkerMetrics
from llmstream.processors.pricing import Price, PriceTable, load_prices_file
from llmstream.processors.providers import Completion
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.tiers import TierCosts
from tests.samples import request

MILLION = 1_000_000


def test_batch_and_flex_cost_half_the_standard_price_unless_the_price_says_otherwise() -> None:
    table = PriceTable(
        {
            "cheap": Price(input=2.0, output=8.0),
            "own": Price(input=2.0, output=8.0, batch_input=1.5, flex_output=3.0),
        }
    )

    def cost(model: str, tier: str) -> float | None:
        return table.cost("openai", model, MILLION, MILLION, tier)

    assert [cost("cheap", tier) for tier in ("standard", "batch", "flex")] == [10.0, 5.0, 5.0]
    # A tier price given is used; the one left out is half the standard one.
    assert cost("own", "batch") == 1.5 + 4.0
    assert cost("own", "flex") == 1.0 + 3.0
    assert table.cost("openai", "own", MILLION, 0) == 2.0  # standard by default
    assert table.standard_cost("openai", "own", MILLION, MILLION) == 10.0
    assert table.cost("openai", "unknown-model", MILLION, MILLION, "batch") is None


def test_the_builtin_table_prices_openai_and_anthropic_batches_at_half() -> None:
    table = PriceTable()
    # gpt-4o: 2.50 / 10.00 standard; 1.25 / 5.00 batch and flex (OpenAI's published prices).
    assert table.cost("openai", "gpt-4o-2024-08-06", MILLION, MILLION) == 12.5
    assert table.cost("openai", "gpt-4o", MILLION, MILLION, "batch") == 6.25
    assert table.cost("openai", "gpt-4o", MILLION, MILLION, "flex") == 6.25
    # claude-3-5-haiku: 0.80 / 4.00 standard; 0.40 / 2.00 with Message Batches.
    haiku = table.cost("anthropic", "claude-3-5-haiku-latest", MILLION, MILLION, "batch")
    assert haiku == pytest.approx(2.4)


def test_tier_prices_come_from_the_environment_and_from_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpt = {"input": 3, "output": 12, "flex_input": 1, "flex_output": 4}
    monkeypatch.setenv("LLMSTREAM_PRICES", json.dumps({"openai/gpt-4o": gpt}))
    path = tmp_path / "prices.toml"
    path.write_text("[my-finetune]\ninput = 1.0\noutput = 2.0\nbatch_output = 0.5\n")
    monkeypatch.setenv("LLMSTREAM_PRICES_FILE", str(path))

    settings = WorkerSettings()
    assert settings.prices["openai/gpt-4o"] == Price(
        input=3, output=12, flex_input=1, flex_output=4
    )
    table = PriceTable({**load_prices_file(path), **settings.prices})
    assert table.cost("openai", "gpt-4o", MILLION, MILLION, "flex") == 5.0
    assert table.cost("openai", "gpt-4o", MILLION, MILLION, "batch") == 7.5  # half of 3 + 12
    assert table.cost("vllm", "my-finetune", MILLION, MILLION, "batch") == 0.5 + 0.5


def test_a_tier_price_cannot_be_negative_or_misspelt() -> None:
    with pytest.raises(ValidationError):
        Price(input=1, output=1, batch_input=-0.1)
    with pytest.raises(ValidationError):
        Price.model_validate({"input": 1, "output": 1, "batch_in": 0.5})


def answer(provider: str, model: str, prompt: int, completion: int) -> Completion:
    return Completion("ok", "stop", prompt, completion, prompt + completion, provider, model)


def test_costs_count_what_a_cheaper_tier_saved_by_provider_and_tier() -> None:
    registry = CollectorRegistry()
    traffic_metrics = TrafficMetrics(registry, model_label=WorkerMetrics(registry).model_label)
    costs = TierCosts(PriceTable({"m": Price(input=2.0, output=8.0)}), traffic_metrics, registry)

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    asked = request("saved-1", client_id="team-a")
    assert costs.cost(asked, answer("openai", "m", MILLION, MILLION), "standard") == 10.0
    assert costs.cost(asked, answer("openai", "m", MILLION, MILLION), "flex") == 5.0
    assert costs.cost(asked, answer("openai", "m", 2 * MILLION, 0), "batch") == 2.0
    assert costs.cost(asked, answer("openai", "unpriced", MILLION, MILLION), "batch") is None

    assert sample("llmstream_saved_usd_total", provider="openai", tier="flex") == 5.0
    assert sample("llmstream_saved_usd_total", provider="openai", tier="batch") == 2.0
    assert sample("llmstream_saved_usd_total", provider="openai", tier="standard") == 0.0
    spent = sample("llmstream_cost_usd_total", provider="openai", model="m", client="team-a")
    assert spent == 17.0
