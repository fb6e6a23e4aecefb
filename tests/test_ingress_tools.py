"""Function calling through the ingress's OpenAI front, with the official openai SDK unchanged.

Against the real broker, Redis and HTTP over loopback. The first tests stand in for the worker:
they read the published request from the requests topic (so they see exactly what a worker
would get) and produce its answer to the real responses and chunks topics. The last ones run a
real worker process against the provider simulator, in both wire formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from openai.types.chat import ChatCompletion

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import decode
from llmstream.schemas.models import (
    ChatMessage,
    FunctionCall,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
    ResponseFormat,
    Tool,
    ToolCall,
)
from tests.harness import read_raw, running_worker, serve_app
from tests.loopback import LoopbackServer, Received, Reply
from tests.samples import response_to
from tests.test_ingress_streaming import emit_chunks, emit_outcome, streaming_settings

pytestmark = pytest.mark.integration

MODEL = "openai/gpt-4o-mini"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
OSLO = ToolCall(
    id="call_oslo", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
)
TIME = ToolCall(id="call_time", function=FunctionCall(name="get_time", arguments="{}"))


@pytest.fixture
def ingress(settings: ServiceSettings, unique: str, chunks_topic: str) -> IngressSettings:
    return streaming_settings(settings, unique, chunks_topic=chunks_topic)


@contextlib.asynccontextmanager
async def sdk_client(url: str, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, **options
    ) as sdk:
        yield sdk


async def published(
    settings: ServiceSettings, until: Callable[[list[tuple[bytes | None, int, LLMRequest]]], bool]
) -> list[tuple[bytes | None, int, LLMRequest]]:
    """``(key, partition, request)`` of each event on the requests topic, in each partition's
    order, until ``until`` holds (or 30 s)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    found: list[tuple[bytes | None, int, LLMRequest]] = []
    try:
        await consumer._client.force_metadata_update()
        topic = settings.requests_topic
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for _ in range(150):
            if until(found):
                break
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                found += [(r.key, tp.partition, decode(r.value, LLMRequest)) for r in records]
    finally:
        await consumer.stop()
    return found


async def published_request(settings: ServiceSettings, request_id: str) -> LLMRequest:
    """The request ``request_id`` as it was published."""
    events = await published(settings, lambda got: any(r.request_id == request_id for *_, r in got))
    [(key, _, request)] = [e for e in events if e[2].request_id == request_id]
    assert key == (request.session_id or request_id).encode()
    return request


async def stand_in(
    settings: IngressSettings,
    request_id: str,
    answer: Callable[[LLMRequest], LLMResponse],
    *,
    chunks: list[str] | None = None,
) -> LLMRequest:
    """The worker's part for one request: read it as published, emit ``answer(request)``; for a
    streamed request, its text in ``chunks`` (one attempt, the last chunk ending it) first."""
    request = await published_request(settings, request_id)
    response = answer(request)
    if chunks is not None:
        assert request.stream
        await emit_chunks(
            settings,
            [
                LLMResponseChunk(
                    request_id=request_id,
                    attempt=1,
                    index=i,
                    delta=piece,
                    finish_reason=response.finish_reason if i == len(chunks) - 1 else None,
                    created_at_ms=wall_clock_ms(),
                )
                for i, piece in enumerate(chunks)
            ],
        )
    await emit_outcome(settings, response)
    return request


def calls_tools(*calls: ToolCall, content: str = "") -> Callable[[LLMRequest], LLMResponse]:
    """A model answering with these tool calls (Anthropic's stop reason: it maps too)."""
    return lambda r: response_to(r, content, tool_calls=list(calls), finish_reason="tool_use")


