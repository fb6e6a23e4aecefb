"""Provider adapters, the router and the provider settings.

Two kinds of counterpart: the simulator over loopback HTTP (through the real `httpx-aiohttp`
transport), and the providers' documented payloads in `tests/payloads/` replayed with
`httpx.MockTransport`, which also captures exactly what the adapters send.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from httpx_aiohttp import HttpxAiohttpClient
from pydantic import SecretStr, ValidationError

import llmstream.processors.providers as providers_module
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.providers import (
    Completion,
    ProviderError,
    ProviderRouter,
    create_http_client,
)
from llmstream.processors.providers.anthropic import AnthropicMessages
from llmstream.processors.providers.http import HTTPAdapter
from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.providers.settings import ProviderSettings, build_router
from llmstream.schemas.models import LLMRequest
from tests.inprocess import without_provider_env

PAYLOADS = Path(__file__).parent / "payloads"
OPENAI_KEY = "sk-test-OPENAI-4f9bb533cc24deadbeef"
ANTHROPIC_KEY = "sk-ant-test-ANTHROPIC-0123456789abcdef"


def make_request(**overrides: Any) -> LLMRequest:
    fields: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there world"}],
    }
    fields.update(overrides)
    return LLMRequest.model_validate(fields)


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PAYLOADS / name).read_text())
    return data


def replay(name: str, seen: list[httpx.Request] | None = None) -> httpx.AsyncClient:
    """A client whose every call is answered with the recorded payload ``name``."""
    recorded = payload(name)

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(
            recorded["status"], headers=recorded["headers"], content=orjson.dumps(recorded["body"])
        )

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


# wire → (adapter, the real API's base URL, the simulator's base path, a test key)
WIRES: dict[str, tuple[type[HTTPAdapter], str, str, str]] = {
    "openai": (OpenAICompatible, "https://api.openai.com/v1", "/v1", OPENAI_KEY),
    "anthropic": (AnthropicMessages, "https://api.anthropic.com", "", ANTHROPIC_KEY),
}


def documented(wire: str, client: httpx.AsyncClient) -> HTTPAdapter:
    """The ``wire`` adapter at the real API's URL with a test key, for replayed payloads."""
    adapter, base_url, _, key = WIRES[wire]
    return adapter(wire, client, base_url, SecretStr(key))


# --- against the simulator, over loopback ----------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=1)) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def keyed_sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, api_key=SecretStr("right-key-123456"))
    async with SimulatorServer(settings) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    http = create_http_client(timeout_s=5.0, max_connections=200)
    yield http
    await http.aclose()


async def script(sim: SimulatorServer, request_id: str, *responses: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as control:
        answer = await control.post(
            f"{sim.url}/_sim/script", json={"request_id": request_id, "responses": responses}
        )
        answer.raise_for_status()


def simulated(
    wire: str, sim: SimulatorServer, client: httpx.AsyncClient, key: str | None = None
) -> HTTPAdapter:
    """The ``wire`` adapter pointed at the simulator."""
    adapter, _, path, _ = WIRES[wire]
    return adapter(wire, client, f"{sim.url}{path}", SecretStr(key) if key else None)


@pytest.mark.parametrize(
    ("wire", "messages", "expected"),
    [
        (
            "openai",
            [{"role": "user", "content": "what is kafka"}],
            Completion("echo: what is kafka", "stop", 3, 4, 7, "openai", "gpt-4o-mini"),
        ),
        # The simulator rejects a "system" role inside messages with a 400, as Anthropic does,
        # and counts the top-level system prompt in input_tokens: 2 + 3 words proves both.
        (
            "anthropic",
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there world"},
            ],
            Completion("echo: hello there world", "stop", 5, 4, 9, "anthropic", "claude-4-5"),
        ),
    ],
)
async def test_success_through_simulator(
    sim: SimulatorServer,
    client: httpx.AsyncClient,
    wire: str,
    messages: list[dict[str, str]],
    expected: Completion,
) -> None:
    request = make_request(messages=messages)

    completion = await simulated(wire, sim, client).complete(request, expected.model)

    assert completion == expected


