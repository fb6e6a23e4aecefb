"""The HTTP ingress over real HTTP, with the real broker, Redis, worker processes and simulator."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import free_port
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.models import LLMRequest, LLMResponse
from tests.harness import (
    WorkerProcess,
    read_raw,
    read_topic,
    running_worker,
    serve_app,
    simulator_call,
)

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "sk-team-a-not-a-real-key", "sk-team-b-not-a-real-key"
API_KEYS = {hashlib.sha256(k.encode()).hexdigest(): c for k, c in ((KEY_A, "a"), (KEY_B, "b"))}


def ingress_settings(settings: ServiceSettings, **overrides: Any) -> IngressSettings:
    """This test's topics and prefix; a short listener fetch wait (Tansu holds fetches open)."""
    values: dict[str, Any] = {
        **settings.model_dump(),
        "listener_fetch_max_wait_ms": 50,
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return IngressSettings(**values)


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
async def worker(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> AsyncIterator[WorkerProcess]:
    async with running_worker(settings, simulator.url, f"g-{unique}", tmp_path) as process:
        yield process


async def test_batch_is_published_polled_until_completed_and_not_published_twice(
    settings: ServiceSettings, worker: WorkerProcess
) -> None:
    batch = {
        "requests": [
            {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
            for i in range(5)
        ]
    }
    batch["requests"][0]["request_id"] = "mine-0"
    async with (
        serve_app(create_app(ingress_settings(settings))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        submitted = await client.post("/v1/requests", json=batch)
        assert submitted.status_code == 202, submitted.text
        admitted = submitted.json()["requests"]
        ids = [a["request_id"] for a in admitted]
        assert ids[0] == "mine-0" and len(set(ids)) == 5
        assert {(a["status"], a["duplicate"]) for a in admitted} == {("pending", False)}

        results: dict[str, dict[str, Any]] = {}
        for _ in range(300):
            for request_id in set(ids) - set(results):
                got = (await client.get(f"/v1/requests/{request_id}")).json()
                if got["status"] != "pending":
                    results[request_id] = got
            if len(results) == len(ids):
                break
            await asyncio.sleep(0.1)
        assert {r["status"] for r in results.values()} == {"completed"}
        assert [results[i]["response"]["content"] for i in ids] == [f"echo: q{i}" for i in range(5)]

        # The same batch with the same IDs: its status, and nothing published again.
        resubmitted = await client.post(
            "/v1/requests",
            json={
                "requests": [
                    {**r, "request_id": i} for r, i in zip(batch["requests"], ids, strict=True)
                ]
            },
        )
    assert resubmitted.status_code == 200
    assert resubmitted.json()["requests"] == [
        {"request_id": i, "status": "completed", "duplicate": True} for i in ids
    ]
    events = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 6, 1.5)
    assert len(events) == 5


async def test_resubmitted_ids_are_answered_with_their_status_and_not_published(
    settings: ServiceSettings,
) -> None:
    body = chat_body("hello")
    async with (
        serve_app(create_app(ingress_settings(settings))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        first = await client.post("/v1/requests", json=body, headers={"Idempotency-Key": "k-1"})
        again = await client.post("/v1/requests", json=body, headers={"Idempotency-Key": "k-1"})
        in_body = await client.post("/v1/requests", json={**body, "request_id": "k-1"})
        twice_in_a_batch = await client.post(
            "/v1/requests", json={"requests": [{**body, "request_id": "k-2"}] * 2}
        )
        status = await client.get("/v1/requests/k-1")
        other_content = await client.post(
            "/v1/requests", json=chat_body("goodbye"), headers={"Idempotency-Key": "k-1"}
        )
        other_chat = await client.post(
            "/v1/chat/completions", json=chat_body("goodbye"), headers={"Idempotency-Key": "k-1"}
        )
    assert first.status_code == 202
    assert first.json()["requests"] == [
        {"request_id": "k-1", "status": "pending", "duplicate": False}
    ]
    for answer in (again, in_body):
        assert answer.status_code == 200
        assert answer.json()["requests"] == [
            {"request_id": "k-1", "status": "pending", "duplicate": True}
        ]
    assert [a["duplicate"] for a in twice_in_a_batch.json()["requests"]] == [False, True]
    # The same ID for something else is refused, not answered with another request's outcome.
    assert other_content.status_code == 409
    assert other_content.json()["error"]["code"] == "request_id_reused"
    assert other_chat.status_code == 409
    assert other_chat.json()["error"]["param"] == "Idempotency-Key"
    assert status.json() == {
        "request_id": "k-1",
        "status": "pending",
        "response": None,
        "error": None,
    }
    raw = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 3, 1.5)
    published = sorted(LLMRequest.model_validate_json(v).request_id for v in raw)
    assert published == ["k-1", "k-2"]


async def test_openai_sdk_gets_the_simulated_answer_through_the_pipeline(
    settings: ServiceSettings, simulator: SimulatorServer, worker: WorkerProcess
) -> None:
    # The provider rejects this one: the SDK must see a 400 in OpenAI's error shape.
    scripted = {"request_id": "refused-1", "responses": [{"status": 400}]}
    await simulator_call(simulator, "POST", "/_sim/script", scripted)
    app = create_app(ingress_settings(settings, api_keys=API_KEYS))
    async with serve_app(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0)
        try:
            completion = await client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=[
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "text", "text": "what is Kafka?"}]},
                ],
                temperature=0.2,
                max_completion_tokens=50,
                user="end-user-7",
            )
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model="openai/gpt-4o-mini",
                    messages=[{"role": "user", "content": "refuse me"}],
                    extra_headers={"Idempotency-Key": "refused-1"},
                )
            stranger = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0)
            with pytest.raises(openai.PermissionDeniedError):
                await stranger.chat.completions.create(
                    model="openai/x", messages=[{"role": "user", "content": "x"}]
                )
            await stranger.close()
        finally:
            await client.close()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: what is Kafka?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert refused.value.status_code == 400
    assert refused.value.body["code"] == "invalid_request"  # type: ignore[index]
    # The published response carries the API key's client identity, and never the key.
    [response] = await read_topic(
        settings.kafka_bootstrap_servers,
        settings.responses_topic,
        LLMResponse,
        until=lambda got: any(r.request_id == completion.id for r in got),
        timeout=5,
    )
    assert response.request_id == completion.id
    assert response.client_id == "a" and response.metadata == {"user": "end-user-7"}
    raw = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 2, 3)
    assert not any(KEY_A.encode() in value for value in raw)


