"""Each ingress router on its own: a FastAPI app with one router and only the parts it uses on
``app.state``, called in-process through httpx's ASGI transport, with the real broker and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.ingress import openai_compat, operations, requests_api
from llmstream.ingress.app import connect
from llmstream.ingress.auth import ApiKeys
from llmstream.ingress.errors import install_error_handlers
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.quota import ClientQuota
from llmstream.ingress.results import RequestLedger
from llmstream.ingress.settings import IngressSettings
from llmstream.processors.dedup import DedupStore
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse
from tests.harness import produce, read_raw
from tests.samples import response_to
from tests.test_ingress import API_KEYS, KEY_A, KEY_B, chat_body, ingress_settings

pytestmark = pytest.mark.integration


def one_router(
    router: APIRouter, settings: IngressSettings, metrics: IngressMetrics | None = None
) -> FastAPI:
    """An app serving ``router`` alone, with the settings, metrics and API keys on its state."""
    app = FastAPI()
    install_error_handlers(
        app,
        validation_status={openai_compat.CHAT_PATH: 400},
        body_tags=requests_api.BODY_TAGS,
    )
    app.include_router(router)
    app.state.settings = settings
    app.state.metrics = metrics or IngressMetrics(CollectorRegistry())
    app.state.api_keys = ApiKeys(settings.api_keys)
    return app


def client_of(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ingress")


def sample(app: FastAPI, name: str, labels: dict[str, str] | None = None) -> float | None:
    metrics: IngressMetrics = app.state.metrics
    return metrics.registry.get_sample_value(name, labels or {})


@pytest.fixture
async def connected(settings: ServiceSettings) -> AsyncIterator[tuple[FastAPI, FastAPI]]:
    """The requests router and the chat router, each with the parts the ingress connects."""
    # Redis is read once when a chat wait starts, then not for a minute: an answer in time can
    # only come through the response listener.
    ingress = ingress_settings(settings, result_poll_s=60, chat_timeout_s=30)
    metrics = IngressMetrics(CollectorRegistry())
    requests_app = one_router(requests_api.routes.router(), ingress, metrics)
    chat_app = one_router(openai_compat.routes.router(), ingress, metrics)
    async with connect(ingress, metrics, requests_app.state):
        for name in ("ledger", "publisher", "listener", "quota"):
            setattr(chat_app.state, name, getattr(requests_app.state, name))
        yield requests_app, chat_app


async def test_requests_router_publishes_each_id_once_and_reports_the_workers_outcome(
    settings: ServiceSettings, redis_client: aioredis.Redis, connected: tuple[FastAPI, FastAPI]
) -> None:
    app, _ = connected
    async with client_of(app) as client:
        first = await client.post(
            "/v1/requests", json=chat_body("one"), headers={"Idempotency-Key": "r-1"}
        )
        again = await client.post(
            "/v1/requests", json=chat_body("one"), headers={"Idempotency-Key": "r-1"}
        )
        pending = await client.get("/v1/requests/r-1")
        # The worker takes the request and stores its failure, as it does before emitting it.
        store = DedupStore(
            redis_client,
            key_prefix=settings.redis_key_prefix,
            worker_token="router-test",
            lease_ms=30_000,
            result_ttl_s=600,
        )
        await store.heartbeat()
        await store.claim("r-1", wall_clock_ms())
        error = LLMError(
            request_id="r-1",
            error_type="invalid_request",
            message="the provider refused it",
            status_code=400,
            attempts=1,
            request=LLMRequest.model_validate({**chat_body("one"), "request_id": "r-1"}),
            occurred_at_ms=wall_clock_ms(),
        )
        await store.settle("r-1", failed=True, payload=encode(error), now_ms=wall_clock_ms())
        failed = await client.get("/v1/requests/r-1")
        unknown = await client.get("/v1/requests/nobody")
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["requests"] == [
        {"request_id": "r-1", "status": "pending", "duplicate": True}
    ]
    assert pending.json()["status"] == "pending"
    assert failed.status_code == 200
    body = failed.json()
    assert (body["status"], body["response"]) == ("failed", None)
    assert body["error"]["error_type"] == "invalid_request"
    assert body["error"]["status_code"] == 400
    assert "request" not in body["error"]  # the failure does not echo the request back
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert sample(app, "llmstream_ingress_published_total") == 1
    assert sample(app, "llmstream_ingress_duplicates_total") == 1
    raw = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 2, 1.5)
    assert [decode(v, LLMRequest).request_id for v in raw] == ["r-1"]


async def test_chat_router_answers_with_the_outcome_that_arrives_on_the_topic(
    settings: ServiceSettings, connected: tuple[FastAPI, FastAPI]
) -> None:
    _, app = connected

    async def play_the_worker() -> LLMResponse:
        [raw] = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1, 20)
        request = decode(raw, LLMRequest)
        answer = f"answer to {request.messages[-1].content}"
        response = response_to(
            request, answer, finish_reason="end_turn", completed_at_ms=wall_clock_ms()
        )
        key = request.request_id.encode()
        await produce(
            settings.kafka_bootstrap_servers, settings.responses_topic, [(key, encode(response))]
        )
        return response

    worker = asyncio.create_task(play_the_worker())
    async with client_of(app) as client:
        answer = await client.post(
            "/v1/chat/completions", json=chat_body("why?"), headers={"Idempotency-Key": "c-1"}
        )
    response = await worker
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "c-1"
    assert answer.headers["x-should-retry"] == "false"
    completion = answer.json()
    assert completion["id"] == "c-1"
    assert completion["choices"][0]["message"]["content"] == "answer to why?"
    assert completion["choices"][0]["finish_reason"] == "stop"
    usage = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert completion["usage"] == response.model_dump(include=usage)
    assert sample(app, "llmstream_ingress_outcomes_total", {"source": "topic"}) == 1


async def test_client_quota_refuses_past_the_burst_with_retry_after(
    settings: ServiceSettings, redis_client: aioredis.Redis
) -> None:
    # The status route needs only Redis: the ledger and the quota, no broker.
    ingress = ingress_settings(settings, api_keys=API_KEYS)
    app = one_router(requests_api.routes.router(), ingress)
    async with client_of(app) as client:
        before = await client.get("/v1/requests/x", headers={"X-API-Key": KEY_A})
        app.state.ledger = RequestLedger(
            redis_client, key_prefix=settings.redis_key_prefix, ttl_s=60, requeue_after_s=60
        )
        app.state.quota = ClientQuota(
            redis_client, key_prefix=settings.redis_key_prefix, per_minute=1, burst=2
        )
        codes = [
            (await client.get("/v1/requests/x", headers={"X-API-Key": KEY_A})).status_code
            for _ in range(2)
        ]
        refused = await client.get("/v1/requests/x", headers={"X-API-Key": KEY_A})
        other = await client.get("/v1/requests/x", headers={"X-API-Key": KEY_B})
        no_key = await client.get("/v1/requests/x")
    assert before.status_code == 503  # not running yet: no quota to count against
    assert codes == [404, 404]
    assert refused.status_code == 429
    # One a minute after a burst of two: the next is allowed a minute after the first.
    assert 50 <= int(refused.headers["retry-after"]) <= 60
    assert 49_000 < int(refused.headers["retry-after-ms"]) <= 60_000
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert other.status_code == 404  # each client has its own quota
    assert no_key.status_code == 401
    assert sample(app, "llmstream_ingress_rate_limited_total") == 1
    assert sample(app, "llmstream_ingress_auth_failures_total", {"reason": "missing"}) == 1


async def test_operations_router_is_not_ready_until_its_parts_answer(
    settings: ServiceSettings, unique: str
) -> None:
    ingress = ingress_settings(settings)
    app = one_router(operations.routes.router(), ingress)
    async with client_of(app) as client:
        health = await client.get("/health")
        starting = await client.get("/ready")
        async with connect(ingress, app.state.metrics, app.state):
            ready = await client.get("/ready")
        # Configured for a requests topic nobody created: the ingress would publish into nothing.
        missing = ingress_settings(settings, requests_topic=f"{unique}-not-created")
        app.state.settings = missing
        async with connect(missing, app.state.metrics, app.state):
            not_ready = await client.get("/ready")
        metrics = await client.get("/metrics")
    assert health.json() == {"status": "alive"}
    assert starting.status_code == 503
    assert starting.json()["checks"] == {"ingress": "starting or stopping"}
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"redis": "ok", "kafka": "ok", "listener": "ok"},
    }
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["kafka"] == f"missing topics: {unique}-not-created"
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "llmstream_ingress_waiting_requests 0.0" in metrics.text
