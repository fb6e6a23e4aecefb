"""Sessions through the ingress: a session's requests keyed by its ID, a client kept to its own
sessions, and (with a real worker) a session's requests answered in order, each after the
history so far. Against the real broker, Redis and HTTP over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from llmstream.core.connections import redis_client
from llmstream.core.sessions import SessionStore
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from tests.harness import running_worker, serve_app
from tests.samples import response_to
from tests.test_ingress import API_KEYS, KEY_A, KEY_B
from tests.test_ingress_streaming import streaming_settings
from tests.test_ingress_tools import MODEL, published, sdk_client, stand_in

pytestmark = pytest.mark.integration

AS_A = {"Authorization": f"Bearer {KEY_A}"}
AS_B = {"Authorization": f"Bearer {KEY_B}"}


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def outcome(http: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    """``GET /v1/requests/{id}`` once it is no longer pending (or after 60 s)."""
    for _ in range(600):
        status: dict[str, Any] = (await http.get(f"/v1/requests/{request_id}")).json()
        if status["status"] != "pending":
            break
        await asyncio.sleep(0.1)
    return status


@pytest.fixture
def ingress(settings: ServiceSettings, unique: str) -> IngressSettings:
    return streaming_settings(settings, unique)


async def test_a_sessions_requests_are_keyed_by_the_session_id_from_both_endpoints(
    ingress: IngressSettings,
) -> None:
    async with (
        serve_app(create_app(ingress)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        sdk_client(url) as sdk,
    ):
        batch = {
            "requests": [
                body("one", request_id="s-1", session_id="conv-1"),
                body("alone", request_id="n-1"),
                body("two", request_id="s-2", session_id="conv-1"),
            ]
        }
        accepted = await http.post("/v1/requests", json=batch)
        # The ingress creates nothing: the worker makes the session with its first answer.
        before_any_answer = await http.get("/v1/sessions/conv-1")
        worker = asyncio.create_task(stand_in(ingress, "s-3", lambda r: response_to(r, "ok")))
        answer = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "three"}],
            extra_headers={"Idempotency-Key": "s-3"},
            extra_body={"session_id": "conv-1"},
        )
        await worker
    assert accepted.status_code == 202, accepted.text
    assert before_any_answer.status_code == 404
    assert answer.choices[0].message.content == "ok"
    events = await published(ingress, lambda got: len(got) >= 4)
    keys = {r.request_id: key for key, _, r in events}
    assert keys == {"s-1": b"conv-1", "n-1": b"n-1", "s-2": b"conv-1", "s-3": b"conv-1"}
    in_session = [(partition, r.request_id) for _, partition, r in events if r.session_id]
    # One partition, in the order published: what the worker answers them in.
    assert len({partition for partition, _ in in_session}) == 1
    assert [request_id for _, request_id in in_session] == ["s-1", "s-2", "s-3"]


async def test_a_client_cannot_use_another_clients_session(ingress: IngressSettings) -> None:
    settings = ingress.model_copy(update={"api_keys": API_KEYS})
    registry = CollectorRegistry()
    async with (
        serve_app(create_app(settings, registry=registry)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        sdk_client(url) as sdk_b,
    ):
        sdk_b.api_key = KEY_B
        created = await http.post("/v1/sessions", headers=AS_A)
        session_id = created.json()["id"]
        b_reads = await http.get(f"/v1/sessions/{session_id}", headers=AS_B)
        with pytest.raises(openai.NotFoundError) as b_chats:
            await sdk_b.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "let me in"}],
                extra_body={"session_id": session_id},
            )
        b_submits = await http.post(
            "/v1/requests",
            json={"requests": [body("mine"), body("theirs", session_id=session_id)]},
            headers=AS_B,
        )
        b_streams = await http.post(
            "/v1/chat/completions",
            json=body("streamed", session_id=session_id, stream=True),
            headers=AS_B,
        )
        a_submits = await http.post(
            "/v1/requests", json=body("mine", request_id="a-1", session_id=session_id), headers=AS_A
        )
    assert created.status_code == 201
    assert b_reads.status_code == 404
    assert b_chats.value.status_code == 404
    assert b_submits.status_code == 404 and b_streams.status_code == 404
    assert b_submits.json()["error"]["param"] == "requests.1.session_id"
    assert b_streams.json()["error"]["param"] == "session_id"
    assert a_submits.status_code == 202, a_submits.text
    # Only a's request was published; b's were refused before anything was.
    assert registry.get_sample_value("llmstream_ingress_published_total") == 1
    events = await published(settings, lambda got: len(got) >= 1)
    assert [(key, r.request_id, r.client_id) for key, _, r in events] == [
        (session_id.encode(), "a-1", "a")
    ]


async def test_without_api_keys_a_session_of_another_client_id_is_refused(
    ingress: IngressSettings,
) -> None:
    redis = redis_client(ingress)
    try:
        sessions = SessionStore(redis, key_prefix=ingress.redis_key_prefix, params=ingress)
        session = await sessions.create("team-x")
    finally:
        await redis.aclose()
    async with (
        serve_app(create_app(ingress)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        nobody = await http.post("/v1/requests", json=body("hi", session_id=session.id))
        other = await http.post(
            "/v1/requests", json=body("hi", session_id=session.id, client_id="team-y")
        )
        owner = await http.post(
            "/v1/requests", json=body("hi", session_id=session.id, client_id="team-x")
        )
    for refused in (nobody, other):
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("session_id", "session_of_another_client")
    assert owner.status_code == 202, owner.text


# -- through a real worker and the provider simulator --------------------------------------------


async def test_a_sessions_requests_are_answered_in_order_each_after_the_history(
    ingress: IngressSettings,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
) -> None:
    keyed = ingress.model_copy(update={"api_keys": API_KEYS})
    session_id = f"conv-{unique}"
    questions = ["first question here", "the second one", "and a third"]
    async with (
        running_worker(settings, simulator.url, f"g-{unique}", tmp_path),
        serve_app(create_app(keyed)) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=AS_A) as http,
        sdk_client(url, timeout=60) as sdk,
    ):
        sdk.api_key = KEY_A
        # Two requests of one session, produced back to back: the second is published before
        # the first is answered.
        batch = [
            body(q, request_id=f"{unique}-{i}", session_id=session_id)
            for i, q in enumerate(questions[:2])
        ]
        accepted = await http.post("/v1/requests", json={"requests": batch})
        first, second = [await outcome(http, f"{unique}-{i}") for i in range(2)]
        # The third through the openai SDK, naming the session in extra_body.
        third = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": questions[2]}],
            extra_body={"session_id": session_id},
        )
        history = (await http.get(f"/v1/sessions/{session_id}")).json()
        b_reads = await http.get(f"/v1/sessions/{session_id}", headers=AS_B)
        b_uses = await http.post(
            "/v1/chat/completions", json=body("me too", session_id=session_id), headers=AS_B
        )
    assert accepted.status_code == 202, accepted.text
    answers = [first["response"], second["response"]]
    assert [a["content"] for a in answers] == [f"echo: {q}" for q in questions[:2]]
    assert third.choices[0].message.content == f"echo: {questions[2]}"
    # The simulator counts a prompt's words: the second saw the first's question and answer,
    # the third both turns before it.
    words = [len(q.split()) for q in questions]
    echoed = [w + 1 for w in words]  # "echo: " and the question
    assert answers[0]["prompt_tokens"] == words[0]
    assert answers[1]["prompt_tokens"] == words[0] + echoed[0] + words[1]
    assert answers[0]["completed_at_ms"] <= answers[1]["completed_at_ms"]
    assert third.usage is not None
    assert third.usage.prompt_tokens == words[0] + echoed[0] + words[1] + echoed[1] + words[2]
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        (role, text) for q in questions for role, text in (("user", q), ("assistant", f"echo: {q}"))
    ]
    assert history["request_count"] == 3
    assert b_reads.status_code == 404 and b_uses.status_code == 404
