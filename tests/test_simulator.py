"""The provider simulator, spoken to over loopback HTTP like any client would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from tests.inprocess import sim_http

# The http fixture: a client of this module's sim, reset around each test.
__all__ = ["sim_http"]

OPENAI_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello simulated world"},
    ],
}
ANTHROPIC_BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "system": "be brief",
    "messages": [{"role": "user", "content": "hello simulated world"}],
}
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=1)) as server:
        yield server


def rid() -> dict[str, str]:
    return {"X-Client-Request-Id": f"sim-{uuid.uuid4().hex}"}


async def openai_call(
    http: httpx.AsyncClient, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post("/v1/chat/completions", json=OPENAI_BODY, headers=headers or {})


async def anthropic_call(
    http: httpx.AsyncClient, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(
        "/v1/messages", json=ANTHROPIC_BODY, headers={**ANTHROPIC_HEADERS, **(headers or {})}
    )


async def test_openai_response_shape(http: httpx.AsyncClient) -> None:
    response = await openai_call(http)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["id"].startswith("chatcmpl-")
    assert (data["object"], data["model"]) == ("chat.completion", "gpt-4o-mini")
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello simulated world"
    assert choice["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 5
    assert data["usage"]["completion_tokens"] == 4
    assert data["usage"]["total_tokens"] == 9
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


async def test_anthropic_response_shape(http: httpx.AsyncClient) -> None:
    response = await anthropic_call(http)

    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("msg_")
    assert (data["type"], data["role"], data["model"]) == (
        "message",
        "assistant",
        "claude-sonnet-4-5",
    )
    assert data["content"] == [{"type": "text", "text": "echo: hello simulated world"}]
    assert (data["stop_reason"], data["stop_sequence"]) == ("end_turn", None)
    assert data["usage"]["input_tokens"] == 5
    assert data["usage"]["output_tokens"] == 4


async def test_stop_sequences_and_max_tokens(http: httpx.AsyncClient) -> None:
    stopped = await http.post(
        "/v1/messages",
        json={**ANTHROPIC_BODY, "stop_sequences": ["simulated"]},
        headers=ANTHROPIC_HEADERS,
    )
    cut = await http.post("/v1/chat/completions", json={**OPENAI_BODY, "max_tokens": 2})

    assert stopped.json()["content"][0]["text"] == "echo: hello "
    assert (stopped.json()["stop_reason"], stopped.json()["stop_sequence"]) == (
        "stop_sequence",
        "simulated",
    )
    assert cut.json()["choices"][0]["message"]["content"] == "echo: hello"
    assert cut.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (
            {**ANTHROPIC_BODY, "messages": [{"role": "system", "content": "x"}]},
            ANTHROPIC_HEADERS,
            'Unexpected role "system"',
        ),
        (
            {k: v for k, v in ANTHROPIC_BODY.items() if k != "max_tokens"},
            ANTHROPIC_HEADERS,
            "max_tokens",
        ),
        (ANTHROPIC_BODY, {}, "anthropic-version"),
    ],
)
async def test_anthropic_rejects_what_the_real_api_rejects(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str], fragment: str
) -> None:
    response = await http.post("/v1/messages", json=body, headers=headers)

    assert response.status_code == 400
    data = response.json()
    assert (data["type"], data["error"]["type"]) == ("error", "invalid_request_error")
    assert fragment in data["error"]["message"]


async def test_openai_rejects_a_body_without_messages(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={"model": "m", "messages": []})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_rpm_limit_answers_429_with_both_headers(http: httpx.AsyncClient) -> None:
    await http.post("/_sim/config", json={"rpm_limit": 3})

    statuses = [(await openai_call(http)).status_code for _ in range(3)]
    limited = await openai_call(http)
    limited_anthropic = await anthropic_call(http)

    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    seconds = int(limited.headers["retry-after"])
    millis = int(limited.headers["retry-after-ms"])
    assert 59 <= seconds <= 60 and 58_000 < millis <= 60_000
    assert seconds == -(-millis // 1000)  # whole seconds, rounded up
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited_anthropic.status_code == 429
    assert limited_anthropic.json()["error"]["type"] == "rate_limit_error"
    assert "retry-after-ms" in limited_anthropic.headers


async def test_scripted_responses_in_order_then_success(http: httpx.AsyncClient) -> None:
    headers = rid()
    await http.post(
        "/_sim/script",
        json={
            "request_id": headers["X-Client-Request-Id"],
            "responses": [{"status": 500}, {"status": 429, "retry_after": 1.5}, {"status": 400}],
        },
    )

    answers = [await openai_call(http, headers) for _ in range(4)]
    other = await openai_call(http, rid())

    assert [a.status_code for a in answers] == [500, 429, 400, 200]
    assert (answers[1].headers["retry-after"], answers[1].headers["retry-after-ms"]) == (
        "2",
        "1500",
    )
    assert "retry-after" not in answers[0].headers
    assert answers[0].json()["error"]["type"] == "server_error"
    assert other.status_code == 200


async def test_scripted_anthropic_errors_use_its_format(http: httpx.AsyncClient) -> None:
    headers = rid()
    await http.post(
        "/_sim/script",
        json={"request_id": headers["X-Client-Request-Id"], "responses": [{"status": 529}]},
    )

    response = await anthropic_call(http, headers)

    assert response.status_code == 529
    data = response.json()
    assert (data["type"], data["error"]["type"]) == ("error", "overloaded_error")
    assert data["request_id"].startswith("req_")


async def test_stats_count_per_request_id_and_reset(http: httpx.AsyncClient) -> None:
    first, second = rid(), rid()
    await http.post(
        "/_sim/script",
        json={"request_id": second["X-Client-Request-Id"], "responses": [{"status": 503}]},
    )
    for headers in (first, first, second, {}):
        await openai_call(http, headers)
    await anthropic_call(http, first)

    stats = (await http.get("/_sim/stats")).json()
    await http.post("/_sim/reset")
    after = (await http.get("/_sim/stats")).json()

    assert stats["calls_total"] == 5
    assert stats["calls_by_request_id"] == {
        first["X-Client-Request-Id"]: 3,
        second["X-Client-Request-Id"]: 1,
        "": 1,
    }
    assert stats["status_counts"] == {"200": 4, "503": 1}
    assert (after["calls_total"], after["calls_by_request_id"], after["status_counts"]) == (
        0,
        {},
        {},
    )


async def test_calls_outlive_clients_that_gave_up(
    http: httpx.AsyncClient, sim: SimulatorServer
) -> None:
    # A provider keeps working (and billing) after the client hangs up; so does the simulator.
    # Each answer takes 5 s; each client hangs up once the simulator has its call (not after a
    # fixed time, which on a loaded machine can pass before the call arrives), so the five
    # calls are all still being answered when the test looks.
    await http.post("/_sim/config", json={"latency_ms": 5000, "latency_jitter": 0})
    ids = [rid() for _ in range(5)]
    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as impatient:
        for n, headers in enumerate(ids, start=1):
            call = asyncio.create_task(openai_call(impatient, headers))
            async with asyncio.timeout(30):
                while (await http.get("/_sim/stats")).json()["in_flight"] < n:
                    await asyncio.sleep(0.01)
            call.cancel()  # the client gives up; the connection closes
            with pytest.raises(asyncio.CancelledError):
                await call
    during = (await http.get("/_sim/stats")).json()
    calls_during = (await http.get("/_sim/calls")).json()["calls"]
    async with asyncio.timeout(60):
        while (after := (await http.get("/_sim/stats")).json())["completed_total"] < 5:
            await asyncio.sleep(0.2)
    calls_after = (await http.get("/_sim/calls")).json()["calls"]

    assert (during["in_flight"], during["completed_total"]) == (5, 0)
    assert [c["request_id"] for c in calls_during] == [h["X-Client-Request-Id"] for h in ids]
    assert [(c["finished"], c["status"], c["api"]) for c in calls_during] == [
        (False, None, "openai")
    ] * 5
    assert (after["in_flight"], after["completed_total"], after["calls_total"]) == (0, 5, 5)
    assert [(c["finished"], c["status"]) for c in calls_after] == [(True, 200)] * 5


async def test_reset_drops_scripts_and_config(http: httpx.AsyncClient) -> None:
    headers = rid()
    await http.post(
        "/_sim/script",
        json={"request_id": headers["X-Client-Request-Id"], "responses": [{"status": 500}]},
    )
    await http.post("/_sim/config", json={"error_rate": 1.0})

    await http.post("/_sim/reset")

    assert (await openai_call(http, headers)).status_code == 200
    assert (await openai_call(http)).status_code == 200


async def test_runtime_config_error_rate_and_latency(http: httpx.AsyncClient) -> None:
    config = (await http.post("/_sim/config", json={"error_rate": 1.0})).json()
    failing = [(await openai_call(http)).status_code for _ in range(5)]
    await http.post(
        "/_sim/config", json={"error_rate": 0.0, "latency_ms": 150, "latency_jitter": 0}
    )
    started = time.perf_counter()
    slow = await anthropic_call(http)
    elapsed = time.perf_counter() - started

    assert config["error_rate"] == 1.0
    assert failing == [500] * 5
    assert slow.status_code == 200
    assert 0.14 <= elapsed < 1.0


async def test_invalid_control_input_is_rejected(http: httpx.AsyncClient) -> None:
    bad_config = await http.post("/_sim/config", json={"error_rate": 2})
    bad_script = await http.post(
        "/_sim/script", json={"request_id": "x", "responses": [{"status": 99}]}
    )

    assert (bad_config.status_code, bad_script.status_code) == (400, 400)


async def test_api_key_required_in_each_format() -> None:
    settings = SimulatorSettings(port=0, latency_ms=0, api_key=SecretStr("k-123"))
    async with SimulatorServer(settings) as server, httpx.AsyncClient(base_url=server.url) as http:
        no_key = await openai_call(http)
        bearer = await openai_call(http, {"Authorization": "Bearer k-123"})
        wrong = await anthropic_call(http, {"x-api-key": "nope"})
        right = await anthropic_call(http, {"x-api-key": "k-123"})

    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert bearer.status_code == 200
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200


async def test_many_in_flight_are_served_concurrently() -> None:
    # aiohttp's client: httpx's default transport is itself too slow at 300 in flight.
    settings = SimulatorSettings(port=0, latency_ms=200, latency_jitter=0.2)
    connector = aiohttp.TCPConnector(limit=500)
    async with (
        SimulatorServer(settings) as server,
        aiohttp.ClientSession(connector=connector) as session,
    ):

        async def call() -> int:
            url = f"{server.url}/v1/chat/completions"
            async with session.post(url, json=OPENAI_BODY) as response:
                await response.read()
                return response.status

        started = time.perf_counter()
        statuses = await asyncio.gather(*(call() for _ in range(300)))
        elapsed = time.perf_counter() - started

    assert statuses == [200] * 300
    assert elapsed < 1.5  # serially: 60 s


def test_settings_from_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_SIM_PORT", "9100")
    monkeypatch.setenv("LLMSTREAM_SIM_LATENCY_MS", "50")
    monkeypatch.setenv("LLMSTREAM_SIM_RPM_LIMIT", "600")
    monkeypatch.setenv("LLMSTREAM_SIM_STREAM_CHUNKS", "3")
    monkeypatch.setenv("LLMSTREAM_SIM_STREAM_BREAK_RATE", "0.25")

    from_env = SimulatorSettings()
    explicit = SimulatorSettings(port=0, latency_ms=0)

    assert (from_env.port, from_env.latency_ms, from_env.rpm_limit) == (9100, 50.0, 600)
    assert (from_env.host, from_env.latency_jitter, from_env.error_rate) == ("127.0.0.1", 0.2, 0.0)
    assert (from_env.stream_chunks, from_env.stream_break_rate) == (3, 0.25)
    fields = SimulatorSettings.model_fields
    assert (fields["stream_chunks"].default, fields["stream_chunk_delay_ms"].default) == (8, 20.0)
    assert (explicit.port, explicit.latency_ms) == (0, 0.0)
    assert SimulatorSettings.model_fields["port"].default == 8090


async def test_url_before_start_is_an_error() -> None:
    server = SimulatorServer(SimulatorSettings(port=0))

    with pytest.raises(RuntimeError):
        _ = server.url
