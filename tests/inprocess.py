"""The real pipeline and traffic control inside the test's event loop: real Redis (its own key
prefix per test), real adapters over loopback HTTP to the provider simulator, and a list in place
of the broker (the pipeline's ``Emitter``), so every branch runs in milliseconds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, SecretStr

from llmstream.core.record import AnyRedis
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.dedup import DedupStore
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.pipeline import Output, RequestProcessor, Source
from llmstream.processors.providers import ProviderRouter, create_http_client
from llmstream.processors.providers.pool import ConnectionPool
from llmstream.processors.providers.settings import (
    EndpointConfig,
    ProviderSettings,
    build_router,
)
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.traffic import TrafficControl
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import LLMError, LLMMetric, LLMRequest, LLMResponse

M = TypeVar("M", bound=BaseModel)

SOURCE = Source("llm-requests", 0, 7)

# What a developer's shell may hold to configure providers (ProviderSettings reads it): a test
# that builds providers from the environment clears these first, so only what it sets counts.
PROVIDER_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "OPENROUTER_API_KEY",
    "OPENROUTER_BASE_URL",
    "OLLAMA_HOST",
    "LLMSTREAM_PROVIDERS",
    "LLMSTREAM_PROVIDERS_FILE",
    "LLMSTREAM_PROVIDER_TIMEOUT_S",
)


def without_provider_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``monkeypatch`` with every provider variable unset (restored after the test)."""
    for name in PROVIDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class ListEmitter:
    """The broker's stand-in: keeps every output, in order, as acknowledged at once."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []

    async def emit(self, outputs: Sequence[Output]) -> None:
        self.outputs.extend(outputs)

    async def send(self, output: Output) -> Awaitable[object]:
        self.outputs.append(output)
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked

    def events(self, topic: str, model: type[M]) -> list[M]:
        return [decode(o.value, model) for o in self.outputs if o.topic == topic]


@dataclass
class Rig:
    """One worker's request path, as the worker builds it, for one test."""

    settings: WorkerSettings
    processor: RequestProcessor
    traffic: TrafficControl
    emitter: ListEmitter
    dedup: DedupStore
    metrics: WorkerMetrics
    sim: SimulatorServer
    redis: AnyRedis
    router: ProviderRouter
    providers: ProviderSettings
    http: aiohttp.ClientSession

    def processor_with(self, **parts: Any) -> RequestProcessor:
        """A request path on this rig's parts, with ``parts`` (``emitter=``, ``tools=``,
        ``sessions=``, ``router=``...) in place of the rig's or added."""
        mine = {
            "dedup": self.dedup,
            "router": self.router,
            "emitter": self.emitter,
            "metrics": self.metrics,
            "traffic": self.traffic,
        }
        return RequestProcessor(self.settings, **{**mine, **parts})

    async def process(self, request: LLMRequest | bytes) -> None:
        raw = request if isinstance(request, bytes) else encode(request)
        await self.processor.process(raw, None, SOURCE)

    def responses(self) -> list[LLMResponse]:
        return self.emitter.events(self.settings.responses_topic, LLMResponse)

    def errors(self) -> list[LLMError]:
        return self.emitter.events(self.settings.errors_topic, LLMError)

    def metric_statuses(self) -> list[str]:
        return [m.status for m in self.emitter.events(self.settings.metrics_topic, LLMMetric)]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def calls(self, request_id: str) -> list[dict[str, Any]]:
        """The provider calls the simulator saw for ``request_id``, in order."""
        async with httpx.AsyncClient() as control:
            answer = await control.get(f"{self.sim.url}/_sim/calls")
        calls: list[dict[str, Any]] = answer.json()["calls"]
        return [c for c in calls if c["request_id"] == request_id]

    async def script(self, request_id: str, *responses: dict[str, Any]) -> None:
        """The simulator's next answers to ``request_id``, whichever API it is called on."""
        async with httpx.AsyncClient() as control:
            answer = await control.post(
                f"{self.sim.url}/_sim/script",
                json={"request_id": request_id, "responses": responses},
            )
            answer.raise_for_status()


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    """A provider simulator without latency for a module's rigs (import it to use it): every
    test scripts what it needs per request ID, so one server serves the whole module."""
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=1)) as server:
        yield server


