"""Function calling in the provider adapters, against a loopback server (`tests/loopback.py`) that
records exactly what was sent and answers exactly what a test lays out: the bodies both wire
formats send, what each refuses before any call, and tool calls from a provider that do not fit
the contract."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from llmstream.processors.providers import Completion, ProviderError
from llmstream.schemas.models import FunctionCall, LLMRequest, ToolCall
from tests.adapters import adapter, client
from tests.loopback import LoopbackServer, Reply

__all__ = ["client"]  # the module's HTTP client fixture

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER,
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
# A conversation after a model called two tools at once: the calls, the results, and more.
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather and time in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 9C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:00", "name": "get_time"},
    {"role": "user", "content": "and tomorrow?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {**CALL, "id": "call_3", "function": {**CALL["function"], "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_3", "content": "sun"},
]
OPENAI_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
ANTHROPIC_ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 1, "output_tokens": 1},
}
ANSWERS = {"openai": OPENAI_ANSWER, "anthropic": ANTHROPIC_ANSWER}


def make_request(**fields: Any) -> LLMRequest:
    document: dict[str, Any] = {
        "request_id": f"t-{uuid.uuid4().hex}",
        "model": "m",
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
        **fields,
    }
    return LLMRequest.model_validate(document)


async def sent_body(client: aiohttp.ClientSession, wire: str, request: LLMRequest) -> Any:
    """The JSON body the ``wire`` adapter sends for ``request``."""
    async with LoopbackServer(Reply.json(ANSWERS[wire])) as server:
        await adapter(wire, server.url, client).complete(request, "m")
    [sent] = server.received
    return sent.json()


async def refused(client: aiohttp.ClientSession, wire: str, request: LLMRequest) -> ProviderError:
    """What the ``wire`` adapter raises for ``request`` without calling the server."""
    async with LoopbackServer(Reply.json(ANSWERS[wire])) as server:
        with pytest.raises(ProviderError) as caught:
            await adapter(wire, server.url, client).complete(request, "m")
    assert server.received == []
    return caught.value


# --- what is sent ------------------------------------------------------------------------------


async def test_openai_sends_function_calling_as_openai_documents_it(
    client: aiohttp.ClientSession,
) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "forecast", "schema": WEATHER, "strict": True},
    }
    request = make_request(
        messages=CONVERSATION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        response_format=response_format,
    )

    body = await sent_body(client, "openai", request)

    assert body == {
        "model": "m",
        "messages": CONVERSATION,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": response_format,
    }


@pytest.mark.parametrize(
    "response_format", [{"type": "json_object"}, {"type": "text"}], ids=["json_object", "text"]
)
async def test_openai_sends_response_format_without_tools(
    client: aiohttp.ClientSession, response_format: dict[str, Any]
) -> None:
    body = await sent_body(client, "openai", make_request(response_format=response_format))

    assert body["response_format"] == response_format
    assert body.keys() == {"model", "messages", "response_format"}


async def test_anthropic_maps_tools_calls_and_results_to_its_blocks(
    client: aiohttp.ClientSession,
) -> None:
    request = make_request(messages=CONVERSATION, tools=TOOLS, tool_choice="required")

    body = await sent_body(client, "anthropic", request)

    assert body == {
        "model": "m",
        "max_tokens": 4096,
        "system": "be brief",
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "input_schema": WEATHER,
                "strict": True,
            },
            {"name": "get_time", "input_schema": {"type": "object"}},
        ],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": "weather and time in Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    },
                    {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                ],
            },
            # Both results of one turn in one user message, in order.
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "rain, 9C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "09:00"},
                ],
            },
            {"role": "user", "content": "and tomorrow?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_3", "name": "get_weather", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_3", "content": "sun"}],
            },
        ],
    }


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        (None, None, None),
        (None, True, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", None, {"type": "auto"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", None, {"type": "none"}),
        ("none", False, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            None,
            {"type": "tool", "name": "get_time"},
        ),
        (
            {"type": "function", "function": {"name": "get_time"}},
            False,
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        ),
    ],
)
async def test_anthropic_tool_choice(
    client: aiohttp.ClientSession,
    tool_choice: Any,
    parallel: bool | None,
    expected: dict[str, Any] | None,
) -> None:
    request = make_request(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel)

    body = await sent_body(client, "anthropic", request)

    assert body.get("tool_choice") == expected


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_tool_choice_and_parallel_calls_go_only_with_tools(
    client: aiohttp.ClientSession, wire: str
) -> None:
    # Tools only on the server's side, not yet added by the worker: neither API takes a tool
    # choice without tools, so neither is sent.
    request = make_request(
        server_tools=["lookup"], tool_choice="required", parallel_tool_calls=False
    )

    body = await sent_body(client, wire, request)

    assert not {"tools", "tool_choice", "parallel_tool_calls"} & body.keys()


@pytest.mark.parametrize("arguments", ["[1, 2]", '"Oslo"', "{not json", "null"])
async def test_anthropic_refuses_arguments_that_are_no_json_object(
    client: aiohttp.ClientSession, arguments: str
) -> None:
    call = {**CALL, "function": {"name": "get_weather", "arguments": arguments}}
    request = make_request(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        ],
        tools=TOOLS,
    )

    error = await refused(client, "anthropic", request)

    assert (error.error_type, error.retryable) == ("invalid_request", False)
    assert "messages.1.tool_calls.0.function.arguments is not a JSON object" in str(error)


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
async def test_anthropic_refuses_a_response_format(
    client: aiohttp.ClientSession, kind: str
) -> None:
    schema = {"name": "x", "schema": WEATHER} if kind == "json_schema" else None
    request = make_request(response_format={"type": kind, "json_schema": schema})

    error = await refused(client, "anthropic", request)

    assert (error.error_type, error.retryable) == ("invalid_request", False)
    assert str(error) == "anthropic: response_format is not supported by the anthropic wire format"


async def test_anthropic_takes_a_text_response_format(client: aiohttp.ClientSession) -> None:
    body = await sent_body(client, "anthropic", make_request(response_format={"type": "text"}))

    assert "response_format" not in body and "output_config" not in body


# --- what is read ------------------------------------------------------------------------------


def openai_with(calls: list[Any], finish: str = "tool_calls") -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    return {**OPENAI_ANSWER, "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def anthropic_with(blocks: list[Any]) -> dict[str, Any]:
    return {**ANTHROPIC_ANSWER, "content": blocks, "stop_reason": "tool_use"}


def weather_call(call_id: str = "call_1", arguments: str = '{"city":"Oslo"}') -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name="get_weather", arguments=arguments))


async def answer(client: aiohttp.ClientSession, wire: str, body: Any) -> Completion:
    async with LoopbackServer(Reply.json(body)) as server:
        return await adapter(wire, server.url, client).complete(make_request(tools=TOOLS), "m")


async def test_openai_tool_calls_are_read_with_their_finish_reason(
    client: aiohttp.ClientSession,
) -> None:
    text = '{ "city": "Oslo" }'  # as the model wrote it: kept to the byte
    body = openai_with([{**CALL, "function": {"name": "get_weather", "arguments": text}}])

    completion = await answer(client, "openai", body)

    assert completion.tool_calls == (weather_call(arguments=text),)
    assert (completion.content, completion.finish_reason) == ("", "tool_calls")


async def test_openai_arguments_sent_as_an_object_become_json_text(
    client: aiohttp.ClientSession,
) -> None:
    # Some OpenAI-compatible servers send the arguments object itself.
    body = openai_with([{"id": "c", "function": {"name": "get_weather", "arguments": {"a": 1}}}])

    completion = await answer(client, "openai", body)

    assert completion.tool_calls == (weather_call("c", '{"a":1}'),)


async def test_anthropic_tool_use_blocks_are_read_as_tool_calls(
    client: aiohttp.ClientSession,
) -> None:
    body = anthropic_with(
        [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
        ]
    )

    completion = await answer(client, "anthropic", body)

    assert completion.tool_calls == (
        weather_call("toolu_1"),
        ToolCall(id="toolu_2", function=FunctionCall(name="get_time", arguments="{}")),
    )
    assert (completion.content, completion.finish_reason) == ("Checking.", "tool_calls")


BAD_NAME = {**CALL, "function": {"name": "get weather", "arguments": "{}"}}
LONG_NAME = {**CALL, "function": {"name": "x" * 65, "arguments": "{}"}}


@pytest.mark.parametrize(
    ("wire", "body", "reason"),
    [
        ("openai", openai_with([BAD_NAME]), "function.name: String should match pattern"),
        ("openai", openai_with([LONG_NAME]), "function.name: String should have at most 64"),
        ("openai", openai_with([{**CALL, "id": ""}]), "id: String should have at least 1"),
        ("openai", openai_with([{**CALL, "id": None}]), "has no string id, name or arguments"),
        ("openai", openai_with([CALL, CALL]), "two tool calls have the id 'call_1'"),
        ("openai", openai_with([{**CALL, "type": "custom"}]), "has no string id, name"),
        (
            "anthropic",
            anthropic_with([{"type": "tool_use", "id": "t", "name": "a.b", "input": {}}]),
            "function.name: String should match pattern",
        ),
        (
            "anthropic",
            anthropic_with([{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]),
            "tool call 'f': its input is not a JSON object",
        ),
    ],
    ids=["name", "long-name", "empty-id", "no-id", "same-id", "not-function", "a-name", "input"],
)
async def test_a_tool_call_that_does_not_fit_the_contract_is_a_malformed_response(
    client: aiohttp.ClientSession, wire: str, body: dict[str, Any], reason: str
) -> None:
    async with LoopbackServer(Reply.json(body)) as server:
        with pytest.raises(ProviderError) as caught:
            await adapter(wire, server.url, client).complete(make_request(tools=TOOLS), "m")

    error = caught.value
    assert (error.error_type, error.retryable) == ("provider_error", False)
    assert f"{wire}: malformed response from http://127.0.0.1:" in str(error)
    assert reason in str(error)


# --- streams -----------------------------------------------------------------------------------


def openai_events(*deltas: dict[str, Any], finish: str = "tool_calls") -> bytes:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    chunks = [{**head, "choices": [{"index": 0, "delta": delta}]} for delta in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    lines = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks]
    return b"".join(lines) + b"data: [DONE]\n\n"


def anthropic_events(*events: dict[str, Any]) -> bytes:
    start = {"type": "message_start", "message": {"model": "claude", "usage": {"input_tokens": 3}}}
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use"},
        "usage": {"output_tokens": 5},
    }
    every = [start, *events, end, {"type": "message_stop"}]
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in every
    )


def tool_use(index: int, call_id: str, name: str, *pieces: str) -> list[dict[str, Any]]:
    """A ``tool_use`` block's events, its input in ``pieces`` of partial JSON."""
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": piece},
            }
            for piece in pieces
        ),
        {"type": "content_block_stop", "index": index},
    ]