@pytest.mark.parametrize(
    ("wire", "extra", "content", "finish_reason"),
    [
        ("openai", {"max_tokens": 2}, "echo: hello", "length"),
        ("openai", {"stop": ["there"]}, "echo: hello ", "stop"),
        ("anthropic", {"max_tokens": 2}, "echo: hello", "length"),  # max_tokens → length
        ("anthropic", {"stop": ["there"]}, "echo: hello ", "stop"),  # stop_sequence → stop
        ("anthropic", {}, "echo: hello there world", "stop"),  # end_turn → stop
    ],
)
async def test_finish_reason_through_simulator(
    sim: SimulatorServer,
    client: httpx.AsyncClient,
    wire: str,
    extra: dict[str, Any],
    content: str,
    finish_reason: str,
) -> None:
    completion = await simulated(wire, sim, client).complete(make_request(**extra), "m")

    assert (completion.content, completion.finish_reason) == (content, finish_reason)
    if "max_tokens" in extra:
        assert completion.completion_tokens == extra["max_tokens"]


@pytest.mark.parametrize(
    ("wire", "scripted", "error_type", "retryable", "retry_after", "kind"),
    [
        ("openai", {"status": 400}, "invalid_request", False, None, "invalid_request_error"),
        ("anthropic", {"status": 400}, "invalid_request", False, None, "invalid_request_error"),
        # retry-after-ms (1500) is preferred over the whole-second Retry-After (2).
        ("openai", {"status": 429, "retry_after": 1.5}, "rate_limited", True, 1.5, "requests"),
        (
            "anthropic",
            {"status": 429, "retry_after": 1.5},
            "rate_limited",
            True,
            1.5,
            "rate_limit_error",
        ),
        ("openai", {"status": 500}, "provider_error", True, None, "server_error"),
        ("anthropic", {"status": 500}, "provider_error", True, None, "api_error"),
        ("anthropic", {"status": 529}, "provider_error", True, None, "overloaded_error"),
        # Anthropic's error type says more than the status: its 504 is a timeout.
        ("anthropic", {"status": 504}, "timeout", True, None, "timeout_error"),
        ("openai", {"status": 504}, "provider_error", True, None, "server_error"),
    ],
)
async def test_error_statuses_from_simulator_are_classified(
    sim: SimulatorServer,
    client: httpx.AsyncClient,
    wire: str,
    scripted: dict[str, Any],
    error_type: str,
    retryable: bool,
    retry_after: float | None,
    kind: str,
) -> None:
    request = make_request()
    await script(sim, request.request_id, scripted)

    with pytest.raises(ProviderError) as caught:
        await simulated(wire, sim, client).complete(request, "m")

    error = caught.value
    assert (error.status_code, error.error_type) == (scripted["status"], error_type)
    assert (error.retryable, error.retry_after, error.provider) == (retryable, retry_after, wire)
    assert f"HTTP {scripted['status']}" in str(error) and kind in str(error)
    assert error.body is not None and kind in error.body


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_wrong_key_is_auth_error_and_right_key_works(
    keyed_sim: SimulatorServer, client: httpx.AsyncClient, wire: str
) -> None:
    wrong = "wrong-key-SECRET-987654321"

    with pytest.raises(ProviderError) as caught:
        await simulated(wire, keyed_sim, client, wrong).complete(make_request(), "m")
    right = simulated(wire, keyed_sim, client, "right-key-123456")
    completion = await right.complete(make_request(), "m")

    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (401, "auth_error", False)
    assert wrong not in str(error) and wrong not in repr(error)
    assert completion.content == "echo: hello there world"


async def test_connection_refused_is_retryable_connection_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The port is closed again: nothing listens there.
    adapter = OpenAICompatible("openai", client, f"http://127.0.0.1:{port}/v1")

    with pytest.raises(ProviderError) as caught:
        await adapter.complete(make_request(), "m")

    assert (caught.value.error_type, caught.value.retryable) == ("connection_error", True)
    assert caught.value.status_code is None


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_timeout_is_retryable(sim: SimulatorServer, wire: str) -> None:
    request = make_request()
    await script(sim, request.request_id, {"status": 200, "delay_ms": 3000})
    http = create_http_client(timeout_s=0.2, max_connections=10)
    adapter = simulated(wire, sim, http)
    try:
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(request, "m")
    finally:
        await http.aclose()

    assert (caught.value.error_type, caught.value.retryable) == ("timeout", True)


