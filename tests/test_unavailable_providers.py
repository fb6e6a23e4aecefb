"""A request for a provider that is not configured fails at once; one for a provider that cannot
be reached fails within ``LLMSTREAM_MAX_QUEUE_S``; the worker's /ready names a provider down
that long. In process (real Redis, real adapters over loopback HTTP to the simulator or to a
port nobody listens on) and once through a worker process on the real broker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.processes import free_port
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.providers import create_http_client
from llmstream.processors.providers.settings import ProviderSettings, build_router
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.models import LLMError
from tests.conftest import Services
from tests.harness import WorkerProcess, produce, read_topic, request, request_events, worker_env
from tests.inprocess import rig, without_provider_env, worker_settings


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=3)) as server:
        yield server


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No provider configuration from the shell running the tests."""
    return without_provider_env(monkeypatch)


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def down_provider() -> str:
    """``LLMSTREAM_PROVIDERS`` with a provider "down" on a loopback port nobody listens on:
    every call is refused."""
    closed_url = f"http://127.0.0.1:{free_port()}/v1"
    return json.dumps({"down": {"kind": "openai", "base_url": closed_url}})


def behind_a_closed_port(
    env: pytest.MonkeyPatch, redis_url: str, *, max_queue_s: float
) -> WorkerSettings:
    """Provider "down" configured, and settings whose circuit opens at its first refused call
    and stays open far longer than ``max_queue_s``."""
    env.setenv("LLMSTREAM_PROVIDERS", down_provider())
    return worker_settings(
        redis_url, max_queue_s=max_queue_s, circuit_min_failures=1, circuit_cooldown_s=300
    )


# --- not configured ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "openrouter/meta-llama/llama-3-8b",
            "openrouter is not configured: set OPENROUTER_API_KEY",
        ),
        ("ollama/llama3", "ollama is not configured: set OLLAMA_HOST"),
    ],
)
async def test_unconfigured_provider_fails_at_once_naming_the_variable(
    services: Services,
    sim: SimulatorServer,
    env: pytest.MonkeyPatch,
    model: str,
    message: str,
) -> None:
    # OpenRouter's endpoint is the simulator: only the missing key keeps the call from going.
    env.setenv("OPENROUTER_BASE_URL", f"{sim.url}/v1")
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = new_id()

        await r.process(request(rid, model=model))

        [error] = r.errors()
        assert (error.request_id, error.error_type, error.message) == (
            rid,
            "provider_not_configured",
            message,
        )
        assert (error.retryable, error.attempts) == (False, 0)
        assert error.request is not None  # replayable once the variable is set
        assert r.responses() == []
        assert r.metric_statuses() == ["error"]
        assert await r.calls(rid) == []
        assert model.partition("/")[0] not in r.router.names