def fragment(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


async def streamed(
    client: aiohttp.ClientSession, wire: str, events: bytes
) -> tuple[Completion | ProviderError, list[tuple[str, str | None]]]:
    """The completion (or the error) of a stream of ``events``, and what ``on_delta`` got."""
    got: list[tuple[str, str | None]] = []

    async def on_delta(text: str, finish: str | None) -> None:
        got.append((text, finish))

    reply = Reply(200, {"content-type": "text/event-stream"}, events)
    async with LoopbackServer(reply) as server:
        try:
            result: Completion | ProviderError = await adapter(wire, server.url, client).stream(
                make_request(tools=TOOLS, stream=True), "m", on_delta
            )
        except ProviderError as exc:
            result = exc
    return result, got


async def test_openai_stream_builds_each_call_from_its_fragments(
    client: aiohttp.ClientSession,
) -> None:
    first = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    events = openai_events(
        {"role": "assistant", "content": "Checking. "},
        fragment(0, **first),
        fragment(0, function={"arguments": '{"ci'}),
        # A second call interleaved, and a server that repeats the ID and name.
        fragment(1, id="call_2", function={"name": "get_time", "arguments": "{"}),
        fragment(0, id="call_1", function={"name": "get_weather", "arguments": 'ty":"Oslo"}'}),
        fragment(1, function={"arguments": "}"}),
    )

    completion, got = await streamed(client, "openai", events)

    assert isinstance(completion, Completion)
    assert completion.tool_calls == (
        weather_call(),
        ToolCall(id="call_2", function=FunctionCall(name="get_time", arguments="{}")),
    )
    assert (completion.content, completion.finish_reason) == ("Checking. ", "tool_calls")
    # The chunks carry the text only, and end with the finish reason.
    assert got[-1][1] == "tool_calls" and "".join(text for text, _ in got) == "Checking. "


async def test_anthropic_stream_builds_each_call_from_its_partial_json(
    client: aiohttp.ClientSession,
) -> None:
    text = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hm."}},
        {"type": "content_block_stop", "index": 0},
    ]
    events = anthropic_events(
        *text,
        *tool_use(1, "toolu_1", "get_weather", '{"city"', ': "Os', 'lo"}'),
        *tool_use(2, "toolu_2", "get_time"),  # no input pieces: no arguments
    )

    completion, got = await streamed(client, "anthropic", events)

    assert isinstance(completion, Completion)
    assert completion.tool_calls == (
        weather_call("toolu_1"),
        ToolCall(id="toolu_2", function=FunctionCall(name="get_time", arguments="{}")),
    )
    assert (completion.content, completion.finish_reason) == ("Hm.", "tool_calls")
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 5)
    assert got[-1][1] == "tool_calls" and "".join(text for text, _ in got) == "Hm."