async def test_request_id_reaches_the_provider(
    sim: SimulatorServer, client: httpx.AsyncClient
) -> None:
    request = make_request()

    await simulated("openai", sim, client).complete(request, "m")
    await simulated("anthropic", sim, client).complete(request, "m")

    async with httpx.AsyncClient() as control:
        stats = (await control.get(f"{sim.url}/_sim/stats")).json()
    assert stats["calls_by_request_id"][request.request_id] == 2


async def test_shared_client_carries_hundreds_in_flight() -> None:
    settings = SimulatorSettings(port=0, latency_ms=200, latency_jitter=0)
    http = create_http_client(timeout_s=10, max_connections=500)
    try:
        async with SimulatorServer(settings) as server:
            adapter = simulated("openai", server, http)
            started = time.perf_counter()
            done = await asyncio.gather(
                *(adapter.complete(make_request(), "m") for _ in range(300))
            )
            elapsed = time.perf_counter() - started
    finally:
        await http.aclose()

    assert isinstance(http, HttpxAiohttpClient)
    assert len(done) == 300
    # Serially this is 60 s; concurrently a little over one 200 ms round trip.
    assert elapsed < 2.0


# --- against the providers' documented payloads -----------------------------------------------


@pytest.mark.parametrize(
    ("wire", "name", "expected"),
    [
        (
            "openai",
            "openai_chat_completion.json",
            Completion(
                "Hello! How can I assist you today?",
                "stop",
                19,
                10,
                29,
                "openai",
                "gpt-4.1-2025-04-14",
            ),
        ),
        (
            "anthropic",
            "anthropic_message.json",
            Completion(
                "Hi! My name is Claude.",
                "stop",
                2095,
                503,
                2598,
                "anthropic",
                "claude-3-7-sonnet-20250219",
            ),
        ),
    ],
)
async def test_documented_success_body_is_read(wire: str, name: str, expected: Completion) -> None:
    async with replay(name) as http:
        completion = await documented(wire, http).complete(make_request(), "requested")

    assert completion == expected


async def test_anthropic_joins_text_blocks_and_counts_cache_tokens() -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hello, "},
            {"type": "text", "text": "world."},
        ],
        "stop_reason": "refusal",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100,
            "output_tokens": 7,
        },
    }
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    async with httpx.AsyncClient(transport=transport) as http:
        completion = await documented("anthropic", http).complete(make_request(), "claude")

    assert completion.content == "Hello, world."
    assert completion.finish_reason == "refusal"  # unknown reasons are kept as they are
    assert (completion.prompt_tokens, completion.completion_tokens, completion.total_tokens) == (
        115,
        7,
        122,
    )


ERROR_CASES = [
    # payload, adapter, error_type, retryable, retry_after
    ("openai_error_400_context_length.json", "openai", "invalid_request", False, None),
    ("openai_error_401_invalid_api_key.json", "openai", "auth_error", False, None),
    ("openai_error_404_model_not_found.json", "openai", "not_found", False, None),
    ("openai_error_429_rate_limit.json", "openai", "rate_limited", True, None),
    ("openai_error_429_insufficient_quota.json", "openai", "rate_limited", False, None),
    ("openai_error_500_server_error.json", "openai", "provider_error", True, None),
    ("openai_error_503_overloaded.json", "openai", "provider_error", True, None),
    ("openrouter_error_402_insufficient_credits.json", "openai", "provider_error", False, None),
    ("anthropic_error_400_invalid_request.json", "anthropic", "invalid_request", False, None),
    ("anthropic_error_401_authentication.json", "anthropic", "auth_error", False, None),
    ("anthropic_error_403_permission.json", "anthropic", "auth_error", False, None),
    ("anthropic_error_404_not_found.json", "anthropic", "not_found", False, None),
    ("anthropic_error_429_rate_limit.json", "anthropic", "rate_limited", True, 30.0),
    ("anthropic_error_429_spend_limit.json", "anthropic", "rate_limited", False, None),
    ("anthropic_error_500_api_error.json", "anthropic", "provider_error", True, None),
    ("anthropic_error_529_overloaded.json", "anthropic", "provider_error", True, None),
]