async def test_configured_openrouter_is_called(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    env.setenv("OPENROUTER_BASE_URL", f"{sim.url}/v1")
    env.setenv("OPENROUTER_API_KEY", "sk-or-test-not-a-real-key")
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = new_id()

        await r.process(request(rid, model="openrouter/meta-llama/llama-3-8b"))

        [response] = r.responses()
        assert (response.provider, response.attempts) == ("openrouter", 1)
        [call] = await r.calls(rid)
        assert call["status"] == 200


async def test_unknown_provider_fails_at_once_listing_the_configured_ones(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = new_id()

        await r.process(request(rid, model="mistral/large"))

        [error] = r.errors()
        assert (error.error_type, error.retryable, error.attempts) == ("invalid_request", False, 0)
        assert error.message == (
            "unknown provider 'mistral' for model 'mistral/large' "
            "(known providers: anthropic, openai)"
        )


async def test_a_fallback_on_an_unconfigured_provider_is_skipped(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    env.setenv("OPENROUTER_BASE_URL", f"{sim.url}/v1")  # reachable, but it has no key
    async with rig(sim, worker_settings(services.redis_url, max_attempts=1)) as r:
        rid = new_id()
        await r.script(rid, {"status": 503})
        fallbacks = ["openrouter/meta-llama/llama-3-8b", "anthropic/claude-3-5-haiku-latest"]

        await r.process(request(rid, fallbacks=fallbacks))

        [response] = r.responses()
        assert (response.provider, response.attempts) == ("anthropic", 2)
        assert [c["api"] for c in await r.calls(rid)] == ["openai", "anthropic"]


@pytest.mark.parametrize(
    ("variables", "configured"),
    [
        ({}, []),
        ({"OPENAI_API_KEY": "sk-1"}, ["openai"]),
        # A local OpenAI-compatible server often takes no key.
        ({"OPENAI_BASE_URL": "http://gpu-1:8000/v1"}, ["openai"]),
        ({"ANTHROPIC_BASE_URL": "http://proxy.internal"}, ["anthropic"]),
        ({"ANTHROPIC_API_KEY": "sk-ant-1"}, ["anthropic"]),
        # Without its key, OpenRouter refuses every call: not configured.
        ({"OPENROUTER_BASE_URL": "http://or.internal/api/v1"}, []),
        ({"OPENROUTER_API_KEY": "sk-or-1"}, ["openrouter"]),
        ({"OLLAMA_HOST": "gpu-box:11434"}, ["ollama"]),
        (
            {"LLMSTREAM_PROVIDERS": '{"vllm": {"kind": "openai", "base_url": "http://g/v1"}}'},
            ["vllm"],
        ),
    ],
)
async def test_only_configured_providers_are_registered(
    env: pytest.MonkeyPatch, variables: dict[str, str], configured: list[str]
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    http = create_http_client(timeout_s=5.0, max_connections=10)
    try:
        router = build_router(ProviderSettings(), http)
    finally:
        await http.close()

    assert router.names == configured
    assert set(router.unconfigured) == {"anthropic", "ollama", "openai", "openrouter"} - set(
        configured
    )


# --- unreachable ---------------------------------------------------------------------------------


async def test_unreachable_provider_fails_within_max_queue_s(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    # Only the bound can end the request: its circuit opens at once and stays open.
    settings = behind_a_closed_port(env, services.redis_url, max_queue_s=1.5)
    async with rig(sim, settings) as r:
        slots = asyncio.Semaphore(1)
        r.traffic.room.bind(slots)
        await slots.acquire()  # the request's in-flight slot, as the worker takes it
        rid = new_id()
        started = time.monotonic()

        async with asyncio.timeout(60):
            await r.process(request(rid, model="down/some-model"))

        elapsed = time.monotonic() - started
        slots.release()  # as the worker does when the request's task ends
        [error] = r.errors()
        assert (error.request_id, error.error_type, error.provider) == (
            rid,
            "provider_unavailable",
            "down",
        )
        assert error.message.startswith(
            "no answer from down/some-model within LLMSTREAM_MAX_QUEUE_S (1.5 s) after 1 call; "
            "last error: down: "
        )
        assert (error.retryable, error.attempts) == (True, 1)
        assert r.metric_statuses() == ["error"]
        assert elapsed >= 1.5
        # The request holds nothing once it failed: no slot, no place in the waiting room.
        assert (slots.locked(), r.traffic.room.waiting) == (False, 0)
        # What /ready reports: the model, and why.
        down = r.traffic.outages.down(settings.max_queue_s)
        assert list(down) == ["down/some-model"]
        assert down["down/some-model"] == error.message


async def test_own_deadline_keeps_its_meaning(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    settings = behind_a_closed_port(env, services.redis_url, max_queue_s=600)
    async with rig(sim, settings) as r:
        rid = new_id()

        async with asyncio.timeout(60):
            await r.process(
                request(rid, model="down/some-model", deadline_ms=wall_clock_ms() + 1000)
            )

        [error] = r.errors()
        assert error.error_type == "expired"
        assert "last error: down: " in error.message
        # One request that expired on its own short deadline says nothing yet about /ready.
        assert r.traffic.outages.down(settings.max_queue_s) == {}


async def test_a_provider_that_answers_again_is_no_longer_down(
    services: Services, sim: SimulatorServer, env: pytest.MonkeyPatch
) -> None:
    # Without a circuit, and with retries to spare, only the bound ends the failing request.
    settings = worker_settings(
        services.redis_url, max_queue_s=0.5, circuit_breaker=False, max_attempts=100
    )
    async with rig(sim, settings) as r:
        rid = new_id()
        # 503 until the bound passes, then an answer to the next request.
        await r.script(rid, *[{"status": 503}] * 200)

        async with asyncio.timeout(60):
            await r.process(request(rid))

        [error] = r.errors()
        assert error.error_type == "provider_unavailable"
        assert "HTTP 503" in error.message
        assert list(r.traffic.outages.down(settings.max_queue_s)) == ["openai/gpt-4o-mini"]

        await r.process(request(new_id()))

        assert len(r.responses()) == 1
        assert r.traffic.outages.down(settings.max_queue_s) == {}


# --- the worker process ----------------------------------------------------------------------


async def test_worker_ready_names_the_provider_down_longer_than_max_queue_s(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    env = worker_env(
        settings,
        simulator.url,
        f"group-{unique}",
        LLMSTREAM_PROVIDERS=down_provider(),
        LLMSTREAM_MAX_QUEUE_S="3",
        LLMSTREAM_CIRCUIT_MIN_FAILURES="1",
        LLMSTREAM_CIRCUIT_COOLDOWN_S="300",
    )
    worker = WorkerProcess(env, tmp_path).start()
    try:
        await worker.wait_ready()
        rid = f"down-{unique}"
        await produce(
            settings.kafka_bootstrap_servers,
            settings.requests_topic,
            request_events([request(rid, model="down/some-model")]),
        )
        # Ready until the request has waited out the bound; then 503, naming the model.
        async with httpx.AsyncClient() as client:
            async with asyncio.timeout(90):
                while (answer := await client.get(worker.url("/ready"))).status_code == 200:
                    await asyncio.sleep(0.1)
        errors = await read_topic(
            settings.kafka_bootstrap_servers,
            settings.errors_topic,
            LLMError,
            until=lambda events: len(events) >= 1,
        )
    finally:
        worker.stop()

    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert (checks["redis"], checks["kafka"]) == ("ok", "ok")
    assert checks["providers"].startswith(
        "down/some-model unavailable: no answer from down/some-model within "
        "LLMSTREAM_MAX_QUEUE_S (3 s)"
    )
    [error] = errors
    assert (error.request_id, error.error_type) == (rid, "provider_unavailable")