@pytest.mark.parametrize(
    ("wire", "events", "reason"),
    [
        (
            "openai",
            openai_events(fragment(0, id="c", function={"name": "get weather", "arguments": "{}"})),
            "String should match pattern",
        ),
        (
            "openai",
            openai_events(fragment(0, function={"name": "get_weather", "arguments": "{}"})),
            "id: String should have at least 1",
        ),
        (
            "anthropic",
            anthropic_events(*tool_use(0, "toolu_1", "get_weather", '{"city": "Os')),
            "tool call 'get_weather': its streamed input is not JSON",
        ),
        (
            "anthropic",
            anthropic_events(*tool_use(0, "toolu_1", "get_weather", "[1]")),
            "tool call 'get_weather': its input is not a JSON object",
        ),
    ],
    ids=["openai-name", "openai-no-id", "anthropic-cut-json", "anthropic-not-object"],
)
async def test_a_streamed_tool_call_that_does_not_fit_is_a_malformed_response(
    client: aiohttp.ClientSession, wire: str, events: bytes, reason: str
) -> None:
    error, got = await streamed(client, wire, events)

    assert isinstance(error, ProviderError)
    assert (error.error_type, error.retryable) == ("provider_error", False)
    assert f"{wire}: malformed response in the stream from http://127.0.0.1:" in str(error)
    assert reason in str(error)
    # Found before the last chunk: no chunk says the answer completed.
    assert all(finish is None for _, finish in got)
