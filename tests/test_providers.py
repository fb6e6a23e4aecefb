"""Provider adapters, the router and the provider settings, over real HTTP on loopback.

Two kinds of counterpart: the simulator, and a loopback server (`tests/loopback.py`) that serves
the providers' documented payloads from `tests/payloads/` (or whatever answer a test needs:
slow, cut off, not HTTP at all) and records exactly what the adapters sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from pydantic import SecretStr, ValidationError
from yarl import URL

import llmstream.processors.providers as providers_module
from llmstream.core.settings import describe_invalid_settings
from llmstream.devtools.processes import free_port
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
from llmstream.processors.providers.pool import ConnectionPool
from llmstream.processors.providers.settings import ProviderSettings, build_router
from llmstream.schemas.models import LLMRequest
from tests.inprocess import without_provider_env
from tests.loopback import Handler, LoopbackServer, Received, Reply

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


def recorded(name: str) -> Reply:
    """The documented answer ``name``: its status, headers and body."""
    data = payload(name)
    return Reply.json(data["body"], data["status"], data["headers"])


# wire → (adapter, the real API's base URL, the base path on a loopback server, a test key)
WIRES: dict[str, tuple[type[HTTPAdapter], str, str, str]] = {
    "openai": (OpenAICompatible, "https://api.openai.com/v1", "/v1", OPENAI_KEY),
    "anthropic": (AnthropicMessages, "https://api.anthropic.com", "", ANTHROPIC_KEY),
}


# The `client` fixture runs each test over both transports: aiohttp alone, and the connection
# pool for non-streamed calls (the worker's). The pool of a client, where it has one:
POOLS: weakref.WeakKeyDictionary[aiohttp.ClientSession, ConnectionPool] = (
    weakref.WeakKeyDictionary()
)


def at(
    wire: str,
    server: SimulatorServer | LoopbackServer,
    client: aiohttp.ClientSession,
    key: str | None = None,
) -> HTTPAdapter:
    """The ``wire`` adapter pointed at ``server``, as its base URL is documented."""
    adapter, _, path, _ = WIRES[wire]
    key_ = SecretStr(key) if key else None
    return adapter(wire, client, f"{server.url}{path}", key_, pool=POOLS.get(client))


def documented(wire: str, server: LoopbackServer, client: aiohttp.ClientSession) -> HTTPAdapter:
    """The ``wire`` adapter pointed at ``server`` with a test key."""
    return at(wire, server, client, WIRES[wire][3])


@pytest_asyncio.fixture(scope="module", params=["aiohttp", "pool"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[aiohttp.ClientSession]:
    http = create_http_client(timeout_s=10.0, max_connections=200)
    if request.param == "pool":
        POOLS[http] = ConnectionPool(limit=200, connect_timeout_s=10.0, read_timeout_s=10.0)
    yield http
    await http.close()
    if http in POOLS:
        await POOLS[http].close()


async def failure(
    client: aiohttp.ClientSession, wire: str, answer: Reply | Handler
) -> ProviderError:
    """What the ``wire`` adapter raises when its call is answered by ``answer``."""
    async with LoopbackServer(answer) as server:
        with pytest.raises(ProviderError) as caught:
            await documented(wire, server, client).complete(make_request(), "m")
    return caught.value


# --- against the simulator ---------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0, seed=1)) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def keyed_sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, api_key=SecretStr("right-key-123456"))
    async with SimulatorServer(settings) as server:
        yield server


async def script(sim: SimulatorServer, request_id: str, *responses: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as control:
        answer = await control.post(
            f"{sim.url}/_sim/script", json={"request_id": request_id, "responses": responses}
        )
        answer.raise_for_status()


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
    client: aiohttp.ClientSession,
    wire: str,
    messages: list[dict[str, str]],
    expected: Completion,
) -> None:
    request = make_request(messages=messages)

    completion = await at(wire, sim, client).complete(request, expected.model)

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
    client: aiohttp.ClientSession,
    wire: str,
    extra: dict[str, Any],
    content: str,
    finish_reason: str,
) -> None:
    completion = await at(wire, sim, client).complete(make_request(**extra), "m")

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
    client: aiohttp.ClientSession,
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
        await at(wire, sim, client).complete(request, "m")

    error = caught.value
    assert (error.status_code, error.error_type) == (scripted["status"], error_type)
    assert (error.retryable, error.retry_after, error.provider) == (retryable, retry_after, wire)
    assert f"HTTP {scripted['status']}" in str(error) and kind in str(error)
    assert error.body is not None and kind in error.body


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_wrong_key_is_auth_error_and_right_key_works(
    keyed_sim: SimulatorServer, client: aiohttp.ClientSession, wire: str
) -> None:
    wrong = "wrong-key-SECRET-987654321"

    with pytest.raises(ProviderError) as caught:
        await at(wire, keyed_sim, client, wrong).complete(make_request(), "m")
    right = at(wire, keyed_sim, client, "right-key-123456")
    completion = await right.complete(make_request(), "m")

    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (401, "auth_error", False)
    assert wrong not in str(error) and wrong not in repr(error)
    assert completion.content == "echo: hello there world"


async def test_request_id_reaches_the_provider(
    sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    request = make_request()

    await at("openai", sim, client).complete(request, "m")
    await at("anthropic", sim, client).complete(request, "m")

    async with httpx.AsyncClient() as control:
        stats = (await control.get(f"{sim.url}/_sim/stats")).json()
    assert stats["calls_by_request_id"][request.request_id] == 2


async def test_shared_client_carries_hundreds_in_flight() -> None:
    # The server holds every answer until all the calls have arrived: they succeed only if the
    # client had them all in flight at once, however slow the machine is.
    calls, arrived, all_in = 300, 0, asyncio.Event()

    async def hold(_: Received) -> Reply:
        nonlocal arrived
        arrived += 1
        if arrived == calls:
            all_in.set()
        try:
            async with asyncio.timeout(60):
                await all_in.wait()
        except TimeoutError:
            return Reply(503, body=f"only {arrived} of {calls} calls arrived".encode())
        return recorded("openai_chat_completion.json")

    http = create_http_client(timeout_s=120, max_connections=500)
    try:
        async with LoopbackServer(hold) as server:
            adapter = at("openai", server, http)
            done = await asyncio.gather(
                *(adapter.complete(make_request(), "m") for _ in range(calls))
            )
    finally:
        await http.close()

    assert isinstance(http, aiohttp.ClientSession)
    assert len(done) == calls
    assert {completion.content for completion in done} == {"Hello! How can I assist you today?"}


# --- endpoint URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "base_url", "expected"),
    [
        (
            OpenAICompatible,
            "https://api.openai.com/v1",
            "https://api.openai.com/v1/chat/completions",
        ),
        # Ollama's documented base URL ends in a slash.
        (
            OpenAICompatible,
            "http://localhost:11434/v1/",
            "http://localhost:11434/v1/chat/completions",
        ),
        # Azure OpenAI: the API version is a query string, kept after the path.
        (
            OpenAICompatible,
            "https://r.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21",
            "https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions"
            "?api-version=2024-10-21",
        ),
        (AnthropicMessages, "https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        # Some gateways document Anthropic's base URL with its /v1 (and a slash).
        (AnthropicMessages, "https://gw.example/v1/", "https://gw.example/v1/messages"),
        (AnthropicMessages, "https://gw.example/v1", "https://gw.example/v1/messages"),
        (
            AnthropicMessages,
            "https://gw.example/anthropic?tenant=t1",
            "https://gw.example/anthropic/v1/messages?tenant=t1",
        ),
    ],
)
async def test_endpoint_url(
    client: aiohttp.ClientSession, adapter: type[HTTPAdapter], base_url: str, expected: str
) -> None:
    built = adapter("p", client, base_url)

    assert str(built.endpoint(base_url)) == expected
    # What a log or an error names: no query string.
    assert repr(built) == f"{adapter.__name__}(name='p', url='{expected.partition('?')[0]}')"


@pytest.mark.parametrize(
    ("wire", "base_path", "path", "query"),
    [
        ("openai", "/v1", "/v1/chat/completions", {}),
        ("openai", "/v1/", "/v1/chat/completions", {}),
        (
            "openai",
            "/openai/deployments/gpt-4o?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/chat/completions",
            {"api-version": "2024-10-21"},
        ),
        ("anthropic", "", "/v1/messages", {}),
        ("anthropic", "/v1/", "/v1/messages", {}),
    ],
)
async def test_calls_reach_the_endpoint_path_and_query(
    client: aiohttp.ClientSession, wire: str, base_path: str, path: str, query: dict[str, str]
) -> None:
    name = "openai_chat_completion.json" if wire == "openai" else "anthropic_message.json"
    async with LoopbackServer(recorded(name)) as server:
        adapter = WIRES[wire][0](wire, client, f"{server.url}{base_path}")
        await adapter.complete(make_request(), "m")

    [sent] = server.received
    assert (sent.method, sent.path, sent.query) == ("POST", path, query)


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
async def test_documented_success_body_is_read(
    client: aiohttp.ClientSession, wire: str, name: str, expected: Completion
) -> None:
    async with LoopbackServer(recorded(name)) as server:
        completion = await documented(wire, server, client).complete(make_request(), "requested")

    assert completion == expected


async def test_anthropic_joins_text_blocks_and_counts_cache_tokens(
    client: aiohttp.ClientSession,
) -> None:
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
    async with LoopbackServer(Reply.json(body)) as server:
        completion = await documented("anthropic", server, client).complete(
            make_request(), "claude"
        )

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
    client: aiohttp.ClientSession,
    name: str,
    wire: str,
    error_type: str,
    retryable: bool,
    retry_after: float | None,
) -> None:
    data = payload(name)

    error = await failure(client, wire, recorded(name))

    assert error.status_code == data["status"]
    assert (error.error_type, error.retryable, error.retry_after) == (
        error_type,
        retryable,
        retry_after,
    )
    assert error.body == json.dumps(data["body"], separators=(",", ":"), ensure_ascii=False)
    assert f"HTTP {data['status']}" in str(error)


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
async def test_malformed_success_body_is_a_provider_error(
    client: aiohttp.ClientSession, wire: str, content: bytes
) -> None:
    error = await failure(client, wire, Reply(200, body=content))

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
    client: aiohttp.ClientSession, kind: str, code: str | int | None, retryable: bool, label: str
) -> None:
    body = {"error": {"message": "no", "type": kind, "param": None, "code": code}}
    error = await failure(client, "openai", Reply.json(body, 429))

    assert (error.error_type, error.retryable) == ("rate_limited", retryable)
    assert label in str(error)


@pytest.mark.parametrize(
    ("wire", "path"), [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")]
)
async def test_retry_after_header_is_read_whatever_its_case(
    client: aiohttp.ClientSession, wire: str, path: str
) -> None:
    answer = Reply(503, {"RETRY-AFTER": "7", "X-Request-ID": "r1"}, b"busy")
    async with LoopbackServer(answer) as server:
        with pytest.raises(ProviderError) as caught:
            await documented(wire, server, client).complete(make_request(), "m")

    error = caught.value
    assert (error.status_code, error.retryable, error.retry_after) == (503, True, 7.0)
    assert error.headers["retry-after"] == "7" and error.headers["x-request-id"] == "r1"
    # A body that is not JSON adds nothing to the message; it is kept whole in ``body``.
    assert (str(error), error.body) == (f"{wire}: HTTP 503 from {server.url}{path}", "busy")


async def test_redirect_is_not_followed(client: aiohttp.ClientSession) -> None:
    # Following it would send the key to wherever the redirect points.
    async with (
        LoopbackServer(recorded("openai_chat_completion.json")) as target,
        LoopbackServer(Reply(302, {"location": f"{target.url}/v1/chat/completions"})) as server,
    ):
        with pytest.raises(ProviderError) as caught:
            await documented("openai", server, client).complete(make_request(), "m")

    error = caught.value
    assert (error.status_code, error.error_type, error.retryable) == (302, "invalid_request", False)
    assert error.headers["location"] == f"{target.url}/v1/chat/completions"
    assert [sent.path for sent in server.received] == ["/v1/chat/completions"]
    assert target.received == []


async def test_error_body_is_truncated(client: aiohttp.ClientSession) -> None:
    huge = {"error": {"message": "x" * 50_000, "type": "server_error", "code": None}}

    error = await failure(client, "openai", Reply.json(huge, 500))

    assert error.body is not None and len(error.body) <= 1024
    assert len(str(error)) < 600


# --- transport failures ------------------------------------------------------------------------

# What aiohttp names a connection that ended before the whole answer came.
CUT_OFF = r"\((ClientPayloadError|ServerDisconnectedError): "


@pytest.mark.parametrize("transport", ["aiohttp", "pool"])
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_read_timeout_is_retryable(wire: str, transport: str) -> None:
    # The server answers long after the client's timeout (the wait ends when the server stops).
    http = create_http_client(timeout_s=0.5, max_connections=10)
    pool = ConnectionPool(limit=10, connect_timeout_s=0.5, read_timeout_s=0.5)
    if transport == "pool":
        POOLS[http] = pool
    try:
        error = await failure(http, wire, Reply(delay_s=300))
    finally:
        await http.close()
        await pool.close()

    assert (error.error_type, error.retryable, error.status_code) == ("timeout", True, None)
    assert "timed out calling http://127.0.0.1:" in str(error)


async def waiting_for_a_connection(
    query: str = "", transport: str = "aiohttp"
) -> tuple[ProviderError, LoopbackServer]:
    """What a call to a held server (at ``/v1`` with ``query``) raises through a client whose
    one connection another call holds; and the server, stopped."""
    http = create_http_client(timeout_s=0.5, max_connections=1)
    # Its own read timeout: the held call keeps the connection until the test is done.
    pool = ConnectionPool(limit=1, connect_timeout_s=0.5, read_timeout_s=300)

    async def held(server: LoopbackServer) -> None:
        if transport == "pool":
            await pool.post(URL(server.url), {}, b"")
            return
        async with http.get(server.url, timeout=aiohttp.ClientTimeout(sock_read=300)) as answer:
            await answer.read()

    try:
        async with LoopbackServer(Reply(delay_s=300)) as server:
            adapter = OpenAICompatible(
                "p", http, f"{server.url}/v1{query}", pool=pool if transport == "pool" else None
            )
            task = asyncio.create_task(held(server))
            try:
                async with asyncio.timeout(30):
                    while not server.received:
                        await asyncio.sleep(0.01)
                with pytest.raises(ProviderError) as caught:
                    await adapter.complete(make_request(), "m")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await http.close()
        await pool.close()
    return caught.value, server


@pytest.mark.parametrize("transport", ["aiohttp", "pool"])
async def test_waiting_for_a_free_connection_is_a_timeout(transport: str) -> None:
    error, server = await waiting_for_a_connection(transport=transport)

    assert (error.error_type, error.retryable, error.status_code) == ("timeout", True, None)
    assert f"timed out calling {server.url}/v1/chat/completions" in str(error)
    # The call never left the client.
    assert len(server.received) == 1


async def test_connection_refused_is_retryable_connection_error(
    client: aiohttp.ClientSession,
) -> None:
    port = free_port()  # nothing listens there
    adapter = OpenAICompatible(
        "openai", client, f"http://127.0.0.1:{port}/v1", pool=POOLS.get(client)
    )

    with pytest.raises(ProviderError) as caught:
        await adapter.complete(make_request(), "m")

    error = caught.value
    assert (error.error_type, error.retryable, error.status_code) == (
        "connection_error",
        True,
        None,
    )
    assert f"connection to http://127.0.0.1:{port}/v1/chat/completions failed" in str(error)


@pytest.mark.parametrize(
    "answer",
    [
        # The status line, the headers and half the body, then the connection closes.
        Reply.json({"choices": [{"message": {"content": "x" * 4000}}]}, cut=True),
        # The connection closes before anything is answered.
        Reply(raw=b""),
    ],
    ids=["mid-body", "before-the-status"],
)
async def test_connection_closed_mid_answer_is_retryable(
    client: aiohttp.ClientSession, answer: Reply
) -> None:
    error = await failure(client, "openai", answer)

    assert (error.error_type, error.retryable, error.status_code) == (
        "connection_error",
        True,
        None,
    )
    assert re.search(CUT_OFF, str(error)), str(error)


async def test_non_http_base_url_is_not_retried(client: aiohttp.ClientSession) -> None:
    adapter = OpenAICompatible("p", client, "ftp://127.0.0.1/v1", pool=POOLS.get(client))

    with pytest.raises(ProviderError) as caught:
        await adapter.complete(make_request(), "m")

    error = caught.value
    assert (error.error_type, error.retryable, error.status_code) == (
        "connection_error",
        False,
        None,
    )
    assert "cannot call ftp://127.0.0.1/v1/chat/completions" in str(error)


@pytest.mark.parametrize(
    "answer",
    [
        Reply(raw=b"SMTP ready\r\n\r\n"),  # not HTTP
        Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"),  # malformed HTTP
        # A body that is not what its Content-Encoding says.
        Reply(headers={"content-encoding": "gzip"}, body=b"not gzip at all"),
    ],
    ids=["not-http", "bad-header", "bad-encoding"],
)
async def test_unusable_answer_is_a_provider_error(
    client: aiohttp.ClientSession, answer: Reply
) -> None:
    error = await failure(client, "openai", answer)

    assert (error.error_type, error.retryable, error.status_code) == ("provider_error", False, None)
    assert "unusable response from http://127.0.0.1:" in str(error)


# --- what the adapters send -------------------------------------------------------------------


async def test_openai_sends_optional_fields_only_when_set_and_no_auth_without_key(
    client: aiohttp.ClientSession,
) -> None:
    async with LoopbackServer(recorded("openai_chat_completion.json")) as server:
        adapter = OpenAICompatible("ollama", client, f"{server.url}/v1/", pool=POOLS.get(client))
        completion = await adapter.complete(make_request(), "llama3.2")

    [sent] = server.received
    assert sent.path == "/v1/chat/completions"
    assert "authorization" not in sent.headers
    assert sent.json() == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hello there world"}],
    }
    assert completion.provider == "ollama"


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather?", "name": "ann"},
    {"role": "assistant", "content": "sunny, 21C"},
    {"role": "user", "content": "and tomorrow?"},
    {"role": "system", "content": "answer in French"},
]


@pytest.mark.parametrize(
    ("wire", "path", "headers", "body"),
    [
        (
            "openai",
            "/v1/chat/completions",
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
            "/v1/messages",
            {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
            {
                "model": "the-model",
                "max_tokens": 64,
                "system": "be brief\n\nanswer in French",
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "sunny, 21C"},
                    {"role": "user", "content": "and tomorrow?"},
                ],
                "temperature": 0.5,
                "top_p": 0.8,
                "stop_sequences": ["END"],
            },
        ),
    ],
)
async def test_request_body_and_headers(
    client: aiohttp.ClientSession,
    wire: str,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any],
) -> None:
    request = make_request(
        request_id="order-42",
        messages=CONVERSATION,
        temperature=0.5,
        max_tokens=64,
        top_p=0.8,
        stop=["END"],
        metadata={"team": "search"},
    )
    name = "openai_chat_completion.json" if wire == "openai" else "anthropic_message.json"
    async with LoopbackServer(recorded(name)) as server:
        await documented(wire, server, client).complete(request, "the-model")

    [sent] = server.received
    assert (sent.method, sent.path, sent.query) == ("POST", path, {})
    expected = {**headers, "content-type": "application/json", "x-client-request-id": "order-42"}
    assert {name: sent.headers.get(name) for name in expected} == expected
    # Each API gets its own credential header only.
    assert {"authorization", "x-api-key"} & sent.headers.keys() <= headers.keys()
    assert sent.json() == body


async def test_anthropic_max_tokens_from_request_and_base_url_with_v1(
    client: aiohttp.ClientSession,
) -> None:
    async with LoopbackServer(recorded("anthropic_message.json")) as server:
        adapter = AnthropicMessages(
            "gw", client, f"{server.url}/v1", default_max_tokens=99, pool=POOLS.get(client)
        )
        await adapter.complete(make_request(max_tokens=7), "claude")
        await adapter.complete(make_request(), "claude")

    assert [sent.path for sent in server.received] == ["/v1/messages"] * 2
    assert [sent.json()["max_tokens"] for sent in server.received] == [7, 99]
    assert "system" not in server.received[0].json()


async def test_anthropic_only_system_messages_fail_without_a_call(
    client: aiohttp.ClientSession,
) -> None:
    async with LoopbackServer(recorded("anthropic_message.json")) as server:
        with pytest.raises(ProviderError) as caught:
            await documented("anthropic", server, client).complete(
                make_request(messages=[{"role": "system", "content": "alone"}]), "claude"
            )

    assert (caught.value.error_type, caught.value.retryable) == ("invalid_request", False)
    assert server.received == []


async def test_non_ascii_request_id_is_percent_encoded(client: aiohttp.ClientSession) -> None:
    async with LoopbackServer(recorded("openai_chat_completion.json")) as server:
        await documented("openai", server, client).complete(make_request(request_id="café-1"), "m")

    assert server.received[0].headers["x-client-request-id"] == "caf%C3%A9-1"


# --- secrets ----------------------------------------------------------------------------------


def echo_credentials(sent: Received) -> Reply:
    """A misbehaving server that puts the caller's credentials in its error text."""
    leaked = f"{sent.headers.get('authorization')} {sent.headers.get('x-api-key')}"
    body = {"type": "error", "error": {"type": "authentication_error", "message": leaked}}
    return Reply.json(body, 401, {"X-Echo": leaked})


