"""Nobody reads another client's request: with API keys on, a record or outcome is shown only to
the client it positively belongs to, through every endpoint, and one that belongs to nobody
(produced straight to Kafka, submitted while authentication was off) is shown to nobody.

Also what a caller with a wrong key gets (no body read, a budget of failures per address) and
what clients are told about a provider's failure (never the provider's endpoint URL or the list
of configured providers, which stay on llm-errors for operators).

The whole ingress app in-process (its middleware, error handlers and parts), connected to the
real broker and Redis; outcomes come from a worker process on the real broker, or from the
worker's request path in-process on the same Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import create_app
from tests.conftest import Services
from tests.harness import in_process_ingress, produce_requests, request, running_worker, serve_app
from tests.inprocess import rig, without_provider_env, worker_settings
from tests.test_ingress import API_KEYS, KEY_A, KEY_B, chat_body, ingress_settings
from tests.test_unavailable_providers import down_provider

pytestmark = pytest.mark.integration

A, B = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}


async def completed(client: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    """The request's status once it is no longer pending (authentication off)."""
    for _ in range(400):
        body: dict[str, Any] = (await client.get(f"/v1/requests/{request_id}")).json()
        if body.get("status") not in ("pending", None):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{request_id} still pending")


def says_nothing_about_it(answer: httpx.Response, answer_text: str) -> bool:
    """A 409 "ID taken" that gives away neither the request's status nor its answer."""
    error = answer.json()["error"]
    return (
        answer.status_code == 409
        and error["code"] == "request_id_taken"
        and "completed" not in answer.text
        and "status" not in answer.json()
        and answer_text not in answer.text
    )


async def test_requests_without_an_owner_are_shown_to_nobody_with_api_keys_on(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    nobodys, as_a = f"kafka-{unique}", f"kafka-a-{unique}"
    async with running_worker(settings, simulator.url, f"g-{unique}", tmp_path):
        # Straight to Kafka: one without client_id, one that says it is client a's.
        await produce_requests(
            settings,
            [request(nobodys, text="nobody's"), request(as_a, text="a's", client_id="a")],
        )
        async with in_process_ingress(ingress_settings(settings)) as open_ingress:
            # Submitted through the ingress while authentication was off.
            submitted = await open_ingress.post(
                "/v1/requests", json=chat_body("while off"), headers={"Idempotency-Key": "off-1"}
            )
            assert submitted.status_code == 202
            for request_id in (nobodys, as_a, "off-1"):
                assert (await completed(open_ingress, request_id))["status"] == "completed"

    async with in_process_ingress(ingress_settings(settings, api_keys=API_KEYS)) as client:
        gets = {
            (rid, who): (await client.get(f"/v1/requests/{rid}", headers=key)).status_code
            for rid in (nobodys, "off-1", as_a)
            for who, key in (("a", A), ("b", B))
        }
        posts = {
            (rid, key["X-API-Key"]): await client.post(
                "/v1/requests", json={**chat_body(text), "request_id": rid}, headers=key
            )
            for rid, text, key in (
                (nobodys, "nobody's", A),
                ("off-1", "while off", A),
                (as_a, "a's", B),
            )
        }
        chats = {
            (rid, key["X-API-Key"]): await client.post(
                "/v1/chat/completions",
                json=chat_body(text),
                headers={**key, "Idempotency-Key": rid},
            )
            for rid, text, key in (
                (nobodys, "nobody's", A),
                ("off-1", "while off", B),
                (as_a, "a's", B),
            )
        }
        owner_chat = await client.post(
            "/v1/chat/completions", json=chat_body("a's"), headers={**A, "Idempotency-Key": as_a}
        )
    async with in_process_ingress(ingress_settings(settings)) as open_ingress:
        without_auth = (await open_ingress.get(f"/v1/requests/{nobodys}")).json()

    assert gets == {
        (nobodys, "a"): 404,
        (nobodys, "b"): 404,
        ("off-1", "a"): 404,
        ("off-1", "b"): 404,
        (as_a, "a"): 200,  # its outcome says it is a's
        (as_a, "b"): 404,
    }
    for (rid, _), answer in {**posts, **chats}.items():
        assert says_nothing_about_it(answer, "echo: "), (rid, answer.text)
    assert owner_chat.status_code == 200, owner_chat.text
    assert owner_chat.json()["choices"][0]["message"]["content"] == "echo: a's"
    # With authentication off everything stays visible, as before.
    assert (without_auth["status"], without_auth["response"]["content"]) == (
        "completed",
        "echo: nobody's",
    )


async def test_wrong_keys_from_one_address_get_429_once_its_budget_is_spent(
    settings: ServiceSettings,
) -> None:
    limited = {"auth_failures_per_minute": 1, "auth_failures_burst": 3}
    async with in_process_ingress(
        ingress_settings(settings, api_keys=API_KEYS, **limited)
    ) as client:
        failures = [
            (await client.get("/v1/requests/x", headers=headers)).status_code
            for headers in ({"X-API-Key": "sk-guess-1"}, {"X-API-Key": "sk-guess-2"}, {})
        ]
        refused = await client.get("/v1/requests/x", headers={"X-API-Key": "sk-guess-3"})
        # A valid key from that address still gets in: behind a NAT or a load balancer many
        # clients share it, and one guessing must not lock the others out.
        right_key = await client.get("/v1/requests/x", headers=A)
    async with in_process_ingress(
        ingress_settings(settings, api_keys=API_KEYS, **limited)
    ) as other_replica_same_redis:
        still_refused = await other_replica_same_redis.get(
            "/v1/requests/x", headers={"X-API-Key": "sk-guess-4"}
        )

    assert failures == [403, 403, 401]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_auth_failures"
    # One failure a minute after a burst of three: the next is allowed within a minute.
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert right_key.status_code == 404  # authenticated: the request is simply unknown
    assert still_refused.status_code == 429  # the budget is in Redis, shared by replicas


async def test_a_wrong_key_is_refused_before_the_body_is_read(settings: ServiceSettings) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):  # 8 MiB, sent only if the server asks for it
            read.append(b"")
            yield b"x" * (128 * 1024)

    async with in_process_ingress(ingress_settings(settings, api_keys=API_KEYS)) as client:
        streamed = await client.post(
            "/v1/requests",
            content=body(),
            headers={"X-API-Key": "sk-nope", "Content-Type": "application/json"},
        )
    app = create_app(ingress_settings(settings, api_keys=API_KEYS))
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as http:
        not_json = b"{this is not json"
        json_headers = {"Content-Type": "application/json"}
        wrong = await http.post(
            "/v1/requests", content=not_json, headers={**json_headers, "X-API-Key": "sk-nope"}
        )
        missing = await http.post("/v1/chat/completions", content=not_json, headers=json_headers)
        right = await http.post(
            "/v1/requests", content=not_json, headers={**json_headers, "X-API-Key": KEY_A}
        )

    assert streamed.status_code == 403
    assert read == []  # not one chunk of the body was asked for
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (403, "invalid_api_key")
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert right.status_code == 422  # with the right key, the body is read and found wanting