async def test_replicas_each_answer_their_own_waiting_clients(
    settings: ServiceSettings, worker: WorkerProcess
) -> None:
    # Redis is read once at the start of a wait and then not for a minute: an answer in time
    # can only come from the replica's own response listener.
    replica = ingress_settings(settings, result_poll_s=60, chat_timeout_s=30)
    registry_a, registry_b = CollectorRegistry(), CollectorRegistry()
    async with (
        serve_app(create_app(replica, registry=registry_a)) as url_a,
        serve_app(create_app(replica, registry=registry_b)) as url_b,
        httpx.AsyncClient(timeout=60) as client,
    ):

        async def ask(url: str, text: str) -> str:
            answer = await client.post(f"{url}/v1/chat/completions", json=chat_body(text))
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["message"]["content"])

        questions = [(url_a if i % 2 else url_b, f"question {i}") for i in range(20)]
        answers = await asyncio.gather(*(ask(url, text) for url, text in questions))

        # An outcome stored before anyone waits for it (a resubmitted chat request) is read from
        # Redis at once, not waited for on the topic.
        done = await client.post(
            f"{url_a}/v1/requests", json=chat_body("early"), headers={"Idempotency-Key": "early-1"}
        )
        assert done.status_code == 202
        for _ in range(200):
            status = (await client.get(f"{url_a}/v1/requests/early-1")).json()["status"]
            if status == "completed":
                break
            await asyncio.sleep(0.05)
        late = await client.post(
            f"{url_b}/v1/chat/completions",
            json=chat_body("early"),
            headers={"Idempotency-Key": "early-1"},
        )
    assert answers == [f"echo: {text}" for _, text in questions]
    outcomes = "llmstream_ingress_outcomes_total"
    assert registry_a.get_sample_value(outcomes, {"source": "topic"}) == 10
    assert registry_b.get_sample_value(outcomes, {"source": "topic"}) == 10
    assert registry_b.get_sample_value(outcomes, {"source": "redis"}) == 1  # the early one
    assert late.status_code == 200 and late.json()["id"] == "early-1"
    assert late.json()["choices"][0]["message"]["content"] == "echo: early"