@pytest.mark.parametrize("wire", WIRES)
async def test_api_key_never_in_provider_error(client: aiohttp.ClientSession, wire: str) -> None:
    key = WIRES[wire][3]
    async with LoopbackServer(echo_credentials) as server:
        adapter = documented(wire, server, client)
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    error = caught.value
    assert error.body is not None and "[REDACTED]" in error.body
    assert "[REDACTED]" in error.headers["x-echo"]
    for text in (str(error), repr(error), error.body, error.message, str(error.headers)):
        assert key not in text
    assert key not in repr(adapter)


async def test_extra_header_secrets_never_in_provider_error(
    client: aiohttp.ClientSession,
) -> None:
    def echo(sent: Received) -> Reply:
        return Reply(500, body=f"bad api-key {sent.headers['api-key']}".encode())

    async with LoopbackServer(echo) as server:
        adapter = OpenAICompatible(
            "azure",
            client,
            f"{server.url}/v1",
            extra_headers={"api-key": "azure-SECRET-1"},
            pool=POOLS.get(client),
        )
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    assert server.received[0].headers["api-key"] == "azure-SECRET-1"
    assert "azure-SECRET-1" not in f"{caught.value} {caught.value!r} {caught.value.body}"


@pytest.mark.parametrize(
    ("answer", "error_type"),
    [
        # aiohttp's message names the URL.
        (Reply(raw=b"SMTP ready\r\n\r\n"), "provider_error"),
        (Reply(body=b"0123456789", cut=True), "connection_error"),
    ],
    ids=["not-http", "cut"],
)
async def test_transport_error_message_has_no_credentials_from_the_url(
    client: aiohttp.ClientSession, answer: Reply, error_type: str
) -> None:
    async with LoopbackServer(answer) as server:
        secret_url = server.url.replace("//", "//user:pw-SECRET@") + "/v1?key=q-SECRET"
        adapter = OpenAICompatible("p", client, secret_url, pool=POOLS.get(client))
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(make_request(), "m")

    assert caught.value.error_type == error_type
    assert "SECRET" not in f"{caught.value} {caught.value!r} {adapter!r}"
    assert f"{server.url}/v1/chat/completions" in str(caught.value)
    # The URL's credentials went where they belong: the Authorization header.
    assert server.received[0].headers["authorization"].startswith("Basic ")