async def test_clients_are_not_told_provider_endpoints_or_the_configured_providers(
    services: Services,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    unique: str,
) -> None:
    env = without_provider_env(monkeypatch)
    env.setenv("LLMSTREAM_PROVIDERS", down_provider())  # "down": a port nobody listens on
    refused, unknown = f"down-{unique}", f"unknown-{unique}"
    worker = worker_settings(
        services.redis_url,
        redis_key_prefix=settings.redis_key_prefix,
        result_ttl_s=600,
        max_queue_s=0.5,
        circuit_min_failures=1,
        circuit_cooldown_s=300,
    )
    async with rig(simulator, worker) as r:
        await r.process(request(refused, model="down/m", text="down", client_id="a"))
        await r.process(request(unknown, model="mistral/large", text="who", client_id="a"))
        operator_messages = {e.request_id: e.message for e in r.errors()}

    async with in_process_ingress(ingress_settings(settings, api_keys=API_KEYS)) as client:
        got = {
            rid: await client.get(f"/v1/requests/{rid}", headers=A) for rid in (refused, unknown)
        }
        chats = {
            rid: await client.post(
                "/v1/chat/completions",
                json={**chat_body(text), "model": model},
                headers={**A, "Idempotency-Key": rid},
            )
            for rid, text, model in ((refused, "down", "down/m"), (unknown, "who", "mistral/large"))
        }

    # The operator's llm-errors keeps the whole story.
    assert "http://127.0.0.1:" in operator_messages[refused]
    assert "known providers: " in operator_messages[unknown]
    for rid, answer in {**got, **chats}.items():
        assert answer.status_code in (200, 400, 502, 503), (rid, answer.text)
        text = json.dumps(answer.json())
        assert "127.0.0.1" not in text and "http://" not in text, text
        assert "known providers" not in text and "anthropic" not in text, text
    error = got[refused].json()["error"]
    assert (error["error_type"], error["provider"]) == ("provider_unavailable", "down")
    assert error["message"] == "the provider could not be reached in time; retry later"
    assert chats[refused].status_code == 503
    assert chats[unknown].json()["error"]["code"] == "invalid_request"