@pytest.mark.parametrize(("name", "wire", "error_type", "retryable", "retry_after"), ERROR_CASES)
async def test_documented_error_bodies_are_classified(
    name: str, wire: str, error_type: str, retryable: bool, retry_after: float | None
) -> None:
    recorded = payload(name)
    async with replay(name) as http:
        with pytest.raises(ProviderError) as caught:
            await documented(wire, http).complete(make_request(), "m")

    error = caught.value
    assert error.status_code == recorded["status"]
    assert (error.error_type, error.retryable, error.retry_after) == (
        error_type,
        retryable,
        retry_after,
    )
    assert error.body == json.dumps(recorded["body"], separators=(",", ":"), ensure_ascii=False)
    assert f"HTTP {recorded['status']}" in str(error)


async def failure(wire: str, answer: Callable[[httpx.Request], httpx.Response]) -> ProviderError:
    """What the ``wire`` adapter raises when its call is answered by ``answer``."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(ProviderError) as caught:
            await documented(wire, http).complete(make_request(), "m")
    return caught.value


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        ("openai", b"<html>gateway</html>"),
        ("anthropic", b"<html>gateway</html>"),
        ("openai", b'{"choices": []}'),
        ("openai", b'{"choices": [{"message": null}]}'),
        ("anthropic", b'{"content": "not a list of blocks"}'),
        ("anthropic", b'{"content": [{"type": "text"}]}'),
    ],
)
async def test_malformed_success_body_is_a_provider_error(wire: str, content: bytes) -> None:
    error = await failure(wire, lambda _: httpx.Response(200, content=content))

    assert (error.error_type, error.retryable, error.status_code) == ("provider_error", False, 200)
    assert "malformed response" in str(error)
    assert error.body == content.decode()


@pytest.mark.parametrize(
    ("kind", "code", "retryable", "label"),
    [
        ("insufficient_quota", None, False, "insufficient_quota: no"),
        ("requests", "billing_hard_limit_reached", False, "requests/billing_hard_limit_reached"),
        ("tokens", "rate_limit_exceeded", True, "tokens/rate_limit_exceeded: no"),
        ("tokens", 429, True, "tokens/429: no"),  # OpenRouter's numeric code
    ],
)
async def test_openai_quota_429_is_found_by_type_or_code(
    kind: str, code: str | int | None, retryable: bool, label: str
) -> None:
    body = {"error": {"message": "no", "type": kind, "param": None, "code": code}}
    error = await failure("openai", lambda _: httpx.Response(429, json=body))

    assert (error.error_type, error.retryable) == ("rate_limited", retryable)
    assert label in str(error)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ("openai", "openai: HTTP 503 from https://api.openai.com/v1/chat/completions"),
        ("anthropic", "anthropic: HTTP 503 from https://api.anthropic.com/v1/messages"),
    ],
)
async def test_retry_after_header_is_read_whatever_its_case(wire: str, message: str) -> None:
    answer = httpx.Response(503, headers={"RETRY-AFTER": "7", "X-Request-ID": "r1"}, text="busy")
    error = await failure(wire, lambda _: answer)

    assert (error.status_code, error.retryable, error.retry_after) == (503, True, 7.0)
    assert error.headers["retry-after"] == "7" and error.headers["x-request-id"] == "r1"
    # A body that is not JSON adds nothing to the message; it is kept whole in ``body``.
    assert (str(error), error.body) == (message, "busy")


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


@pytest.mark.parametrize(
    ("exc", "error_type", "retryable"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout", True),
        (httpx.ConnectError("refused"), "connection_error", True),
        (httpx.RemoteProtocolError("server hung up"), "connection_error", True),
        (httpx.UnsupportedProtocol("no ftp"), "connection_error", False),
        (httpx.TooManyRedirects("loop"), "provider_error", False),
        (httpx.DecodingError("bad gzip"), "provider_error", False),
    ],
)
async def test_transport_failures_are_classified(
    exc: httpx.RequestError, error_type: str, retryable: bool
) -> None:
    error = await failure("openai", raising(exc))

    assert (error.error_type, error.retryable, error.status_code) == (error_type, retryable, None)
    assert type(exc).__name__ in str(error)


async def test_connect_timeout_over_a_reset_connection_is_a_connection_error() -> None:
    # httpx-aiohttp reports every aiohttp connection failure as ConnectTimeout; only a
    # TimeoutError underneath makes it a timeout.
    reset = httpx.ConnectTimeout("reset")
    reset.__cause__ = ConnectionResetError("peer reset")
    timed_out = httpx.ConnectTimeout("slow")
    timed_out.__cause__ = TimeoutError()

    refused = await failure("openai", raising(reset))
    slow = await failure("openai", raising(timed_out))

    assert (refused.error_type, refused.retryable) == ("connection_error", True)
    assert "ConnectionResetError: peer reset" in str(refused)
    assert (slow.error_type, slow.retryable) == ("timeout", True)


async def test_error_body_is_truncated() -> None:
    huge = {"error": {"message": "x" * 50_000, "type": "server_error", "code": None}}
    transport = httpx.MockTransport(lambda _: httpx.Response(500, json=huge))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(ProviderError) as caught:
            await documented("openai", http).complete(make_request(), "m")

    assert caught.value.body is not None and len(caught.value.body) <= 1024
    assert len(str(caught.value)) < 600


# --- what the adapters send -------------------------------------------------------------------


async def test_openai_sends_optional_fields_only_when_set_and_no_auth_without_key() -> None:
    seen: list[httpx.Request] = []
    async with replay("openai_chat_completion.json", seen) as http:
        adapter = OpenAICompatible("ollama", http, "http://localhost:11434/v1/")
        completion = await adapter.complete(make_request(), "llama3.2")

    (sent,) = seen
    assert str(sent.url) == "http://localhost:11434/v1/chat/completions"
    assert "authorization" not in sent.headers
    assert json.loads(sent.content) == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hello there world"}],
    }
    assert completion.provider == "ollama"


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather?", "name": "ann"},
    {"role": "assistant", "content": "calling the tool"},
    {"role": "tool", "content": "sunny, 21C", "name": "get_weather"},
    {"role": "system", "content": "answer in French"},
]


@pytest.mark.parametrize(
    ("wire", "url", "headers", "body"),
    [
        (
            "openai",
            "https://api.openai.com/v1/chat/completions",
            {"authorization": f"Bearer {OPENAI_KEY}"},
            {
                "model": "the-model",
                "messages": CONVERSATION,
                "temperature": 0.5,
                "max_tokens": 64,
                "top_p": 0.8,
                "stop": ["END"],
            },
        ),
        (
            "anthropic",
            "https://api.anthropic.com/v1/messages",
            {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
            {
                "model": "the-model",
                "max_tokens": 64,
                "system": "be brief\n\nanswer in French",
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "calling the tool"},
                    {"role": "user", "content": "Tool result (get_weather):\nsunny, 21C"},
                ],
                "temperature": 0.5,
                "top_p": 0.8,
                "stop_sequences": ["END"],
            },
        ),
    ],
)
async def test_request_body_and_headers(
    wire: str, url: str, headers: dict[str, str], body: dict[str, Any]
) -> None:
    seen: list[httpx.Request] = []
    request = make_request(
        request_id="order-42",
        messages=CONVERSATION,
        temperature=0.5,
        max_tokens=64,
        top_p=0.8,
        stop=["END"],
        metadata={"team": "search"},
    )
    recorded = "openai_chat_completion.json" if wire == "openai" else "anthropic_message.json"
    async with replay(recorded, seen) as http:
        await documented(wire, http).complete(request, "the-model")

    (sent,) = seen
    assert (sent.method, str(sent.url)) == ("POST", url)
    expected = {**headers, "content-type": "application/json", "x-client-request-id": "order-42"}
    assert {name: sent.headers.get(name) for name in expected} == expected
    # Each API gets its own credential header only.
    assert {"authorization", "x-api-key"} & sent.headers.keys() <= headers.keys()
    assert json.loads(sent.content) == body


async def test_anthropic_max_tokens_from_request_and_base_url_with_v1() -> None:
    seen: list[httpx.Request] = []
    async with replay("anthropic_message.json", seen) as http:
        adapter = AnthropicMessages("gw", http, "https://gw.example/v1", default_max_tokens=99)
        await adapter.complete(make_request(max_tokens=7), "claude")
        await adapter.complete(make_request(), "claude")

    assert str(seen[0].url) == "https://gw.example/v1/messages"
    assert [json.loads(s.content)["max_tokens"] for s in seen] == [7, 99]
    assert "system" not in json.loads(seen[0].content)


async def test_anthropic_only_system_messages_fail_without_a_call() -> None:
    seen: list[httpx.Request] = []
    async with replay("anthropic_message.json", seen) as http:
        with pytest.raises(ProviderError) as caught:
            await documented("anthropic", http).complete(
                make_request(messages=[{"role": "system", "content": "alone"}]), "claude"
            )

    assert (caught.value.error_type, caught.value.retryable) == ("invalid_request", False)
    assert seen == []


async def test_non_ascii_request_id_is_percent_encoded() -> None:
    seen: list[httpx.Request] = []
    async with replay("openai_chat_completion.json", seen) as http:
        await documented("openai", http).complete(make_request(request_id="café-1"), "m")

    assert seen[0].headers["x-client-request-id"] == "caf%C3%A9-1"


# --- secrets ----------------------------------------------------------------------------------


def echo_credentials(request: httpx.Request) -> httpx.Response:
    """A misbehaving server that puts the caller's credentials in its error text."""
    leaked = f"{request.headers.get('authorization')} {request.headers.get('x-api-key')}"
    return httpx.Response(
        401,
        headers={"X-Echo": leaked},
        json={"type": "error", "error": {"type": "authentication_error", "message": leaked}},
    )