async def test_connect_timeout_message_has_no_query_secret() -> None:
    # Some gateways take the key in the query string; aiohttp names the whole URL in a connect
    # timeout, here while the call waits for a free connection.
    error, _ = await waiting_for_a_connection("?key=q-SECRET")

    assert error.error_type == "timeout"
    assert "SECRET" not in f"{error} {error!r}"


async def test_non_http_url_message_has_no_credentials(client: aiohttp.ClientSession) -> None:
    adapter = OpenAICompatible(
        "p", client, "ftp://user:pw-SECRET@127.0.0.1/v1?key=q-SECRET", pool=POOLS.get(client)
    )

    with pytest.raises(ProviderError) as caught:
        await adapter.complete(make_request(), "m")

    assert (caught.value.error_type, caught.value.retryable) == ("connection_error", False)
    assert "SECRET" not in f"{caught.value} {caught.value!r}"


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
def router(clean_env: pytest.MonkeyPatch, client: aiohttp.ClientSession) -> ProviderRouter:
    # Every built-in configured: a built-in without its variables is not registered.
    clean_env.setenv("OPENAI_API_KEY", "sk-1")
    clean_env.setenv("ANTHROPIC_API_KEY", "sk-ant-1")
    clean_env.setenv("OPENROUTER_API_KEY", "sk-or-1")
    clean_env.setenv("OLLAMA_HOST", "localhost:11434")
    return build_router(ProviderSettings(), client)


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


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("openai", "https://api.openai.com/v1/chat/completions"),
        ("anthropic", "https://api.anthropic.com/v1/messages"),
        ("openrouter", "https://openrouter.ai/api/v1/chat/completions"),
        ("ollama", "http://localhost:11434/v1/chat/completions"),
    ],
)
def test_builtin_endpoints_by_default(router: ProviderRouter, name: str, url: str) -> None:
    provider, _ = router.resolve(make_request(model=f"{name}/m"))

    assert repr(provider).endswith(f"(name={name!r}, url={url!r})")


