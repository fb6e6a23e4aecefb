"""The worker's server-side tool loop: real Redis, the real adapters over loopback HTTP to the
provider simulator (both wire formats), tools served over loopback HTTP; and a worker process
SIGKILLed mid-loop whose request another worker finishes, on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.core.tools import ToolExecutor, ToolRegistry, ToolSpec
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.models import LLMResponseChunk, Tool, ToolFunction
from tests.conftest import Services
from tests.harness import (
    produce_requests,
    provider_calls,
    read_answers,
    request,
    running_worker,
    simulator_call,
)
from tests.inprocess import Rig, rig, sim, worker_settings
from tests.loopback import LoopbackServer, Received, Reply

__all__ = ["sim"]  # the module's provider simulator fixture

OPENAI = "openai/gpt-4o-mini"
ANTHROPIC = "anthropic/claude-sonnet-4-5"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def spec(name: str, url: str, *, timeout_s: float = 10.0) -> ToolSpec:
    return ToolSpec.model_validate(
        {"name": name, "description": f"{name} of a city", "parameters": CITY, "url": url}
        | {"timeout_s": timeout_s}
    )


def weather(received: Received) -> Reply:
    """A weather tool: answers for the city it is asked about."""
    return Reply.json({"city": received.json()["city"], "celsius": 21})


@asynccontextmanager
async def tool_pipeline(
    services: Services, simulator: SimulatorServer, *tools: ToolSpec, **settings: Any
) -> AsyncIterator[Rig]:
    """The worker's request path (as :func:`tests.inprocess.rig`) with ``tools`` registered."""
    async with (
        rig(simulator, worker_settings(services.redis_url, **settings)) as r,
        aiohttp.ClientSession() as http,
    ):
        r.processor = r.processor_with(tools=ToolExecutor(ToolRegistry(tools), http))
        yield r


@asynccontextmanager
async def weather_pipeline(
    services: Services, simulator: SimulatorServer, **settings: Any
) -> AsyncIterator[tuple[LoopbackServer, Rig]]:
    """A ``get_weather`` tool server (see what it received) and a request path that calls it."""
    async with (
        LoopbackServer(weather) as tool,
        tool_pipeline(services, simulator, spec("get_weather", tool.url), **settings) as r,
    ):
        yield tool, r


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
async def test_server_tools_run_between_model_calls_until_the_model_answers(
    services: Services, sim: SimulatorServer, model: str
) -> None:
    rid = new_id()
    async with weather_pipeline(services, sim) as (tool, r):
        text = "[tool-steps:2] get_weather in Paris"
        await r.process(request(rid, model=model, text=text, server_tools=["get_weather"]))

        [response] = r.responses()
        assert r.errors() == []
        # The model read both results, and answered.
        result = orjson.dumps({"city": text, "celsius": 21}).decode()
        assert response.content == f"Tool results: {result}; {result}"
        assert response.finish_reason == "stop" and response.tool_calls is None
        assert [(s.tool, s.status, s.error) for s in response.tool_steps] == [
            ("get_weather", "ok", None),
            ("get_weather", "ok", None),
        ]
        assert all(orjson.loads(s.arguments) == {"city": text} for s in response.tool_steps)
        assert len({s.call_id for s in response.tool_steps}) == 2
        # One POST per step, with the arguments object as its body, each its own key.
        assert [orjson.loads(call.body) for call in tool.received] == [{"city": text}] * 2
        keys = {call.headers.get("idempotency-key") for call in tool.received}
        assert len(keys) == 2 and None not in keys
        # Three model calls, all counted; their usage adds up.
        assert response.attempts == 3 and len(await r.calls(rid)) == 3
        assert response.total_tokens == response.prompt_tokens + response.completion_tokens
        assert response.service_tier == "standard"
        assert r.sample("llmstream_tool_calls_total", tool="get_weather", status="ok") == 2
        assert r.sample("llmstream_tool_latency_seconds_count", tool="get_weather") == 2
        # The steps are not kept once the outcome is stored.
        steps_key = f"{r.settings.redis_key_prefix}steps:{{{rid}}}"
        assert await r.redis.exists(steps_key) == 0


async def test_a_failing_slow_or_non_json_tool_is_an_error_result_the_model_reads(
    services: Services, sim: SimulatorServer
) -> None:
    def tools(received: Received) -> Reply:
        if received.path == "/broken":
            return Reply.json({"detail": "database down"}, status=503)
        if received.path == "/slow":
            return Reply.json({"late": True}, delay_s=30)
        return Reply(200, {"content-type": "text/html"}, b"<html>not json</html>")

    rid = new_id()
    async with LoopbackServer(tools) as server:
        specs = [
            spec("broken", f"{server.url}/broken"),
            spec("slow", f"{server.url}/slow", timeout_s=0.3),
            spec("garbled", f"{server.url}/garbled"),
        ]
        async with tool_pipeline(services, sim, *specs) as r:
            text = "[parallel-tools] check everything"
            await r.process(request(rid, text=text, server_tools=["broken", "slow", "garbled"]))

            [response] = r.responses()
            steps = {s.tool: s for s in response.tool_steps}
            assert {name: s.status for name, s in steps.items()} == dict.fromkeys(
                ["broken", "slow", "garbled"], "error"
            )
            assert steps["broken"].error == "the tool broken answered HTTP 503"
            assert steps["slow"].error == "the tool slow did not answer within 0.3 s"
            assert steps["garbled"].error == "the tool garbled did not answer with JSON"
            # The model was told each failure, and answered anyway.
            for step in steps.values():
                assert step.error is not None and step.error in response.content
            assert "database down" in response.content
            assert response.attempts == 2
            assert r.sample("llmstream_tool_calls_total", tool="broken", status="http_error") == 1
            assert r.sample("llmstream_tool_calls_total", tool="slow", status="timeout") == 1
            assert (
                r.sample("llmstream_tool_calls_total", tool="garbled", status="invalid_answer") == 1
            )