async def test_invalid_bodies_get_a_4xx_naming_the_field(settings: ServiceSettings) -> None:
    async with (
        serve_app(
            create_app(ingress_settings(settings, max_batch=3, max_body_bytes=64_000))
        ) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        native = {
            "messages.0.content": await client.post(
                "/v1/requests", json=chat_body("") | {"model": "m"}
            ),
            "requests.1.temperature": await client.post(
                "/v1/requests",
                json={"requests": [chat_body("a"), chat_body("b", temperature=9)]},
            ),
            "requests": await client.post("/v1/requests", json={"requests": [chat_body("a")] * 4}),
            "bogus": await client.post("/v1/requests", json=chat_body("a", bogus=1)),
            "model": await client.post("/v1/requests", json={"messages": []}),
            "Idempotency-Key": await client.post(
                "/v1/requests", json=chat_body("a"), headers={"Idempotency-Key": "x" * 300}
            ),
            "body": await client.post(
                "/v1/requests", content=b"{no", headers={"content-type": "application/json"}
            ),
        }
        too_large = await client.post("/v1/requests", json=chat_body("x" * 70_000))
        chat = {
            "temperature": await client.post(
                "/v1/chat/completions", json=chat_body("a", temperature=3)
            ),
            "n": await client.post("/v1/chat/completions", json=chat_body("a", n=2)),
            "tools": await client.post("/v1/chat/completions", json=chat_body("a", tools=[])),
            "messages.0.content": await client.post(
                "/v1/chat/completions",
                json={
                    "model": "openai/x",
                    "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
                },
            ),
        }
    for field, answer in native.items():
        assert answer.status_code in (400, 413, 422), (field, answer.text)
        assert answer.json()["error"]["param"] == field, answer.text
    assert native["messages.0.content"].status_code == 422
    fields = native["model"].json()["error"]["fields"]
    assert {f["field"] for f in fields} == {"model", "messages"}
    assert too_large.status_code == 413 and too_large.json()["error"]["param"] == "body"
    for field, answer in chat.items():
        assert answer.status_code == 400, (field, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", field)
        assert "Traceback" not in answer.text
    raw = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1, 1)
    assert raw == []


async def test_api_keys_are_required_and_scope_what_a_client_sees(
    settings: ServiceSettings,
) -> None:
    app = create_app(ingress_settings(settings, api_keys=API_KEYS))
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        missing = await client.post("/v1/requests", json=chat_body("a"))
        wrong = await client.post(
            "/v1/requests", json=chat_body("a"), headers={"Authorization": "Bearer sk-nope"}
        )
        as_a = await client.post(
            "/v1/requests",
            json=chat_body("a", request_id="owned-by-a", client_id="someone-else"),
            headers={"Authorization": f"Bearer {KEY_A}"},
        )
        a_reads = await client.get("/v1/requests/owned-by-a", headers={"X-API-Key": KEY_A})
        b_reads = await client.get("/v1/requests/owned-by-a", headers={"X-API-Key": KEY_B})
        b_reuses = await client.post(
            "/v1/requests",
            json=chat_body("b", request_id="owned-by-a"),
            headers={"X-API-Key": KEY_B},
        )
        health = await client.get("/health")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 403
    assert as_a.status_code == 202
    assert a_reads.status_code == 200 and a_reads.json()["status"] == "pending"
    assert b_reads.status_code == 404
    assert b_reuses.status_code == 409 and b_reuses.json()["error"]["param"] == "request_id"
    assert health.status_code == 200
    [raw] = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 1, 3)
    published = LLMRequest.model_validate_json(raw)
    assert published.client_id == "a"  # the key's identity, not what the body claimed
    assert KEY_A.encode() not in raw and b"sk-" not in raw