async def test_builtin_endpoints_come_from_settings(
    clean_env: pytest.MonkeyPatch, client: aiohttp.ClientSession
) -> None:
    async with (
        LoopbackServer(recorded("openai_chat_completion.json")) as server,
        LoopbackServer(recorded("anthropic_message.json")) as anthropic_server,
    ):
        port = server.url.rpartition(":")[2]
        clean_env.setenv("OPENAI_BASE_URL", f"{server.url}/openai/v1")
        clean_env.setenv("ANTHROPIC_BASE_URL", f"{anthropic_server.url}/anthropic")
        clean_env.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
        clean_env.setenv("OPENROUTER_BASE_URL", f"{server.url}/api/v1")
        clean_env.setenv("OPENROUTER_API_KEY", "sk-or-1")
        router = build_router(ProviderSettings(), client)
        for model in ("openai/a", "ollama/b", "openrouter/c/d", "anthropic/e"):
            provider, bare = router.resolve(make_request(model=model))
            await provider.complete(make_request(), bare)

    assert [sent.path for sent in server.received] == [
        "/openai/v1/chat/completions",
        "/v1/chat/completions",
        "/api/v1/chat/completions",
    ]
    openrouter = server.received[2]
    assert openrouter.headers["authorization"] == "Bearer sk-or-1"
    assert openrouter.json()["model"] == "c/d"
    assert [sent.path for sent in anthropic_server.received] == ["/anthropic/v1/messages"]


