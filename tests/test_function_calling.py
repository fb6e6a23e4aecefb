"""Function calling end to end: the adapters against the provider simulator over real HTTP (both
wire formats, streamed or not), the response cache on the real Redis, and the worker's request
path (`tests/inprocess.py`) putting a model's tool calls on `llm-responses`."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.cache import ResponseCache, cache_key_material
from llmstream.processors.providers import Completion, ProviderError
from llmstream.schemas.models import FunctionCall, LLMRequest, ToolCall
from tests.adapters import adapter, client
from tests.conftest import Services
from tests.inprocess import rig, worker_settings

__all__ = ["client"]  # the module's HTTP client fixture

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
ZONE = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": ZONE}},
]
WIRES = ["openai", "anthropic"]
PREFIX = {"openai": "call_", "anthropic": "toolu_"}


def make_request(text: str, **fields: Any) -> LLMRequest:
    document: dict[str, Any] = {
        "request_id": f"f-{uuid.uuid4().hex}",
        "model": "m",
        "messages": [{"role": "user", "content": text}],
        "tools": TOOLS,
        **fields,
    }
    return LLMRequest.model_validate(document)


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, stream_chunks=4, stream_chunk_delay_ms=0)
    async with SimulatorServer(settings) as server:
        yield server


async def ask(
    wire: str,
    streamed: bool,
    request: LLMRequest,
    sim: SimulatorServer,
    client: aiohttp.ClientSession,
) -> Completion:
    """One call, streamed or not; a streamed call's chunks must join into its content."""
    provider = adapter(wire, sim.url, client)
    if not streamed:
        return await provider.complete(request, "m")
    got: list[tuple[str, str | None]] = []

    async def on_delta(text: str, finish: str | None) -> None:
        got.append((text, finish))

    completion = await provider.stream(request, "m", on_delta)
    assert "".join(text for text, _ in got) == completion.content
    assert got[-1][1] == completion.finish_reason
    return completion


def answered(request: LLMRequest, completion: Completion, *results: str) -> LLMRequest:
    """``request`` with the model's calls, and a result for each, added to its messages."""
    document = request.model_dump(by_alias=True)
    document["messages"] += [
        {
            "role": "assistant",
            "content": completion.content or None,
            "tool_calls": [call.model_dump() for call in completion.tool_calls],
        },
        *(
            {"role": "tool", "tool_call_id": call.id, "content": result}
            for call, result in zip(completion.tool_calls, results, strict=True)
        ),
    ]
    return LLMRequest.model_validate(document)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("wire", WIRES)
async def test_a_two_step_conversation_through_the_simulator(
    sim: SimulatorServer, client: aiohttp.ClientSession, wire: str, streamed: bool
) -> None:
    first = make_request("weather in Oslo")

    asked = await ask(wire, streamed, first, sim, client)

    [call] = asked.tool_calls
    assert call.id.startswith(PREFIX[wire])
    assert call.function == FunctionCall(
        name="get_weather", arguments='{"city":"weather in Oslo","days":42}'
    )
    assert (asked.content, asked.finish_reason) == ("", "tool_calls")

    final = await ask(wire, streamed, answered(first, asked, "rain, 9C"), sim, client)

    assert (final.content, final.finish_reason, final.tool_calls) == (
        "Tool results: rain, 9C",
        "stop",
        (),
    )


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("wire", WIRES)
async def test_streamed_or_not_the_same_calls(
    sim: SimulatorServer, client: aiohttp.ClientSession, wire: str, streamed: bool
) -> None:
    request = make_request("get_time and weather [parallel-tools]")

    whole = await ask(wire, False, request, sim, client)
    again = await ask(wire, streamed, request, sim, client)

    assert [c.function.name for c in whole.tool_calls] == ["get_weather", "get_time"]
    assert again.tool_calls == whole.tool_calls
    final = await ask(wire, streamed, answered(request, whole, "rain", "09:00"), sim, client)
    assert final.content == "Tool results: rain; 09:00"


@pytest.mark.parametrize("wire", WIRES)
async def test_parallel_calls_turned_off_and_tool_choice(
    sim: SimulatorServer, client: aiohttp.ClientSession, wire: str
) -> None:
    text = "weather [parallel-tools]"

    async def names(**fields: Any) -> list[str]:
        completion = await ask(wire, False, make_request(text, **fields), sim, client)
        return [call.function.name for call in completion.tool_calls]

    assert await names() == ["get_weather", "get_time"]
    assert await names(parallel_tool_calls=False) == ["get_weather"]
    assert await names(tool_choice={"type": "function", "function": {"name": "get_time"}}) == [
        "get_time"
    ]
    assert await names(tool_choice="required", parallel_tool_calls=False) == ["get_weather"]
    assert await names(tool_choice="none") == []