@pytest.mark.parametrize("wire", WIRES)
async def test_api_key_never_in_provider_error(wire: str) -> None:
    key = WIRES[wire][3]
    async with httpx.AsyncClient(transport=httpx.MockTransport(echo_credentials)) as http:
        adapter = documented(wire, http)
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    error = caught.value
    assert error.body is not None and "[REDACTED]" in error.body
    assert "[REDACTED]" in error.headers["x-echo"]
    for text in (str(error), repr(error), error.body, error.message, str(error.headers)):
        assert key not in text
    assert key not in repr(adapter)


async def test_extra_header_secrets_never_in_provider_error() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text=f"bad api-key {request.headers['api-key']}")

    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as http:
        adapter = OpenAICompatible(
            "azure", http, "https://x.example/v1", extra_headers={"api-key": "azure-SECRET-1"}
        )
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    assert "azure-SECRET-1" not in f"{caught.value} {caught.value!r} {caught.value.body}"


async def test_transport_error_message_has_no_credentials_from_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        adapter = OpenAICompatible("p", http, "https://user:pw-SECRET@h.example/v1?key=q-SECRET")
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    assert "SECRET" not in f"{caught.value} {caught.value!r} {adapter!r}"
    assert "https://h.example/v1/chat/completions" in str(caught.value)