async def test_rate_limit_is_shared_by_replicas(settings: ServiceSettings) -> None:
    limited = ingress_settings(
        settings, api_keys=API_KEYS, rate_limit_per_minute=6, rate_limit_burst=3
    )
    registry = CollectorRegistry()
    async with (
        serve_app(create_app(limited, registry=registry)) as url_a,
        serve_app(create_app(limited)) as url_b,
        httpx.AsyncClient() as client,
    ):
        a = {"X-API-Key": KEY_A}
        codes = [
            (await client.get(f"{url}/v1/requests/x", headers=a)).status_code
            for url in (url_a, url_b, url_a)
        ]
        refused = await client.get(f"{url_b}/v1/requests/x", headers=a)
        refused_too = await client.get(f"{url_a}/v1/requests/x", headers=a)
        other_client = await client.get(f"{url_b}/v1/requests/x", headers={"X-API-Key": KEY_B})
        metrics = (await client.get(f"{url_a}/metrics")).text
    assert codes == [404, 404, 404]  # allowed (and the ID is unknown)
    assert refused.status_code == 429
    # 6 a minute: the next request is allowed 10 s after the burst was used up.
    assert 9 <= int(refused.headers["retry-after"]) <= 10
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused_too.status_code == 429
    assert other_client.status_code == 404
    assert "llmstream_ingress_rate_limited_total 1.0" in metrics


async def test_chat_timeout_answers_504_with_the_request_id_to_poll(
    settings: ServiceSettings,
) -> None:
    app = create_app(ingress_settings(settings, chat_timeout_s=0.3))  # and no worker
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.post("/v1/chat/completions", json=chat_body("anyone?"))
        request_id = answer.json()["error"]["request_id"]
        status = await client.get(f"/v1/requests/{request_id}")
    assert answer.status_code == 504
    assert answer.headers["x-should-retry"] == "false"  # the SDK must not publish it again
    assert answer.headers["x-request-id"] == request_id
    assert status.json()["status"] == "pending"


async def test_health_ready_metrics_and_docs(settings: ServiceSettings, unique: str) -> None:
    async with (
        serve_app(create_app(ingress_settings(settings))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        health, ready = await client.get("/health"), await client.get("/ready")
        docs, spec = await client.get("/docs"), await client.get("/openapi.json")
        metrics = await client.get("/metrics")
    assert health.json() == {"status": "alive"}
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "kafka": "ok", "listener": "ok"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert set(spec.json()["paths"]) >= {
        "/v1/requests",
        "/v1/requests/{request_id}",
        "/v1/chat/completions",
    }
    assert 'llmstream_ingress_requests_total{endpoint="/ready",status="200"} 1.0' in metrics.text

    # Redis gone (a port nobody listens on): not ready, and it says which check failed.
    no_redis = ingress_settings(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with (
        serve_app(create_app(no_redis)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        not_ready = await client.get("/ready")
        submit = await client.post("/v1/requests", json=chat_body("a"))
    assert not_ready.status_code == 503
    checks = not_ready.json()["checks"]
    assert checks["redis"].startswith("unreachable") and checks["kafka"] == "ok"
    assert submit.status_code == 503 and submit.headers["retry-after"] == "1"


async def test_shutdown_lets_in_flight_publications_finish(settings: ServiceSettings) -> None:
    app = create_app(ingress_settings(settings, linger_ms=50))
    accepted: list[str] = []
    async with httpx.AsyncClient() as client:
        async with serve_app(app) as url:

            async def submit(i: int) -> None:
                body = chat_body(f"s{i}", request_id=f"s-{i}")
                answer = await client.post(f"{url}/v1/requests", json=body)
                if answer.status_code == 202:
                    accepted.append(f"s-{i}")

            tasks = [asyncio.create_task(submit(i)) for i in range(30)]
            await asyncio.sleep(0.05)  # some are in flight when the server is told to stop
        await asyncio.gather(*tasks, return_exceptions=True)
    raw = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 30, 5)
    published = {LLMRequest.model_validate_json(v).request_id for v in raw}
    assert accepted and set(accepted) <= published