async def test_response_format_through_the_openai_wire(
    sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    json_object = make_request("hello", tools=None, response_format={"type": "json_object"})
    schema = {"name": "forecast", "schema": WEATHER}
    json_schema = make_request(
        "hello", tools=None, response_format={"type": "json_schema", "json_schema": schema}
    )

    as_object = await ask("openai", False, json_object, sim, client)
    as_schema = await ask("openai", True, json_schema, sim, client)

    assert orjson.loads(as_object.content) == {"answer": "echo: hello"}
    assert orjson.loads(as_schema.content) == {"city": "echo: hello", "days": 42}


async def test_response_format_refused_by_the_anthropic_wire(
    sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    request = make_request("hello", response_format={"type": "json_object"})

    with pytest.raises(ProviderError) as caught:
        await ask("anthropic", False, request, sim, client)

    assert (caught.value.error_type, caught.value.retryable) == ("invalid_request", False)


# --- the response cache ------------------------------------------------------------------------


def key(request: LLMRequest) -> str | None:
    return ResponseCache(None, key_prefix="k:", ttl_s=1).key(request, "openai", "m")  # type: ignore[arg-type]


def test_the_cache_key_covers_every_field_of_function_calling() -> None:
    def variant(**fields: Any) -> str | None:
        return key(make_request("hi", **{"tools": None, **fields}))

    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    after_call = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "09:00"},
    ]
    other_arguments = {**call, "function": {"name": "get_time", "arguments": '{"zone":"UTC"}'}}
    other_call = [after_call[0], {**after_call[1], "tool_calls": [other_arguments]}, after_call[2]]
    other_result = [*after_call[:2], {**after_call[2], "tool_call_id": "c2"}]
    other_call_id = [
        after_call[0],
        {**after_call[1], "tool_calls": [{**call, "id": "c2"}]},
        other_result[2],
    ]
    narrower = {**TOOLS[0], "function": {**TOOLS[0]["function"], "parameters": ZONE}}
    schema = {"name": "x", "schema": WEATHER}

    base = variant()
    different = [
        variant(tools=TOOLS),
        variant(tools=TOOLS[:1]),
        variant(tools=[narrower]),
        variant(tools=TOOLS, tool_choice="auto"),
        variant(tools=TOOLS, tool_choice="required"),
        variant(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
        variant(tools=TOOLS, parallel_tool_calls=False),
        variant(tools=TOOLS, parallel_tool_calls=True),
        variant(response_format={"type": "json_object"}),
        variant(response_format={"type": "json_schema", "json_schema": schema}),
        variant(server_tools=["lookup"]),
        variant(server_tools=["lookup", "fetch"]),
        variant(messages=after_call),
        variant(messages=other_call),
        variant(messages=other_result),
        variant(messages=other_call_id),
    ]
    assert len({base, *different}) == len(different) + 1
    # Not part of the question: whether the answer is streamed.
    assert variant(stream=True) == base


def test_a_plain_request_keeps_the_key_it_had_before_function_calling() -> None:
    request = make_request("hi", tools=None, temperature=0.0, client_id="c")
    # The key's document as it was before function calling, spelled out.
    before = {
        "client": "c",
        "provider": "openai",
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "name": None}],
        "temperature": 0.0,
        "top_p": None,
        "max_tokens": None,
        "stop": None,
    }

    assert cache_key_material(request, "openai", "m") == orjson.dumps(
        before, option=orjson.OPT_SORT_KEYS
    )
    assert (
        key(request)
        == "k:cache:" + hashlib.sha256(cache_key_material(request, "openai", "m")).hexdigest()
    )


def test_a_session_request_is_never_cached() -> None:
    assert key(make_request("hi", session_id="s-1")) is None
    assert key(make_request("hi")) is not None


@pytest.mark.integration
async def test_a_cached_answer_keeps_its_tool_calls(
    redis_client: aioredis.Redis, unique: str
) -> None:
    cache = ResponseCache(redis_client, key_prefix=f"test-{unique}:", ttl_s=60)
    calls = (
        ToolCall(id="c1", function=FunctionCall(name="get_time", arguments='{"zone":"UTC"}')),
        ToolCall(id="c2", function=FunctionCall(name="get_weather", arguments="{}")),
    )
    answer = Completion("", "tool_calls", 3, 4, 7, "openai", "m", calls)
    where = key(make_request("hi"))
    assert where is not None

    assert await cache.put(where, answer) == "store"
    assert await cache.get(where) == (answer, "hit")


# --- through the worker's request path ---------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5"])
async def test_tool_calls_reach_llm_responses(
    services: Services, sim: SimulatorServer, model: str, streamed: bool
) -> None:
    first = make_request("weather in Oslo", model=model, stream=streamed, cache=True)
    again = first.model_copy(update={"request_id": f"{first.request_id}-again"})

    async with rig(sim, worker_settings(services.redis_url)) as r:
        await r.process(first)
        await r.process(again)
        calls = [len(await r.calls(request.request_id)) for request in (first, again)]

    [response, cached] = r.responses()
    assert r.errors() == []
    assert response.finish_reason == "tool_calls"
    [call] = response.tool_calls or []
    assert call.id.startswith(PREFIX[model.partition("/")[0]])
    assert call.function == FunctionCall(
        name="get_weather", arguments='{"city":"weather in Oslo","days":42}'
    )
    # The same question again: answered from the cache, the calls with it.
    assert (cached.cached, cached.tool_calls, cached.finish_reason) == (
        True,
        response.tool_calls,
        "tool_calls",
    )
    assert calls == [1, 0]