def test_settings_repr_hides_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-SECRET-1")
    monkeypatch.setenv(
        "LLMSTREAM_PROVIDERS",
        json.dumps(
            {
                "azure": {
                    "kind": "openai",
                    "base_url": "https://x.example/v1",
                    "api_key": "extra-SECRET-2",
                    "headers": {"api-key": "header-SECRET-3"},
                }
            }
        ),
    )
    settings = ProviderSettings()

    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == OPENAI_KEY
    assert settings.providers["azure"].headers == {"api-key": "header-SECRET-3"}
    shown = f"{settings!r} {settings} {settings.providers}"
    for secret in (
        OPENAI_KEY,
        ANTHROPIC_KEY,
        "sk-or-SECRET-1",
        "extra-SECRET-2",
        "header-SECRET-3",
    ):
        assert secret not in shown


# --- router and settings ----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return without_provider_env(monkeypatch)


@pytest.fixture
def router(clean_env: pytest.MonkeyPatch) -> ProviderRouter:
    # Every built-in configured: a built-in without its variables is not registered.
    clean_env.setenv("OPENAI_API_KEY", "sk-1")
    clean_env.setenv("ANTHROPIC_API_KEY", "sk-ant-1")
    clean_env.setenv("OPENROUTER_API_KEY", "sk-or-1")
    clean_env.setenv("OLLAMA_HOST", "localhost:11434")
    unused = httpx.MockTransport(lambda _: httpx.Response(500))
    return build_router(ProviderSettings(), httpx.AsyncClient(transport=unused))


