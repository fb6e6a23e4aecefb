"""Server-side tools: the registry read from LLMSTREAM_TOOLS_FILE, and calls to real HTTP tools on
loopback, every failure an error result for the model, never an exception or a hang."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llmstream.core.tools import (
    ToolExecutor,
    ToolParams,
    ToolRegistry,
    ToolResult,
    ToolsFileError,
    ToolSpec,
    UnknownTool,
)
from llmstream.devtools.processes import free_port
from tests.loopback import LoopbackServer, Received, Reply

SECRET = "s3cret-tool-password"

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}

TOML = """
[[tools]]
name = "get_weather"
description = "The weather in a city."
url = "https://user:s3cret-tool-password@tools.internal/weather"
timeout_s = 5
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }

[[tools]]
name = "now"
description = "The time."
url = "http://tools.internal/now"
"""


def spec(url: str, **extra: Any) -> ToolSpec:
    fields = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER_PARAMETERS,
        "url": url,
        **extra,
    }
    return ToolSpec.model_validate(fields)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def run(
    http: aiohttp.ClientSession, url: str, arguments: str = '{"city": "Oslo"}', **extra: Any
) -> ToolResult:
    executor = ToolExecutor(ToolRegistry([spec(url, **extra)]), http)
    # A hang would end here, failing the test, rather than in the suite's timeout.
    async with asyncio.timeout(60):
        return await executor.execute("get_weather", arguments)


def error_of(result: ToolResult) -> str:
    assert result.status == "error"
    error = orjson.loads(result.content)["error"]
    assert error == result.error
    return str(error)


# -- the registry ---------------------------------------------------------------------------------


def test_toml_and_json_files_register_the_same_tools(tmp_path: Path) -> None:
    toml_file = tmp_path / "tools.toml"
    toml_file.write_text(TOML)
    from_toml = ToolRegistry.from_params(ToolParams(tools_file=toml_file))
    entries = [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "url": f"https://user:{SECRET}@tools.internal/weather",
            "timeout_s": 5,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
        {"name": "now", "description": "The time.", "url": "http://tools.internal/now"},
    ]
    as_list, as_object = tmp_path / "list.json", tmp_path / "object.json"
    as_list.write_text(json.dumps(entries))
    as_object.write_text(json.dumps({"tools": entries}))
    for registry in (from_toml, ToolRegistry.from_file(as_list), ToolRegistry.from_file(as_object)):
        assert registry.names == ("get_weather", "now")
        assert registry.spec("get_weather").timeout_s == 5
        assert registry.spec("now").timeout_s == 10  # the default
        tools = [
            t.model_dump(mode="json", exclude_none=True)
            for t in registry.openai_tools(["now", "get_weather"])
        ]
        assert tools == [
            {
                "type": "function",
                "function": {
                    "name": "now",
                    "description": "The time.",
                    "parameters": {"type": "object", "properties": {}},
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": entries[0]["parameters"],
                },
            },
        ]
        assert SECRET not in repr(registry.spec("get_weather"))
        assert SECRET not in str(tools)
    assert len(ToolRegistry.from_params(ToolParams())) == 0
    assert ToolParams().max_tool_steps == 8


def test_naming_unregistered_tools_is_refused_with_every_unknown_name(tmp_path: Path) -> None:
    registry = ToolRegistry([spec("http://127.0.0.1:9/weather")])
    with pytest.raises(UnknownTool) as refused:
        registry.openai_tools(["get_weather", "search", "browse"])
    assert "search, browse" in str(refused.value)
    assert "registers: get_weather" in str(refused.value)
    with pytest.raises(UnknownTool):
        registry.spec("search")
    with pytest.raises(UnknownTool, match="registers: none"):
        ToolRegistry(()).openai_tools(["search"])


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        ("[[tools]\n", ".toml", "cannot parse"),
        ('{"tools": {"name": "x"}}', ".json", "must hold a list of tools"),
        ('{"tool": []}', ".json", "must hold a list of tools"),
        (
            '[{"name": "x", "description": "d", "url": "ftp://u:s3cret-tool-password@host/x"}]',
            ".json",
            "tools[0]: url: Value error, must be an http:// or https:// URL with a host",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://u:s3cret-tool-password@h:port/"}]',
            ".json",
            "tools[0]: url: Value error, not a URL",
        ),
        (
            '[{"name": "bad name", "description": "d", "url": "http://h/"}]',
            ".json",
            "tools[0]: name: String should match pattern",
        ),
        ('[{"name": "x", "url": "http://h/"}]', ".json", "tools[0]: description: Field required"),
        (
            '[{"name": "x", "description": "d", "url": "http://h/", "headers": {}}]',
            ".json",
            "tools[0]: headers: Extra inputs are not permitted",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://h/", "timeout_s": 0}]',
            ".json",
            "tools[0]: timeout_s: Input should be greater than 0",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://h/"},'
            ' {"name": "x", "description": "d", "url": "http://h/"}]',
            ".json",
            "tool x is registered twice",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://h/",'
            ' "parameters": {"type": "nonsense"}}]',
            ".json",
            "tool x: parameters is not a usable JSON Schema",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://h/",'
            ' "parameters": {"$ref": "http://127.0.0.1:9/schema.json"}}]',
            ".json",
            "tool x: parameters is not a usable JSON Schema",
        ),
    ],
)
def test_a_bad_tools_file_is_refused_saying_where_without_its_secrets(
    tmp_path: Path, content: str, suffix: str, expected: str
) -> None:
    path = tmp_path / f"tools{suffix}"
    path.write_text(content)
    with pytest.raises(ToolsFileError) as refused:
        ToolRegistry.from_params(ToolParams(tools_file=path))
    assert expected in str(refused.value)
    assert "LLMSTREAM_TOOLS_FILE" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_a_missing_tools_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ToolsFileError, match="cannot read LLMSTREAM_TOOLS_FILE"):
        ToolRegistry.from_file(tmp_path / "absent.toml")


# -- calls ----------------------------------------------------------------------------------------


async def test_a_call_posts_the_arguments_object_and_gives_the_answer_to_the_model(
    http: aiohttp.ClientSession,
) -> None:
    async with LoopbackServer(Reply.json({"temperature_c": 21, "sky": "clear"})) as tool:
        executor = ToolExecutor(ToolRegistry([spec(f"{tool.url}/weather")]), http)
        result = await executor.execute(
            "get_weather", '{"city": "Oslo", "days": 2}', idempotency_key="req-1:step-0"
        )
    assert result.status == "ok" and result.error is None and result.error_type is None
    assert orjson.loads(result.content) == {"temperature_c": 21, "sky": "clear"}
    assert result.latency_ms >= 0
    [call] = tool.received
    assert (call.method, call.path) == ("POST", "/weather")
    assert call.json() == {"city": "Oslo", "days": 2}
    assert call.headers["content-type"] == "application/json"
    assert call.headers["idempotency-key"] == "req-1:step-0"


async def test_credentials_in_the_url_are_used_and_never_shown(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with LoopbackServer(Reply.json({"error": "boom"}, status=500)) as tool:
        url = tool.url.replace("http://", f"http://tools:{SECRET}@")
        failed = await run(http, f"{url}/weather")
    [call] = tool.received
    assert call.headers["authorization"].startswith("Basic ")  # the URL's user and password
    refused = await run(http, f"http://tools:{SECRET}@127.0.0.1:{free_port()}/weather")
    assert refused.error_type == "connection_error"
    for result in (failed, refused):
        assert SECRET not in result.model_dump_json()
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("{city: Oslo}", "the arguments are not JSON"),
        ("", "the arguments are not JSON"),
        ('["Oslo"]', "must be a JSON object, not a JSON array"),
        ('"Oslo"', "must be a JSON object, not a JSON string"),
        ("{}", 'arguments: "city" is a required property'),
        ('{"city": 7}', 'arguments.city: 7 is not of type "string"'),
        ('{"city": "Oslo", "days": 0}', "arguments.days: 0 is less than the minimum of 1"),
        ('{"city": "Oslo", "when": "now"}', "Additional properties are not allowed"),
    ],
)
async def test_arguments_that_are_not_what_the_tool_takes_never_reach_it(
    http: aiohttp.ClientSession, arguments: str, expected: str
) -> None:
    async with LoopbackServer(Reply.json({})) as tool:
        result = await run(http, tool.url, arguments)
    assert result.error_type == "invalid_arguments"
    assert expected in error_of(result)
    assert result.latency_ms == 0
    assert tool.received == []


async def test_an_unknown_tool_is_an_error_result(http: aiohttp.ClientSession) -> None:
    async with LoopbackServer(Reply.json({})) as tool:
        executor = ToolExecutor(ToolRegistry([spec(tool.url)]), http)
        result = await executor.execute("search", '{"q": "x"}')
    assert result.error_type == "unknown_tool"
    assert error_of(result) == "there is no tool named 'search'"
    assert tool.received == []


def _status_reply(received: Received) -> Reply:
    status = int(received.path.strip("/"))
    if status == 302:
        return Reply(302, {"location": "http://127.0.0.1:9/elsewhere"})
    if status == 404:
        return Reply.json({"message": "no such city"}, status=404)
    return Reply(status, {"content-type": "text/html"}, b"<html>down</html>")


@pytest.mark.parametrize("status", [302, 400, 404, 500, 503])
async def test_an_answer_other_than_2xx_is_an_error_result(
    http: aiohttp.ClientSession, status: int
) -> None:
    async with LoopbackServer(_status_reply) as tool:
        result = await run(http, f"{tool.url}/{status}")
    assert result.error_type == "http_error"
    assert error_of(result).startswith(f"the tool get_weather answered HTTP {status}")
    assert len(tool.received) == 1  # a redirect is not followed
    content = orjson.loads(result.content)
    # A small JSON error body is the tool's own word to the model; anything else is not passed.
    if status == 404:
        assert content["detail"] == {"message": "no such city"}
    else:
        assert "detail" not in content


@pytest.mark.parametrize(
    ("reply", "error_type", "expected"),
    [
        (
            Reply(200, {"content-type": "text/plain"}, b"sunny"),
            "invalid_answer",
            "did not answer with JSON",
        ),
        (Reply(204), "invalid_answer", "did not answer with JSON"),
        (
            Reply.json({"blob": "x" * 1_100_000}),
            "answer_too_large",
            "answered more than 1,000,000 bytes",
        ),
        (
            Reply.json({"sky": "clear" * 1000}, cut=True),
            "connection_error",
            "the connection closed before the whole answer",
        ),
        (b"SMTP ready\r\n", "connection_error", "could not be reached"),
    ],
)
async def test_an_answer_the_model_cannot_use_is_an_error_result(
    http: aiohttp.ClientSession, reply: Reply | bytes, error_type: str, expected: str
) -> None:
    answer = Reply(raw=reply) if isinstance(reply, bytes) else reply
    async with LoopbackServer(answer) as tool:
        result = await run(http, tool.url)
    assert result.error_type == error_type
    assert expected in error_of(result)


async def test_a_refused_connection_is_an_error_result(http: aiohttp.ClientSession) -> None:
    result = await run(http, f"http://127.0.0.1:{free_port()}/weather")
    assert result.error_type == "connection_error"
    assert "connection refused" in error_of(result)


async def test_a_tool_slower_than_its_timeout_is_an_error_result_not_a_wait(
    http: aiohttp.ClientSession,
) -> None:
    # The tool would answer after 120 s; the call gives up after its 0.2 s.
    async with LoopbackServer(Reply.json({"late": True}, delay_s=120)) as tool:
        result = await run(http, tool.url, timeout_s=0.2)
        assert len(tool.received) == 1
    assert result.error_type == "timeout"
    assert error_of(result) == "the tool get_weather did not answer within 0.2 s"
    assert result.latency_ms >= 200
