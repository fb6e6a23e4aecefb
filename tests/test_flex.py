"""The flex tier through the worker's request path, on the real Redis and the real adapters over
loopback HTTP to the simulator (whose flex answers 429 ``resource_unavailable`` for requests
marked ``[flex-busy]`` or ``[flex-busy:N]``)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.pricing import Price
from llmstream.processors.providers import ProviderError
from llmstream.processors.providers.http import CapacityUnavailable
from llmstream.processors.traffic import TrafficProgress
from llmstream.schemas.models import LLMMetric, LLMResponse, LLMResponseChunk
from tests import harness
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import Rig, rig, sim, worker_settings

__all__ = ["sim"]

HAIKU = "anthropic/claude-3-5-haiku-latest"
PRICES = {
    "openai/gpt-4o-mini": Price(input=2.0, output=8.0),
    "anthropic/claude-3-5-haiku-latest": Price(input=1.0, output=5.0),
}


def new_id() -> str:
    return f"flex-{uuid.uuid4().hex}"


async def sim_stats(r: Rig) -> dict[str, Any]:
    async with httpx.AsyncClient() as control:
        stats: dict[str, Any] = (await control.get(f"{r.sim.url}/_sim/stats")).json()
    return stats


def standard_cost(response: LLMResponse, price: Price) -> float:
    return (response.prompt_tokens * price.input + response.completion_tokens * price.output) / 1e6


async def test_a_flex_request_is_served_at_flex_and_priced_at_half(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url, prices=PRICES)) as r:
        rid = new_id()

        await r.process(request(rid, service_tier="flex", client_id="team-a"))

        [response] = r.responses()
        [metric] = r.emitter.events(r.settings.metrics_topic, LLMMetric)
        assert (response.service_tier, metric.service_tier) == ("flex", "flex")
        full = standard_cost(response, PRICES["openai/gpt-4o-mini"])
        assert full > 0
        assert response.cost_usd == pytest.approx(full / 2)
        assert (await sim_stats(r))["flex_calls_by_request_id"][rid] == 1
        saved = r.sample("llmstream_saved_usd_total", provider="openai", tier="flex")
        assert saved == pytest.approx(full / 2)


async def test_flex_busy_is_retried_at_flex_without_slowing_the_provider(
    services: Services, sim: SimulatorServer
) -> None:
    # One attempt of retry budget: only because flex's 429s are free can the third call answer.
    settings = worker_settings(services.redis_url, prices=PRICES, max_attempts=1)
    async with rig(sim, settings) as r:
        rid = new_id()

        await r.process(request(rid, text="sort these [flex-busy:2]", service_tier="flex"))

        [response] = r.responses()
        assert (response.service_tier, response.attempts) == ("flex", 3)
        assert [c["status"] for c in await r.calls(rid)] == [429, 429, 200]
        assert (await sim_stats(r))["flex_calls_by_request_id"][rid] == 3
        assert r.sample("llmstream_flex_busy_total", provider="openai") == 2
        assert r.sample("llmstream_flex_fallbacks_total", provider="openai") == 0
        # Flex being short is not the account's limit: no pause, no slower rate for others.
        assert (
            r.sample("llmstream_rate_limited_total", provider="openai", scope="upstream_429") == 0
        )
        assert r.traffic.adaptive.pause_remaining("openai") == 0
        assert r.traffic.adaptive.factors.get("openai", 1.0) == 1.0


async def test_flex_busy_until_half_way_to_the_deadline_is_then_served_at_standard(
    services: Services, sim: SimulatorServer
) -> None:
    # Flex 429s are not bounded by their count here: only the deadline's half-way point ends them.
    settings = worker_settings(
        services.redis_url,
        prices=PRICES,
        retry_base_delay_s=0.2,
        retry_max_delay_s=0.2,
        max_rate_limited_attempts=1000,
    )
    async with rig(sim, settings) as r:
        rid = new_id()
        deadline_ms = int(time.time() * 1000) + 4000

        await r.process(
            request(rid, text="later [flex-busy]", service_tier="flex", deadline_ms=deadline_ms)
        )

        [response] = r.responses()
        statuses = [c["status"] for c in await r.calls(rid)]
        flex_calls = (await sim_stats(r))["flex_calls_by_request_id"][rid]
        # Flex was asked again and again, then one standard call answered.
        assert statuses == [429] * flex_calls + [200]
        assert flex_calls >= 2
        assert (response.service_tier, response.attempts) == ("standard", flex_calls + 1)
        full = standard_cost(response, PRICES["openai/gpt-4o-mini"])
        assert response.cost_usd == pytest.approx(full)
        assert r.sample("llmstream_flex_fallbacks_total", provider="openai") == 1
        assert r.sample("llmstream_saved_usd_total", provider="openai", tier="flex") == 0


async def test_flex_busy_past_its_bound_goes_standard_also_without_a_deadline(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(services.redis_url, max_rate_limited_attempts=3)
    async with rig(sim, settings) as r:
        rid = new_id()

        await r.process(request(rid, text="no hurry [flex-busy]", service_tier="flex"))

        [response] = r.responses()
        assert [c["status"] for c in await r.calls(rid)] == [429, 429, 429, 200]
        assert (await sim_stats(r))["flex_calls_by_request_id"][rid] == 3
        assert (response.service_tier, response.attempts) == ("standard", 4)


async def test_flex_without_a_deadline_waits_half_of_the_max_queue_time_at_most(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(
        services.redis_url,
        max_queue_s=1.0,
        retry_base_delay_s=0.05,
        retry_max_delay_s=0.05,
        max_rate_limited_attempts=1000,
    )
    async with rig(sim, settings) as r:
        rid = new_id()

        await r.process(request(rid, text="whenever [flex-busy]", service_tier="flex"))

        [response] = r.responses()
        statuses = [c["status"] for c in await r.calls(rid)]
        assert response.service_tier == "standard"
        assert statuses[-1] == 200 and set(statuses[:-1]) == {429} and len(statuses) >= 3


async def test_flex_on_a_provider_without_flex_is_served_at_standard(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url, prices=PRICES)) as r:
        rid = new_id()

        await r.process(request(rid, model=HAIKU, service_tier="flex"))

        [response] = r.responses()
        assert (response.provider, response.service_tier) == ("anthropic", "standard")
        assert response.cost_usd == pytest.approx(standard_cost(response, PRICES[HAIKU]))
        assert rid not in (await sim_stats(r))["flex_calls_by_request_id"]
        assert r.sample("llmstream_saved_usd_total", provider="anthropic", tier="flex") == 0


async def test_a_streamed_flex_request_streams_only_the_call_that_answered(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = new_id()

        await r.process(
            request(rid, text="stream it [flex-busy:1]", service_tier="flex", stream=True)
        )

        [response] = r.responses()
        chunks = r.emitter.events(r.settings.chunks_topic, LLMResponseChunk)
        assert (response.service_tier, response.attempts) == ("flex", 2)
        assert {chunk.attempt for chunk in chunks} == {2}
        assert "".join(chunk.delta for chunk in chunks) == response.content
        assert (await sim_stats(r))["flex_calls_by_request_id"][rid] == 2


async def test_the_cache_answers_every_tier_alike(services: Services, sim: SimulatorServer) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        text = f"same question {uuid.uuid4().hex}"
        first, second = new_id(), new_id()

        await r.process(request(first, text=text, cache=True))
        await r.process(request(second, text=text, cache=True, service_tier="flex"))

        one, two = r.responses()
        assert (one.cached, two.cached, two.cost_usd) == (False, True, 0.0)
        assert two.content == one.content
        assert await r.calls(second) == []


async def test_the_openai_adapter_tells_flex_busy_from_a_rate_limit(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        busy, limited = new_id(), new_id()
        await r.script(limited, {"status": 429, "retry_after": 1})
        provider, model = r.router.resolve(request(busy))

        with pytest.raises(CapacityUnavailable) as short:
            await provider.complete(request(busy, text="[flex-busy]", service_tier="flex"), model)
        with pytest.raises(ProviderError) as rate_limited:
            await provider.complete(request(limited, service_tier="flex"), model)

        assert (short.value.error_type, short.value.retryable) == ("rate_limited", True)
        assert short.value.status_code == 429
        assert not isinstance(rate_limited.value, CapacityUnavailable)
        assert rate_limited.value.error_type == "rate_limited"
        # The same request at any other tier is sent without service_tier: no flex call.
        await provider.complete(request(busy, text="[flex-busy]", service_tier="auto"), model)
        assert (await sim_stats(r))["flex_calls_by_request_id"][busy] == 1


async def test_traffic_control_serves_the_tier_it_is_given(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        given, batch = new_id(), new_id()
        provider, model = r.router.resolve(request(given))

        as_flex, as_batch = TrafficProgress(), TrafficProgress()
        await r.traffic.complete(request(given), provider, model, as_flex, tier="flex")
        # Traffic control calls synchronously: a batch request that reaches it is standard.
        await r.traffic.complete(request(batch, service_tier="batch"), provider, model, as_batch)

        assert (as_flex.service_tier, as_batch.service_tier) == ("flex", "standard")
        flex_calls = (await sim_stats(r))["flex_calls_by_request_id"]
        assert (flex_calls.get(given), flex_calls.get(batch)) == (1, None)


@pytest.mark.integration
async def test_a_worker_on_the_broker_reports_tier_and_cost_on_its_events(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    in_an_hour = int(time.time() * 1000) + 3_600_000
    asked = {
        "as-flex": request("as-flex", service_tier="flex"),
        "busy-once": request("busy-once", text="later [flex-busy:1]", service_tier="flex"),
        "auto-hour": request("auto-hour", service_tier="auto", deadline_ms=in_an_hour),
        "no-flex": request("no-flex", model=HAIKU, service_tier="flex"),
        "plain": request("plain"),
    }
    prices = {name: price.model_dump(exclude_none=True) for name, price in PRICES.items()}

    async with harness.running_worker(
        settings, simulator.url, f"g-{unique}", tmp_path, LLMSTREAM_PRICES=json.dumps(prices)
    ):
        await harness.produce_requests(settings, list(asked.values()))
        metrics = await harness.read_outputs(settings, LLMMetric, len(asked), timeout=120)
    responses = await harness.read_outputs(settings, LLMResponse, len(asked), timeout=10)

    by_id = {response.request_id: response for response in responses}
    assert {rid: r.service_tier for rid, r in by_id.items()} == {
        "as-flex": "flex",
        "busy-once": "flex",
        "auto-hour": "flex",
        "no-flex": "standard",
        "plain": "standard",
    }
    assert {m.request_id: m.service_tier for m in metrics} == {
        rid: r.service_tier for rid, r in by_id.items()
    }
    for rid, response in by_id.items():
        full = standard_cost(response, PRICES[asked[rid].model])
        share = 0.5 if response.service_tier == "flex" else 1.0
        assert response.cost_usd == pytest.approx(full * share), rid
    assert by_id["busy-once"].attempts == 2