@pytest_asyncio.fixture(name="http")
async def sim_http(sim: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's ``sim`` (import it to use it as ``http``), the simulator's
    calls, scripts and stats reset before and after the test."""
    async with httpx.AsyncClient(base_url=sim.url) as client:
        await client.post("/_sim/reset")
        yield client
        await client.post("/_sim/reset")


def worker_settings(redis_url: str, **overrides: Any) -> WorkerSettings:
    """Settings with this test's own key prefix and topic names, short retry waits."""
    unique = uuid.uuid4().hex[:10]
    fields: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_key_prefix": f"test-{unique}:",
        "requests_topic": f"{unique}-llm-requests",
        "responses_topic": f"{unique}-llm-responses",
        "metrics_topic": f"{unique}-llm-metrics",
        "errors_topic": f"{unique}-llm-errors",
        "chunks_topic": f"{unique}-llm-response-chunks",
        "worker_id": f"test-worker-{unique}",
        "retry_base_delay_s": 0.01,
        "retry_max_delay_s": 0.05,
        "consumer_lag_interval_s": 0,
    }
    fields.update(overrides)
    return WorkerSettings(**fields)


@asynccontextmanager
async def rig(
    sim: SimulatorServer,
    settings: WorkerSettings,
    *,
    redis: AnyRedis | None = None,
    openai_url: str | None = None,
    anthropic_url: str | None = None,
    endpoints: dict[str, EndpointConfig] | None = None,
) -> AsyncIterator[Rig]:
    """The worker's request path against ``sim`` (OpenAI or Anthropic at another URL when
    given, and any other ``endpoints``) and the settings' Redis, or ``redis`` (a single Redis or
    Redis Cluster client the caller owns and closes)."""
    own = redis is None
    if redis is None:
        redis = aioredis.Redis.from_url(settings.redis_url)
    http = create_http_client(timeout_s=10.0, max_connections=50)
    # Other endpoints from the environment (LLMSTREAM_PROVIDERS...) unless ``endpoints`` given.
    others: dict[str, Any] = {} if endpoints is None else {"providers": endpoints}
    providers = ProviderSettings(
        openai_base_url=f"{openai_url or sim.url}/v1",
        openai_api_key=SecretStr("sk-test-not-a-real-key"),
        anthropic_base_url=anthropic_url or sim.url,
        anthropic_api_key=SecretStr("sk-ant-test-not-a-real-key"),
        **others,
    )
    pool = ConnectionPool(limit=50, connect_timeout_s=10.0, read_timeout_s=10.0)
    router = build_router(providers, http, pool)
    metrics = WorkerMetrics(CollectorRegistry())
    # Two rigs on one settings are two workers: each its own token.
    token = f"{settings.worker_id}-{uuid.uuid4().hex[:6]}"
    dedup = DedupStore(
        redis,
        key_prefix=settings.redis_key_prefix,
        worker_token=token,
        lease_ms=settings.lease_ms,
        result_ttl_s=settings.result_ttl_s,
    )
    await dedup.heartbeat()  # a worker's claims need its live heartbeat
    traffic = TrafficControl.from_settings(
        settings, redis=redis, router=router, metrics=metrics, worker_token=token
    )
    emitter = ListEmitter()
    processor = RequestProcessor(
        settings, dedup=dedup, router=router, emitter=emitter, metrics=metrics, traffic=traffic
    )
    parts = Rig(
        settings, processor, traffic, emitter, dedup, metrics, sim, redis, router, providers, http
    )
    try:
        yield parts
    finally:
        await http.close()
        await pool.close()
        if own:
            await redis.aclose()
