"""The provider simulator's tool calls and JSON answers, both wire formats, over loopback HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from tests.test_simulator_streams import ANTHROPIC_HEADERS, anthropic_stream, openai_stream

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "threshold": {"type": "number"},
        "metric": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "options": {"type": "object"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "note": {"type": "string"},  # optional: left out
    },
    "required": ["city", "days", "threshold", "metric", "hours", "options", "unit"],
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string"}},
    "required": ["zone"],
}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
]
ANTHROPIC_TOOLS = [
    {"name": "get_weather", "description": "the weather", "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "input_schema": TIME_SCHEMA},
]


def weather_arguments(text: str) -> dict[str, Any]:
    return {
        "city": text,
        "days": 42,
        "threshold": 4.2,
        "metric": True,
        "hours": [],
        "options": {},
        "unit": "celsius",
    }


def openai_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "tools": OPENAI_TOOLS,
        **extra,
    }


def anthropic_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": text}],
        "tools": ANTHROPIC_TOOLS,
        **extra,
    }


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, stream_chunk_delay_ms=0)
    async with SimulatorServer(settings) as server:
        yield server


@pytest_asyncio.fixture
async def http(sim: SimulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        yield client


async def openai_call(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def anthropic_call(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_openai_calls_the_first_tool_with_arguments_from_its_schema(
    http: httpx.AsyncClient,
) -> None:
    text = "what is it like outside? " * 20  # 500 characters: string arguments take 200
    data = await openai_call(http, openai_body(text))

    (choice,) = data["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert (message["role"], message["content"]) == ("assistant", None)
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == weather_arguments(text[:200])


async def test_anthropic_calls_the_tool_the_user_names(http: httpx.AsyncClient) -> None:
    data = await anthropic_call(http, anthropic_body("please use get_time for Paris"))

    assert data["stop_reason"] == "tool_use"
    (block,) = data["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == (
        "get_time",
        {"zone": "please use get_time for Paris"},
    )


async def test_tool_choice_forces_or_forbids(http: httpx.AsyncClient) -> None:
    forced = {"type": "function", "function": {"name": "get_time"}}
    openai_forced = await openai_call(http, openai_body("get_weather please", tool_choice=forced))
    anthropic_forced = await anthropic_call(
        http, anthropic_body("get_weather please", tool_choice={"type": "tool", "name": "get_time"})
    )
    openai_none = await openai_call(http, openai_body("get_weather please", tool_choice="none"))
    anthropic_none = await anthropic_call(
        http, anthropic_body("get_weather please", tool_choice={"type": "none"})
    )

    assert openai_forced["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    assert anthropic_forced["content"][0]["name"] == "get_time"
    assert openai_none["choices"][0]["message"] == {
        "role": "assistant",
        "content": "echo: get_weather please",
        "refusal": None,
        "annotations": [],
    }
    assert openai_none["choices"][0]["finish_reason"] == "stop"
    assert anthropic_none["content"] == [{"type": "text", "text": "echo: get_weather please"}]
    assert anthropic_none["stop_reason"] == "end_turn"


async def test_parallel_marker_calls_every_tool(http: httpx.AsyncClient) -> None:
    text = "both [parallel-tools]"
    openai_data = await openai_call(http, openai_body(text))
    anthropic_data = await anthropic_call(http, anthropic_body(text))
    serial = await openai_call(http, openai_body(text, parallel_tool_calls=False))

    calls = openai_data["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": text}
    assert [b["name"] for b in anthropic_data["content"]] == ["get_weather", "get_time"]
    assert anthropic_data["stop_reason"] == "tool_use"
    assert len(serial["choices"][0]["message"]["tool_calls"]) == 1


async def test_openai_loop_ends_with_text_quoting_tool_results(http: httpx.AsyncClient) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "[tool-steps:2] get_time"}]
    answers = []
    for result in ("12:00 UTC", "13:00 UTC", None):
        data = await openai_call(http, openai_body("", messages=messages))
        choice = data["choices"][0]
        answers.append(choice["finish_reason"])
        if result is None:
            break
        (call,) = choice["message"]["tool_calls"]
        messages = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
        ]

    assert answers == ["tool_calls", "tool_calls", "stop"]
    assert choice["message"]["content"] == "Tool results: 12:00 UTC; 13:00 UTC"
    assert "tool_calls" not in choice["message"]


async def test_anthropic_loop_ends_with_text_quoting_tool_results(http: httpx.AsyncClient) -> None:
    body = anthropic_body("weather in Oslo [parallel-tools]")
    first = await anthropic_call(http, body)
    results = [
        {"type": "tool_result", "tool_use_id": block["id"], "content": content}
        for block, content in zip(
            first["content"], ["rain", [{"type": "text", "text": "09:00"}]], strict=True
        )
    ]
    conversation = [
        *body["messages"],
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": results},
    ]
    final = await anthropic_call(http, {**body, "messages": conversation})

    assert final["stop_reason"] == "end_turn"
    assert final["content"] == [{"type": "text", "text": "Tool results: rain; 09:00"}]


async def test_openai_streams_tool_calls(http: httpx.AsyncClient) -> None:
    await http.post("/_sim/config", json={"stream_chunks": 4})
    body = openai_body("both [parallel-tools]")
    plain = await openai_call(http, body)
    streamed = await openai_stream(http, body)
    await http.post("/_sim/reset")

    chunks = streamed.data()
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    starts = [d["tool_calls"][0] for d in deltas if d.get("tool_calls", [{}])[0].get("id")]
    assert [(s["index"], s["type"], s["function"]["arguments"]) for s in starts] == [
        (0, "function", ""),
        (1, "function", ""),
    ]
    arguments = ["", ""]
    for delta in deltas:
        for fragment in delta.get("tool_calls", []):
            arguments[fragment["index"]] += fragment["function"]["arguments"]
    expected = plain["choices"][0]["message"]["tool_calls"]
    assert [(s["id"], s["function"]["name"]) for s in starts] == [
        (c["id"], c["function"]["name"]) for c in expected
    ]
    assert arguments == [c["function"]["arguments"] for c in expected]
    assert len(deltas) == 1 + 4 + 1 + 4 + 1  # start, 4 pieces, start, 4 pieces, finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert streamed.events[-1] == (None, "[DONE]")


async def test_anthropic_streams_tool_use_blocks(http: httpx.AsyncClient) -> None:
    body = anthropic_body("get_time and get_weather [parallel-tools]")
    plain = await anthropic_call(http, body)
    streamed = await anthropic_stream(http, body)

    starts = streamed.data("content_block_start")
    assert [s["content_block"] for s in starts] == [
        {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
        for b in plain["content"]
    ]
    partial = ["", ""]
    for event in streamed.data("content_block_delta"):
        assert event["delta"]["type"] == "input_json_delta"
        partial[event["index"]] += event["delta"]["partial_json"]
    assert [json.loads(p) for p in partial] == [b["input"] for b in plain["content"]]
    assert [e["index"] for e in streamed.data("content_block_stop")] == [0, 1]
    (delta,) = streamed.data("message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert streamed.events[-1][0] == "message_stop"


async def test_openai_sdk_accumulates_streamed_tool_calls(sim: SimulatorServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="k", max_retries=0)
    async with (
        client,
        client.chat.completions.stream(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "use get_time [parallel-tools]"}],
            tools=OPENAI_TOOLS,
        ) as stream,
    ):
        final = await stream.get_final_completion()

    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"zone": "use get_time [parallel-tools]"}


async def test_json_response_formats(http: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["summary", "score"],
        "additionalProperties": False,
    }
    as_object = await openai_call(
        http,
        {
            "model": "m",
            "messages": [{"role": "user", "content": "rate this"}],
            "response_format": {"type": "json_object"},
        },
    )
    as_schema = await openai_call(
        http,
        {
            "model": "m",
            "messages": [{"role": "user", "content": "rate this"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "rating", "schema": schema, "strict": True},
            },
        },
    )
    streamed = await openai_stream(
        http,
        {
            "model": "m",
            "messages": [{"role": "user", "content": "rate this"}],
            "response_format": {"type": "json_object"},
        },
    )

    content = as_object["choices"][0]["message"]["content"]
    assert json.loads(content) == {"answer": "echo: rate this"}
    assert json.loads(as_schema["choices"][0]["message"]["content"]) == {
        "summary": "echo: rate this",
        "score": 42,
    }
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed.data())
    assert text == content


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            openai_body("x", tool_choice={"type": "function", "function": {"name": "nope"}}),
            "nope",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
            "tools",
        ),
        (
            {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
            "tool_call_id",
        ),
        (openai_body("x", tools=[{"type": "function", "function": {}}]), "name"),
    ],
)
async def test_openai_refuses_malformed_tool_requests(
    http: httpx.AsyncClient, body: dict[str, Any], fragment: str
) -> None:
    response = await http.post("/v1/chat/completions", json=body)

    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


async def test_anthropic_refuses_a_tool_without_input_schema(http: httpx.AsyncClient) -> None:
    body = anthropic_body("x", tools=[{"name": "get_time"}])
    response = await http.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)

    assert response.status_code == 400
    assert "input_schema" in response.json()["error"]["message"]