async def test_the_openai_sdk_runs_a_function_calling_loop_through_the_ingress(
    ingress: IngressSettings,
) -> None:
    question = {"role": "user", "content": "What is the weather in Oslo?"}
    async with serve_app(create_app(ingress)) as url, sdk_client(url) as sdk:
        worker = asyncio.create_task(stand_in(ingress, "fc-1", calls_tools(OSLO)))
        first = await sdk.chat.completions.create(
            model=MODEL,
            messages=[question],
            tools=[WEATHER],
            tool_choice="auto",
            parallel_tool_calls=False,
            service_tier="flex",
            response_format={"type": "json_object"},
            extra_headers={"Idempotency-Key": "fc-1"},
            extra_body={"server_tools": ["lookup"]},
        )
        asked = await worker
        # The SDK's loop: the answer's message goes back as it came, then the tool's result.
        message = first.choices[0].message
        assert message.tool_calls is not None
        result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"c":21}'}
        worker = asyncio.create_task(
            stand_in(
                ingress,
                "fc-2",
                lambda r: response_to(r, "21 degrees in Oslo.", service_tier="standard"),
            )
        )
        final = await sdk.chat.completions.create(
            model=MODEL,
            messages=[question, message, result],
            tools=[WEATHER],
            extra_headers={"Idempotency-Key": "fc-2"},
        )
        followed = await worker
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert [c.model_dump() for c in message.tool_calls] == [OSLO.model_dump()]
    assert asked.tools == [Tool.model_validate(WEATHER)]
    assert (asked.tool_choice, asked.parallel_tool_calls) == ("auto", False)
    assert asked.response_format == ResponseFormat(type="json_object")
    assert (asked.service_tier, asked.server_tools, asked.stream) == ("flex", ["lookup"], False)
    assert followed.messages == [
        ChatMessage(role="user", content="What is the weather in Oslo?"),
        ChatMessage(role="assistant", content=None, tool_calls=[OSLO]),
        ChatMessage(role="tool", content='{"c":21}', tool_call_id="call_oslo"),
    ]
    assert final.choices[0].message.content == "21 degrees in Oslo."
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"
    assert (first.service_tier, final.service_tier) == (None, "default")  # OpenAI's name


@pytest.mark.parametrize("said", ["", "Let me look."], ids=["calls-only", "with-text"])
async def test_the_sdk_stream_helper_assembles_tool_calls_from_the_final_response(
    ingress: IngressSettings, said: str
) -> None:
    request_id = f"fc-stream-{len(said)}"
    pieces = [said[:4], said[4:]] if said else [""]
    async with serve_app(create_app(ingress)) as url, sdk_client(url) as sdk:
        worker = asyncio.create_task(
            stand_in(ingress, request_id, calls_tools(OSLO, TIME, content=said), chunks=pieces)
        )
        async with sdk.chat.completions.stream(
            model=MODEL,
            messages=[{"role": "user", "content": "weather and time, please"}],
            tools=[WEATHER, CLOCK],
            extra_headers={"Idempotency-Key": request_id},
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_completion()
        await worker
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content == (said or None)
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("call_oslo", "get_weather", '{"city":"Oslo"}'),
        ("call_time", "get_time", "{}"),
    ]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [
        ("get_weather", '{"city":"Oslo"}'),
        ("get_time", "{}"),
    ]


async def test_deprecated_functions_an_unknown_tier_and_broken_tool_messages_are_refused(
    ingress: IngressSettings,
) -> None:
    user = {"role": "user", "content": "hi"}
    bodies: dict[str, dict[str, Any]] = {
        "functions": {"functions": [WEATHER["function"]]},
        "function_call": {"function_call": "auto"},
        "service_tier": {"service_tier": "priority"},
        "tools": {"tools": []},
        "tool_choice.function.name": {
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        },
        "messages.1.tool_call_id": {"messages": [user, {"role": "tool", "content": "21"}]},
        "messages.1.content": {"messages": [user, {"role": "assistant", "content": None}]},
        "messages.0.tool_calls": {"messages": [{**user, "tool_calls": [OSLO.model_dump()]}]},
        "messages.1.function_call": {
            "messages": [user, {"role": "assistant", "function_call": OSLO.function.model_dump()}]
        },
    }
    async with serve_app(create_app(ingress)) as url, httpx.AsyncClient(base_url=url) as http:
        answers = {
            field: await http.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [user], **body}
            )
            for field, body in bodies.items()
        }
    for field, answer in answers.items():
        assert answer.status_code == 400, (field, answer.text)
        assert answer.json()["error"]["param"] == field, answer.text
    for deprecated in ("functions", "function_call", "messages.1.function_call"):
        assert "use tools" in answers[deprecated].json()["error"]["message"]
    raw = await read_raw(ingress.kafka_bootstrap_servers, ingress.requests_topic, 1, 1)
    assert raw == []


async def test_native_requests_take_the_contracts_tool_fields_as_they_are(
    ingress: IngressSettings,
) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [OSLO.model_dump()]},
            {"role": "tool", "content": "21", "tool_call_id": "call_oslo"},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True},
        },
        "server_tools": ["lookup"],
        "service_tier": "batch",
        "stream": True,
    }
    async with serve_app(create_app(ingress)) as url, httpx.AsyncClient(base_url=url) as http:
        accepted = await http.post("/v1/requests", json=body, headers={"Idempotency-Key": "n-1"})
    assert accepted.status_code == 202, accepted.text
    request = await published_request(ingress, "n-1")
    expected = LLMRequest.model_validate(
        {**body, "request_id": "n-1", "created_at_ms": request.created_at_ms}
    )
    assert request == expected