@pytest.mark.parametrize(
    ("model", "provider", "expected_provider", "expected_model"),
    [
        ("openai/gpt-4o-mini", None, "openai", "gpt-4o-mini"),
        ("anthropic/claude-sonnet-4-5", None, "anthropic", "claude-sonnet-4-5"),
        ("openrouter/meta-llama/llama-3-8b", None, "openrouter", "meta-llama/llama-3-8b"),
        ("ollama/llama3.2:3b", None, "ollama", "llama3.2:3b"),
        ("gpt-4o-mini", "openai", "openai", "gpt-4o-mini"),
        ("openai/gpt-4o-mini", "openai", "openai", "gpt-4o-mini"),
        # With the provider field set, a slash belongs to the model: OpenRouter's own names.
        ("openai/gpt-4o", "openrouter", "openrouter", "openai/gpt-4o"),
        ("meta-llama/llama-3-8b", "openrouter", "openrouter", "meta-llama/llama-3-8b"),
    ],
)
def test_router_resolves(
    router: ProviderRouter,
    model: str,
    provider: str | None,
    expected_provider: str,
    expected_model: str,
) -> None:
    chosen, bare = router.resolve(make_request(model=model, provider=provider))

    assert (chosen.name, bare) == (expected_provider, expected_model)


@pytest.mark.parametrize(
    ("model", "provider", "fragment"),
    [
        ("mistral/large", None, "unknown provider 'mistral'"),
        ("gpt-4o-mini", "bedrock", "unknown provider 'bedrock'"),
        ("gpt-4o-mini", None, "names no provider"),
        ("openai/", None, "no model name"),
    ],
)
def test_router_rejects_unknown_provider(
    router: ProviderRouter, model: str, provider: str | None, fragment: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        router.resolve(make_request(model=model, provider=provider))

    error = caught.value
    assert (error.error_type, error.retryable) == ("invalid_request", False)
    assert fragment in str(error)
    assert "known providers: anthropic, ollama, openai, openrouter" in str(error)


async def test_builtin_endpoints_come_from_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "http://openai.internal/v1")
    clean_env.setenv("ANTHROPIC_BASE_URL", "http://anthropic.internal")
    clean_env.setenv("OLLAMA_HOST", "gpu-box:11434")
    clean_env.setenv("OPENROUTER_API_KEY", "sk-or-1")
    seen: list[httpx.Request] = []
    async with replay("openai_chat_completion.json", seen) as http:
        router = build_router(ProviderSettings(), http)
        for model in ("openai/a", "ollama/b", "openrouter/c/d"):
            provider, bare = router.resolve(make_request(model=model))
            await provider.complete(make_request(), bare)

    assert [str(s.url) for s in seen] == [
        "http://openai.internal/v1/chat/completions",
        "http://gpu-box:11434/v1/chat/completions",
        "https://openrouter.ai/api/v1/chat/completions",
    ]
    assert seen[2].headers["authorization"] == "Bearer sk-or-1"
    assert json.loads(seen[2].content)["model"] == "c/d"
    anthropic, _ = router.resolve(make_request(model="anthropic/x"))
    assert "http://anthropic.internal/v1/messages" in repr(anthropic)


EXTRA = {
    "vllm": {
        "kind": "openai",
        "base_url": "http://gpu-1:8000/v1",
        "api_key": "vllm-key",
        "headers": {"X-Team": "search"},
    },
    "claude-proxy": {"kind": "anthropic", "base_url": "http://proxy.internal"},
}


async def resolve_and_call(settings: ProviderSettings, model: str) -> httpx.Request:
    seen: list[httpx.Request] = []
    body = (
        "anthropic_message.json"
        if model.startswith("claude-proxy")
        else "openai_chat_completion.json"
    )
    async with replay(body, seen) as http:
        provider, bare = build_router(settings, http).resolve(make_request(model=model))
        await provider.complete(make_request(), bare)
    return seen[0]