def extra_endpoints(url: str) -> dict[str, dict[str, Any]]:
    """Two extra endpoints, both served at ``url``."""
    return {
        "vllm": {
            "kind": "openai",
            "base_url": f"{url}/v1",
            "api_key": "vllm-key",
            "headers": {"X-Team": "search"},
        },
        "claude-proxy": {"kind": "anthropic", "base_url": f"{url}/proxy"},
    }


EXTRA = extra_endpoints("http://gpu-1:8000")


async def call_through_router(
    settings: ProviderSettings, client: aiohttp.ClientSession, server: LoopbackServer, model: str
) -> Received:
    """What ``server`` receives when the router's provider for ``model`` is called."""
    provider, bare = build_router(settings, client).resolve(make_request(model=model))
    await provider.complete(make_request(), bare)
    return server.received[-1]


def answer_either_wire(sent: Received) -> Reply:
    if sent.path.endswith("/messages"):
        return recorded("anthropic_message.json")
    return recorded("openai_chat_completion.json")


async def test_extra_endpoints_from_env_json(
    clean_env: pytest.MonkeyPatch, client: aiohttp.ClientSession
) -> None:
    async with LoopbackServer(answer_either_wire) as server:
        clean_env.setenv("LLMSTREAM_PROVIDERS", json.dumps(extra_endpoints(server.url)))
        settings = ProviderSettings()

        vllm = await call_through_router(settings, client, server, "vllm/qwen2.5-7b")
        proxy = await call_through_router(settings, client, server, "claude-proxy/claude-x")

    assert vllm.path == "/v1/chat/completions"
    assert vllm.headers["authorization"] == "Bearer vllm-key"
    assert vllm.headers["x-team"] == "search"
    assert vllm.json()["model"] == "qwen2.5-7b"
    assert proxy.path == "/proxy/v1/messages"
    assert "x-api-key" not in proxy.headers