# -- through a real worker and the provider simulator --------------------------------------------

ANTHROPIC = "anthropic/claude-sonnet-4-5"


@pytest.mark.parametrize("model", [MODEL, ANTHROPIC], ids=["openai", "anthropic"])
async def test_a_two_step_function_calling_conversation_with_a_real_worker(
    ingress: IngressSettings,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
    model: str,
) -> None:
    env = {"LLMSTREAM_CHUNKS_TOPIC": ingress.chunks_topic}
    question = {"role": "user", "content": "What is the get_weather in Oslo?"}
    async with (
        running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env),
        serve_app(create_app(ingress)) as url,
        sdk_client(url, timeout=60) as sdk,
    ):

        async def ask(messages: list[Any], streamed: bool) -> ChatCompletion:
            """The model's answer through the SDK: streamed (its helper's whole answer) or not."""
            if not streamed:
                return await sdk.chat.completions.create(
                    model=model, messages=messages, tools=[WEATHER]
                )
            async with sdk.chat.completions.stream(
                model=model, messages=messages, tools=[WEATHER]
            ) as stream:
                return await stream.get_final_completion()

        outcomes = {}
        for streamed in (False, True):
            first = await ask([question], streamed)
            message = first.choices[0].message
            assert first.choices[0].finish_reason == "tool_calls", first
            [call] = message.tool_calls or []
            arguments = json.loads(call.function.arguments)
            # The client runs the tool itself, and sends its result back.
            result = {"city": arguments["city"][:4], "temperature_c": 21}
            # The answer's message goes back as the SDK holds it (the stream helper's snapshot
            # carries fields of its own besides: parsed, annotations, each call's index ...).
            followed_up = [
                question,
                message,
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
            ]
            final = await ask(followed_up, streamed)
            outcomes[streamed] = (call, final)
    for call, final in outcomes.values():
        assert call.function.name == "get_weather"
        assert final.choices[0].finish_reason == "stop"
        assert final.choices[0].message.tool_calls is None
        content = final.choices[0].message.content or ""
        assert "temperature_c" in content and "21" in content, content


async def test_server_tools_named_in_extra_body_are_run_by_the_worker(
    ingress: IngressSettings,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
) -> None:
    def weather(received: Received) -> Reply:
        return Reply.json({"temperature_c": 21, "asked": received.json()})

    async with LoopbackServer(weather) as tool:
        tools_file = tmp_path / "tools.json"
        spec = {**WEATHER["function"], "url": f"{tool.url}/weather", "timeout_s": 5}
        tools_file.write_text(json.dumps([spec]))
        env = {
            "LLMSTREAM_CHUNKS_TOPIC": ingress.chunks_topic,
            "LLMSTREAM_TOOLS_FILE": str(tools_file),
        }
        async with (
            running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env),
            serve_app(create_app(ingress)) as url,
            sdk_client(url, timeout=60) as sdk,
            httpx.AsyncClient(base_url=url) as http,
        ):
            question = [{"role": "user", "content": "the weather in Oslo"}]
            answer = await sdk.chat.completions.create(
                model=MODEL, messages=question, extra_body={"server_tools": ["get_weather"]}
            )
            async with sdk.chat.completions.stream(
                model=ANTHROPIC, messages=question, extra_body={"server_tools": ["get_weather"]}
            ) as stream:
                streamed = await stream.get_final_completion()
            stored = [(await http.get(f"/v1/requests/{a.id}")).json() for a in (answer, streamed)]
        seen = list(tool.received)
    for got, record in zip((answer, streamed), stored, strict=True):
        assert got.choices[0].finish_reason == "stop"
        assert "temperature_c" in (got.choices[0].message.content or "")
        assert got.choices[0].message.tool_calls is None
        assert got.choices[0].message.content == record["response"]["content"]
    steps = [step for record in stored for step in record["response"]["tool_steps"]]
    assert [(step["tool"], step["status"]) for step in steps] == [("get_weather", "ok")] * 2
    # The tool saw exactly one call per step, with the arguments the model wrote.
    assert [r.json() for r in seen] == [json.loads(step["arguments"]) for step in steps]