async def test_extra_endpoints_from_env_json(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LLMSTREAM_PROVIDERS", json.dumps(EXTRA))
    settings = ProviderSettings()

    vllm = await resolve_and_call(settings, "vllm/qwen2.5-7b")
    proxy = await resolve_and_call(settings, "claude-proxy/claude-x")

    assert str(vllm.url) == "http://gpu-1:8000/v1/chat/completions"
    assert vllm.headers["authorization"] == "Bearer vllm-key"
    assert vllm.headers["x-team"] == "search"
    assert str(proxy.url) == "http://proxy.internal/v1/messages"
    assert "x-api-key" not in proxy.headers


@pytest.mark.parametrize("suffix", [".json", ".toml"])
async def test_extra_endpoints_from_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"providers{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(EXTRA))
    else:
        path.write_text(
            '[vllm]\nkind = "openai"\nbase_url = "http://gpu-1:8000/v1"\napi_key = "vllm-key"\n'
            '[vllm.headers]\nX-Team = "search"\n'
            '["claude-proxy"]\nkind = "anthropic"\nbase_url = "http://proxy.internal"\n'
        )
    clean_env.setenv("LLMSTREAM_PROVIDERS_FILE", str(path))
    settings = ProviderSettings()

    vllm = await resolve_and_call(settings, "vllm/qwen2.5-7b")
    proxy = await resolve_and_call(settings, "claude-proxy/claude-x")

    assert str(vllm.url) == "http://gpu-1:8000/v1/chat/completions"
    assert vllm.headers["x-team"] == "search"
    assert str(proxy.url) == "http://proxy.internal/v1/messages"


def test_env_json_entry_replaces_file_entry(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(EXTRA))
    clean_env.setenv("LLMSTREAM_PROVIDERS_FILE", str(path))
    clean_env.setenv(
        "LLMSTREAM_PROVIDERS", json.dumps({"vllm": {"kind": "openai", "base_url": "http://b/v1"}})
    )

    settings = ProviderSettings()

    assert settings.providers["vllm"].base_url == "http://b/v1"
    assert settings.providers["claude-proxy"].kind == "anthropic"


@pytest.mark.parametrize(
    "entries",
    [
        {"openai": {"kind": "openai", "base_url": "http://x/v1"}},  # shadows a built-in
        {"a/b": {"kind": "openai", "base_url": "http://x/v1"}},  # a slash cannot be a prefix
        {"x": {"kind": "gemini", "base_url": "http://x/v1"}},
        {"x": {"kind": "openai", "base_url": "ftp://x"}},
        {"x": {"kind": "openai", "base_url": "http://x", "unknown": 1}},
    ],
)
def test_invalid_extra_endpoints_are_rejected(
    clean_env: pytest.MonkeyPatch, entries: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        ProviderSettings(providers=entries)


def test_constructor_overrides_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "http://from-env/v1")
    clean_env.setenv("LLMSTREAM_PROVIDER_TIMEOUT_S", "7")
    clean_env.setenv("LLMSTREAM_PROVIDERS", json.dumps(EXTRA))

    from_env = ProviderSettings()
    explicit = ProviderSettings(openai_base_url="http://explicit/v1", timeout_s=3, providers={})

    assert (from_env.openai_base_url, from_env.timeout_s) == ("http://from-env/v1", 7.0)
    assert set(from_env.providers) == {"vllm", "claude-proxy"}
    assert (explicit.openai_base_url, explicit.timeout_s, explicit.providers) == (
        "http://explicit/v1",
        3.0,
        {},
    )


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = ProviderSettings()

    assert settings.openai_base_url == "https://api.openai.com/v1"
    assert settings.anthropic_base_url == "https://api.anthropic.com"
    assert settings.openrouter_base_url == "https://openrouter.ai/api/v1"
    assert settings.ollama_host is None  # ollama is registered only when OLLAMA_HOST is set
    assert (settings.timeout_s, settings.anthropic_default_max_tokens) == (120.0, 4096)
    assert settings.openai_api_key is None


def test_public_api_is_pinned() -> None:
    # What the worker, the retry policy and the pipeline import; removing one breaks them.
    pinned = "Completion ErrorType Provider ProviderError ProviderRouter create_http_client"
    assert set(providers_module.__all__) == {*pinned.split(), "parse_retry_after"}
    assert all(hasattr(providers_module, name) for name in providers_module.__all__)