@pytest.mark.parametrize("suffix", [".json", ".toml"])
async def test_extra_endpoints_from_file(
    clean_env: pytest.MonkeyPatch, client: aiohttp.ClientSession, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"providers{suffix}"
    async with LoopbackServer(answer_either_wire) as server:
        if suffix == ".json":
            path.write_text(json.dumps(extra_endpoints(server.url)))
        else:
            path.write_text(
                f'[vllm]\nkind = "openai"\nbase_url = "{server.url}/v1"\napi_key = "vllm-key"\n'
                '[vllm.headers]\nX-Team = "search"\n'
                f'["claude-proxy"]\nkind = "anthropic"\nbase_url = "{server.url}/proxy"\n'
            )
        clean_env.setenv("LLMSTREAM_PROVIDERS_FILE", str(path))
        settings = ProviderSettings()

        vllm = await call_through_router(settings, client, server, "vllm/qwen2.5-7b")
        proxy = await call_through_router(settings, client, server, "claude-proxy/claude-x")

    assert vllm.path == "/v1/chat/completions"
    assert vllm.headers["x-team"] == "search"
    assert proxy.path == "/proxy/v1/messages"


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
    pinned = "Completion ErrorType OnDelta Provider ProviderError ProviderRouter create_http_client"
    pinned += " DEFAULT_FINISH_REASON"
    assert set(providers_module.__all__) == {*pinned.split(), "parse_retry_after"}
    assert all(hasattr(providers_module, name) for name in providers_module.__all__)


@pytest.mark.parametrize(
    "variables",
    [
        {"OPENAI_BASE_URL": "http://user:pw@gpu-1:8000/v1", "OPENAI_API_KEY": "sk-1"},
        {
            "LLMSTREAM_PROVIDERS": '{"vllm": {"kind": "openai", "base_url": "http://u:p@g/v1", '
            '"api_key": "k"}}'
        },
    ],
)
def test_credentials_in_the_url_and_an_api_key_are_refused(
    clean_env: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    for name, value in variables.items():
        clean_env.setenv(name, value)

    with pytest.raises(ValidationError) as caught:
        ProviderSettings()

    # As the commands print it: the variable and the reason, never the value.
    said = describe_invalid_settings(caught.value)
    assert "give one of them" in said
    assert "pw@" not in said and ":p@" not in said
