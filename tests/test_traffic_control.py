"""Traffic control in process: 429s, circuits, fallbacks, cache and cost, seen through the real
pipeline (and once through TrafficControl built from parts of the test's choosing), on the real
Redis and the real adapters over loopback HTTP to the simulator."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.adaptive import AdaptiveControl, AdaptiveParams
from llmstream.processors.backpressure import WaitingRoom
from llmstream.processors.cache import ResponseCache
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.pricing import Price, PriceTable
from llmstream.processors.ratelimit import RateLimiter
from llmstream.processors.retry import RetriesExhausted
from llmstream.processors.traffic import TrafficControl, TrafficProgress
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import rig, worker_settings

FALLBACK = "anthropic/claude-3-5-haiku-latest"


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=2)) as server:
        yield server


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


async def test_429s_wait_for_retry_after_and_spend_no_retry_budget(
    services: Services, sim: SimulatorServer
) -> None:
    # One attempt of retry budget: only if 429s are free can the third call answer.
    settings = worker_settings(services.redis_url, max_attempts=1)
    async with rig(sim, settings) as r:
        rid = new_id()
        await r.script(
            rid,
            {"status": 429, "retry_after": 0.3},
            {"status": 429, "retry_after": 0.3},
            {"status": 200},
        )
        started = time.monotonic()

        await r.process(request(rid))

        elapsed = time.monotonic() - started
        [response] = r.responses()
        assert response.attempts == 3
        assert [c["status"] for c in await r.calls(rid)] == [429, 429, 200]
        # Each 429 paused the provider for its Retry-After before the next call.
        assert elapsed >= 0.55
        assert (
            r.sample("llmstream_rate_limited_total", provider="openai", scope="upstream_429") == 2
        )


async def test_429s_past_their_own_bound_fail_the_request(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(
        services.redis_url, max_rate_limited_attempts=2, rate_limit_default_pause_s=0.01
    )
    async with rig(sim, settings) as r:
        rid = new_id()
        await r.script(rid, *[{"status": 429}] * 3)

        await r.process(request(rid))

        [error] = r.errors()
        assert (error.error_type, error.status_code, error.attempts) == ("rate_limited", 429, 2)
        assert len(await r.calls(rid)) == 2


async def test_an_open_circuit_sends_requests_to_their_fallback_and_others_wait(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(
        services.redis_url, circuit_min_failures=2, circuit_cooldown_s=60, max_attempts=5
    )
    async with rig(sim, settings) as r:
        first, second, waiting = new_id(), new_id(), new_id()
        await r.script(first, {"status": 503}, {"status": 503}, {"status": 200})

        await r.process(request(first, fallbacks=[FALLBACK]))
        await r.process(request(second, fallbacks=[FALLBACK]))
        # No fallback: it waits for the circuit, until its deadline.
        await r.process(request(waiting, deadline_ms=int(time.time() * 1000) + 300))

        by_id = {resp.request_id: resp for resp in r.responses()}
        # Two outages opened the circuit; the third call went to the fallback.
        assert [(c["api"], c["status"]) for c in await r.calls(first)] == [
            ("openai", 503),
            ("openai", 503),
            ("anthropic", 200),
        ]
        assert (by_id[first].provider, by_id[first].attempts) == ("anthropic", 3)
        # The circuit is still open: straight to the fallback, the failing provider not called.
        assert [c["api"] for c in await r.calls(second)] == ["anthropic"]
        assert by_id[second].provider == "anthropic"
        [error] = r.errors()
        assert (error.request_id, error.error_type, error.attempts) == (waiting, "expired", 0)
        assert await r.calls(waiting) == []
        opened = r.sample(
            "llmstream_circuit_transitions_total",
            provider="openai",
            model="gpt-4o-mini",
            transition="opened",
        )
        assert opened == 1


async def test_a_cached_answer_is_served_without_a_call(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        text = f"same question {uuid.uuid4().hex}"
        first, second = new_id(), new_id()

        await r.process(request(first, text=text, cache=True))
        await r.process(request(second, text=text, cache=True))

        one, two = r.responses()
        assert (one.cached, two.cached) == (False, True)
        assert two.content == one.content == f"echo: {text}"
        assert (two.attempts, two.cost_usd) == (0, 0.0)
        assert await r.calls(second) == []
        assert r.metric_statuses() == ["success", "cache_hit"]


async def test_cost_comes_from_the_price_table(services: Services, sim: SimulatorServer) -> None:
    prices = {"openai/gpt-4o-mini": Price(input=2.0, output=8.0)}
    async with rig(sim, worker_settings(services.redis_url, prices=prices)) as r:
        await r.process(request(new_id(), text="what does this cost", client_id="team-a"))

        [response] = r.responses()
        expected = (response.prompt_tokens * 2.0 + response.completion_tokens * 8.0) / 1e6
        assert response.cost_usd == pytest.approx(expected)
        assert expected > 0
        counted = r.sample(
            "llmstream_cost_usd_total", provider="openai", model="gpt-4o-mini", client="team-a"
        )
        assert counted == pytest.approx(expected)


async def test_traffic_control_composed_of_the_tests_parts(
    services: Services, sim: SimulatorServer
) -> None:
    settings = worker_settings(services.redis_url, max_attempts=2)
    async with rig(sim, settings) as r:
        prefix = settings.redis_key_prefix
        adaptive = AdaptiveControl(
            r.redis, key_prefix=prefix, params=AdaptiveParams(), provider_rpm={}
        )
        late = [int(time.time() * 1000) + 120_000]  # the injected clock: two minutes ahead
        traffic = TrafficControl(
            settings,
            router=r.router,
            metrics=WorkerMetrics(CollectorRegistry()),
            room=WaitingRoom(10),
            adaptive=adaptive,
            limiter=RateLimiter(
                r.redis, key_prefix=prefix, limits={}, client_quotas={}, adaptive=adaptive
            ),
            circuits=None,  # no circuit breaking: outages only spend retry budget
            cache=ResponseCache(r.redis, key_prefix=prefix, ttl_s=60),
            prices=PriceTable(),
            rng=random.Random(1),
            now_ms=lambda: late[0],
        )
        failing, due = new_id(), new_id()
        await r.script(failing, *[{"status": 503}] * 3)
        provider, model = r.router.resolve(request(failing))

        progress = TrafficProgress()
        with pytest.raises(RetriesExhausted) as gave_up:
            await traffic.complete(request(failing), provider, model, progress)
        # Its deadline is a minute away on the wall clock, past on the injected one.
        in_a_minute = int(time.time() * 1000) + 60_000
        with pytest.raises(RetriesExhausted) as too_late:
            await traffic.complete(
                request(due, deadline_ms=in_a_minute), provider, model, TrafficProgress()
            )

        assert (gave_up.value.reason, gave_up.value.status_code, progress.attempts) == (
            "max_attempts",
            503,
            2,
        )
        assert len(await r.calls(failing)) == 2
        assert (too_late.value.error_type, too_late.value.attempts) == ("expired", 0)
        assert await r.calls(due) == []
