"""The provider simulator's streamed answers and broken streams, read over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from tests.inprocess import sim_http

# The http fixture: a client of this module's sim, reset around each test.
__all__ = ["sim_http"]

ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
PROMPT = "tell me a rather long story about streams"
EXPECTED = f"echo: {PROMPT}"


def openai_body(text: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def anthropic_body(text: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def rid() -> dict[str, str]:
    return {"X-Client-Request-Id": f"sim-{uuid.uuid4().hex}"}


@dataclass
class Streamed:
    """What a client read from one streamed call."""

    status: int
    content_type: str
    events: list[tuple[str | None, Any]]  # (event name, decoded data or "[DONE]")
    broken: httpx.TransportError | None  # the error that ended a stream early
    body: Any = None  # a JSON answer (an error) instead of a stream

    def data(self, name: str | None = None) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name and isinstance(d, dict)]


async def stream(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Streamed:
    async with http.stream("POST", path, json=body, headers=headers or {}) as response:
        content_type = response.headers["content-type"]
        if not content_type.startswith("text/event-stream"):
            await response.aread()
            return Streamed(response.status_code, content_type, [], None, response.json())
        events: list[tuple[str | None, Any]] = []
        name: str | None = None
        broken = None
        try:
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    events.append((name, data if data == "[DONE]" else json.loads(data)))
                    name = None
        except httpx.RemoteProtocolError as exc:
            broken = exc
        return Streamed(response.status_code, content_type, events, broken)


async def openai_stream(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Streamed:
    return await stream(http, "/v1/chat/completions", {**body, "stream": True}, headers)


async def anthropic_stream(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Streamed:
    headers = {**ANTHROPIC_HEADERS, **(headers or {})}
    return await stream(http, "/v1/messages", {**body, "stream": True}, headers)


def openai_text(streamed: Streamed) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in streamed.data() if c["choices"]
    )


def anthropic_text(streamed: Streamed) -> str:
    return "".join(
        e["delta"]["text"]
        for e in streamed.data("content_block_delta")
        if e["delta"]["type"] == "text_delta"
    )


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, seed=1, stream_chunk_delay_ms=0)
    async with SimulatorServer(settings) as server:
        yield server


async def test_openai_stream_is_chat_completion_chunks(http: httpx.AsyncClient) -> None:
    plain = (await http.post("/v1/chat/completions", json=openai_body())).json()
    streamed = await openai_stream(http, openai_body(stream_options={"include_usage": True}))

    assert (streamed.status, streamed.broken) == (200, None)
    assert streamed.content_type.startswith("text/event-stream")
    assert streamed.events[-1] == (None, "[DONE]")
    *chunks, usage = streamed.data()
    assert {c["id"] for c in streamed.data()} == {streamed.data()[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in streamed.data())
    assert all(c["model"] == "gpt-4o-mini" and "created" in c for c in streamed.data())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(pieces) == 8  # the default chunk count
    assert "".join(pieces) == EXPECTED == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == []
    assert usage["usage"] == plain["usage"]


async def test_openai_stream_without_usage_has_no_usage_chunk(http: httpx.AsyncClient) -> None:
    streamed = await openai_stream(http, openai_body())

    assert streamed.events[-1] == (None, "[DONE]")
    assert all(c["choices"] and "usage" not in c for c in streamed.data())
    assert streamed.data()[-1]["choices"][0]["finish_reason"] == "stop"


async def test_anthropic_stream_is_message_events(http: httpx.AsyncClient) -> None:
    plain = (
        await http.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    ).json()
    streamed = await anthropic_stream(http, anthropic_body())

    assert (streamed.status, streamed.broken) == (200, None)
    assert streamed.content_type.startswith("text/event-stream")
    names = [name for name, _ in streamed.events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in streamed.events)
    (start,) = streamed.data("message_start")
    assert start["message"]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    assert (start["message"]["content"], start["message"]["stop_reason"]) == ([], None)
    (block,) = streamed.data("content_block_start")
    assert block == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert anthropic_text(streamed) == EXPECTED == plain["content"][0]["text"]
    (delta,) = streamed.data("message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


async def test_streamed_text_equals_the_answer_with_stops_and_limits(
    http: httpx.AsyncClient,
) -> None:
    stopped = anthropic_body(stop_sequences=["streams"])
    limited = openai_body(max_tokens=3)
    plain_stopped = (
        await http.post("/v1/messages", json=stopped, headers=ANTHROPIC_HEADERS)
    ).json()
    plain_limited = (await http.post("/v1/chat/completions", json=limited)).json()

    streamed_stopped = await anthropic_stream(http, stopped)
    streamed_limited = await openai_stream(http, limited)

    assert anthropic_text(streamed_stopped) == plain_stopped["content"][0]["text"]
    assert streamed_stopped.data("message_delta")[0]["delta"] == {
        "stop_reason": "stop_sequence",
        "stop_sequence": "streams",
    }
    assert openai_text(streamed_limited) == "echo: tell me"
    assert plain_limited["choices"][0]["message"]["content"] == "echo: tell me"
    assert streamed_limited.data()[-1]["choices"][0]["finish_reason"] == "length"


async def test_chunk_count_and_delay_are_configurable(http: httpx.AsyncClient) -> None:
    await http.post("/_sim/config", json={"stream_chunks": 3, "stream_chunk_delay_ms": 100})
    started = time.perf_counter()
    streamed = await anthropic_stream(http, anthropic_body())
    elapsed = time.perf_counter() - started
    await http.post("/_sim/config", json={"stream_chunks": 100, "stream_chunk_delay_ms": 0})
    many = await openai_stream(http, openai_body("hi"))

    assert len(streamed.data("content_block_delta")) == 3
    assert anthropic_text(streamed) == EXPECTED
    assert elapsed >= 0.2  # two waits between three pieces
    # Fewer pieces than asked when the text is shorter: one character each.
    assert [c["choices"][0]["delta"].get("content") for c in many.data()[1:-1]] == list("echo: hi")


async def test_errors_come_before_any_event(http: httpx.AsyncClient) -> None:
    headers = rid()
    await http.post(
        "/_sim/script",
        json={"request_id": headers["X-Client-Request-Id"], "responses": [{"status": 503}]},
    )
    scripted = await anthropic_stream(http, anthropic_body(), headers)
    after_script = await anthropic_stream(http, anthropic_body(), headers)
    await http.post("/_sim/config", json={"rpm_limit": 1})
    await openai_stream(http, openai_body())
    limited = await openai_stream(http, openai_body())
    await http.post("/_sim/config", json={"rpm_limit": 0, "error_rate": 1.0})
    failing = await openai_stream(http, openai_body())

    assert (scripted.status, scripted.events) == (503, [])
    assert scripted.content_type.startswith("application/json")
    assert scripted.body["error"]["type"] == "api_error"
    assert anthropic_text(after_script) == EXPECTED
    assert (limited.status, limited.events) == (429, [])
    assert limited.body["error"]["code"] == "rate_limit_exceeded"
    assert (failing.status, failing.events) == (500, [])


async def test_stream_options_without_stream_is_refused(http: httpx.AsyncClient) -> None:
    body = openai_body(stream_options={"include_usage": True})
    response = await http.post("/v1/chat/completions", json=body)

    assert response.status_code == 400
    assert "stream_options" in response.json()["error"]["message"]


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_marker_breaks_the_first_stream_of_a_request_only(
    http: httpx.AsyncClient, wire: str
) -> None:
    headers, other = rid(), rid()
    text = f"{PROMPT} [break-stream]"
    call = openai_stream if wire == "openai" else anthropic_stream
    body = openai_body(text) if wire == "openai" else anthropic_body(text)
    read = openai_text if wire == "openai" else anthropic_text

    first = await call(http, body, headers)
    second = await call(http, body, headers)
    third = await call(http, body, headers)
    elsewhere = await call(http, body, other)
    stats = (await http.get("/_sim/stats")).json()
    calls = (await http.get("/_sim/calls")).json()["calls"]

    full = f"echo: {text}"
    assert first.status == 200
    assert isinstance(first.broken, httpx.RemoteProtocolError)
    pieces = first.data(None if wire == "openai" else "content_block_delta")
    assert len(pieces) == (5 if wire == "openai" else 4)  # the role chunk, then 4 of 8 pieces
    assert full.startswith(read(first)) and 0 < len(read(first)) < len(full)
    if wire == "openai":
        assert first.events[-1] != (None, "[DONE]")
        assert all(c["choices"][0]["finish_reason"] is None for c in first.data())
    else:
        assert not first.data("message_delta") and not first.data("message_stop")
    assert [s.broken for s in (second, third)] == [None, None]
    assert read(second) == read(third) == full
    assert elsewhere.broken is not None  # another request's first stream
    request_id = headers["X-Client-Request-Id"]
    assert stats["streams_by_request_id"][request_id] == 3
    assert stats["calls_by_request_id"][request_id] == 3
    assert stats["streams_broken_total"] == 2
    assert [(c["stream"], c["broken"], c["status"]) for c in calls] == [
        (True, True, 200),
        (True, False, 200),
        (True, False, 200),
        (True, True, 200),
    ]


async def test_marker_without_an_id_header_goes_by_the_body(http: httpx.AsyncClient) -> None:
    body = openai_body(f"{PROMPT} [break-stream]")
    answered = await http.post("/v1/chat/completions", json=body)  # not a stream: never broken

    first = await openai_stream(http, body)
    again = await openai_stream(http, body)
    different = await openai_stream(http, {**body, "temperature": 0.5})
    stats = (await http.get("/_sim/stats")).json()

    assert answered.status_code == 200
    assert (first.broken is not None, again.broken, different.broken is not None) == (
        True,
        None,
        True,
    )
    assert stats["streams_by_request_id"] == {"": 3}
    assert stats["calls_by_request_id"] == {"": 4}


async def test_break_rate_and_scripted_breaks(http: httpx.AsyncClient) -> None:
    await http.post("/_sim/config", json={"stream_break_rate": 1.0})
    always = [await openai_stream(http, openai_body()) for _ in range(3)]
    plain = await http.post("/v1/chat/completions", json=openai_body())
    await http.post("/_sim/config", json={"stream_break_rate": 0.0})
    headers = rid()
    await http.post(
        "/_sim/script",
        json={
            "request_id": headers["X-Client-Request-Id"],
            "responses": [{"status": 200, "break_stream": True}, {"status": 200}],
        },
    )
    scripted = [await anthropic_stream(http, anthropic_body(), headers) for _ in range(3)]
    stats = (await http.get("/_sim/stats")).json()

    assert all(s.broken is not None and len(s.data()) == 5 for s in always)
    assert all(EXPECTED.startswith(openai_text(s)) for s in always)
    assert plain.json()["choices"][0]["message"]["content"] == EXPECTED
    assert [s.broken is not None for s in scripted] == [True, False, False]
    assert stats["streams_broken_total"] == 4


async def test_a_client_leaving_mid_stream_ends_the_call(
    http: httpx.AsyncClient, sim: SimulatorServer
) -> None:
    await http.post("/_sim/config", json={"stream_chunk_delay_ms": 200})
    async with httpx.AsyncClient(base_url=sim.url) as leaving:
        body = {**openai_body(), "stream": True}
        async with leaving.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
    for _ in range(100):
        stats = (await http.get("/_sim/stats")).json()
        if stats["completed_total"]:
            break
        await asyncio.sleep(0.05)

    assert (stats["in_flight"], stats["completed_total"]) == (0, 1)


async def test_openai_sdk_reads_streams_and_sees_breaks(sim: SimulatorServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="k", max_retries=0)
    async with client:
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        request_id = {"X-Client-Request-Id": f"sdk-{uuid.uuid4().hex}"}
        broken_text = []
        with pytest.raises(openai.APIConnectionError):
            async for chunk in await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "cut me [break-stream]"}],
                stream=True,
                extra_headers=request_id,
            ):
                broken_text.append(chunk.choices[0].delta.content or "")
        async with client.chat.completions.stream(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "cut me [break-stream]"}],
            extra_headers=request_id,
        ) as retried:
            final = await retried.get_final_completion()

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert len(broken_text) == 5  # the role chunk and 4 of the 8 pieces
    assert "echo: cut me [break-stream]".startswith("".join(broken_text))
    assert final.choices[0].message.content == "echo: cut me [break-stream]"
    assert final.choices[0].finish_reason == "stop"