async def test_a_model_that_keeps_calling_tools_fails_as_max_tool_steps_with_its_steps(
    services: Services, sim: SimulatorServer
) -> None:
    rid = new_id()
    async with weather_pipeline(services, sim, max_tool_steps=2) as (tool, r):
        await r.process(request(rid, text="[tool-steps:5] Oslo", server_tools=["get_weather"]))

        assert r.responses() == []
        [error] = r.errors()
        assert error.error_type == "max_tool_steps"
        assert "LLMSTREAM_MAX_TOOL_STEPS is 2" in error.message
        assert [s.status for s in error.tool_steps] == ["ok", "ok"]
        assert error.attempts == 3 and len(await r.calls(rid)) == 3
        assert len(tool.received) == 2
        assert error.request is not None and error.request.server_tools == ["get_weather"]
        assert r.metric_statuses() == ["error"]


async def test_a_server_tool_nobody_registered_is_refused_before_any_call(
    services: Services, sim: SimulatorServer
) -> None:
    rid = new_id()
    async with weather_pipeline(services, sim) as (tool, r):
        await r.process(request(rid, server_tools=["get_weather", "launch_rocket"]))

        [error] = r.errors()
        assert error.error_type == "invalid_request"
        assert "launch_rocket" in error.message and "get_weather" in error.message
        assert await r.calls(rid) == [] and tool.received == []


async def test_a_call_of_a_client_tool_ends_the_loop_and_goes_back_to_the_client(
    services: Services, sim: SimulatorServer
) -> None:
    rid = new_id()
    client_tool = Tool(function=ToolFunction(name="lookup_order", parameters=CITY))
    async with weather_pipeline(services, sim) as (tool, r):
        await r.process(
            request(
                rid,
                text="lookup_order for Rome",
                tools=[client_tool],
                server_tools=["get_weather"],
            )
        )

        [response] = r.responses()
        assert response.finish_reason == "tool_calls"
        assert response.tool_calls is not None
        assert [c.function.name for c in response.tool_calls] == ["lookup_order"]
        assert response.tool_steps == [] and tool.received == []
        assert response.attempts == 1


async def test_a_streamed_loop_streams_every_call_and_the_answer_is_the_last_attempts(
    services: Services, sim: SimulatorServer
) -> None:
    rid = new_id()
    async with weather_pipeline(services, sim) as (_, r):
        await r.process(
            request(rid, text="weather in Lima", stream=True, server_tools=["get_weather"])
        )

        [response] = r.responses()
        assert response.attempts == 2 and len(response.tool_steps) == 1
        chunks = r.emitter.events(r.settings.chunks_topic, LLMResponseChunk)
        last = sorted((c for c in chunks if c.attempt == 2), key=lambda c: c.index)
        assert "".join(c.delta for c in last) == response.content
        assert last[-1].finish_reason == "stop"
        assert {c.attempt for c in chunks} == {1, 2}


async def test_a_worker_killed_mid_loop_leaves_its_steps_to_the_next_which_runs_no_tool_twice(
    settings: ServiceSettings, simulator: SimulatorServer, tmp_path: Path, unique: str
) -> None:
    rid = f"loop-{unique}"
    async with LoopbackServer(weather) as tool:
        tools_file = tmp_path / "tools.json"
        registered = {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": CITY,
            "url": tool.url,
        }
        tools_file.write_bytes(orjson.dumps([registered]))
        env = {"LLMSTREAM_TOOLS_FILE": str(tools_file)}
        group = f"group-{unique}"
        # The second model call hangs: the kill lands after the first step is kept.
        await simulator_call(
            simulator,
            "POST",
            "/_sim/script",
            {
                "request_id": rid,
                "responses": [{"status": 200}, {"status": 200, "delay_ms": 60_000}],
            },
        )
        async with running_worker(settings, simulator.url, group, tmp_path, **env) as first:
            text = "[tool-steps:2] get_weather in Kyiv"
            await produce_requests(
                settings, [request(rid, text=text, server_tools=["get_weather"])]
            )
            for _ in range(600):
                if len(tool.received) == 1 and (await provider_calls(simulator)).get(rid) == 2:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the loop did not reach its second model call:\n{first.log()}")
            first.kill()

        async with running_worker(settings, simulator.url, group, tmp_path, **env) as second:
            [response] = await read_answers(settings, 1, timeout=180)
            assert response.request_id == rid, second.log()

        # One POST per step: the first worker's kept result was not asked again.
        assert len(tool.received) == 2
        assert len({call.headers["idempotency-key"] for call in tool.received}) == 2
        assert [s.status for s in response.tool_steps] == ["ok", "ok"]
        # Calls 1 and 2 by the first worker (the second cut off by the kill), 3 and 4 by the next.
        assert response.attempts == 4 and (await provider_calls(simulator))[rid] == 4
        assert response.content.count('"celsius":21') == 2
