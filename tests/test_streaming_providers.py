"""Streamed provider calls over real HTTP on loopback: the simulator, and a server that writes
a stream exactly as a test lays it out (byte pieces, pauses, a connection dropped mid-stream)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from llmstream.devtools.simulator import AppServer, SimulatorServer, SimulatorSettings
from llmstream.processors.providers import Completion, ProviderError, create_http_client
from llmstream.processors.providers.sse import ServerSentEvent, SSEDecoder
from llmstream.schemas.models import LLMRequest
from tests.adapters import adapter, client
from tests.harness import simulator_call

__all__ = ["client"]  # the module's HTTP client fixture

KEY = "sk-test-STREAM-0123456789abcdef"
PROMPT = "tell me about rivers and the sea ✓ é 😀"


def make_request(text: str = PROMPT) -> LLMRequest:
    return LLMRequest(
        request_id=f"s-{uuid.uuid4().hex}",
        model="m",
        messages=[{"role": "user", "content": text}],  # type: ignore[list-item]
        stream=True,
    )


@dataclass
class Deltas:
    """What ``on_delta`` received, in order."""

    got: list[tuple[str, str | None]] = field(default_factory=list)

    async def __call__(self, text: str, finish_reason: str | None) -> None:
        self.got.append((text, finish_reason))

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.got)


async def stream(
    wire: str, url: str, client: aiohttp.ClientSession, request: LLMRequest | None = None
) -> tuple[Completion, Deltas]:
    deltas = Deltas()
    completion = await adapter(wire, url, client, KEY).stream(
        request or make_request(), "m", deltas
    )
    return completion, deltas


async def stream_failure(wire: str, url: str, client: aiohttp.ClientSession) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await stream(wire, url, client)
    return caught.value


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    settings = SimulatorSettings(port=0, latency_ms=0, stream_chunks=6, stream_chunk_delay_ms=5)
    async with SimulatorServer(settings) as server:
        yield server


# --- a server that writes a stream as laid out -------------------------------------------------

# A piece of the body: bytes to write, a pause (seconds), or an event to wait for.
Piece = bytes | float | asyncio.Event


@dataclass
class Served:
    url: str
    received: list[tuple[dict[str, Any], str]]  # each call's JSON body and Accept header


@contextlib.asynccontextmanager
async def serving(
    pieces: Sequence[Piece], *, content_type: str = "text/event-stream", complete: bool = True
) -> AsyncIterator[Served]:
    """A server whose every answer is ``pieces``, each written (flushed) on its own; without
    ``complete`` the connection is dropped after the last piece, with no end of the body."""
    received: list[tuple[dict[str, Any], str]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        received.append((await request.json(), request.headers.get("accept", "")))
        response = web.StreamResponse(headers={"Content-Type": content_type})
        if not complete:
            response.force_close()
        await response.prepare(request)
        for piece in pieces:
            if isinstance(piece, float):
                await asyncio.sleep(piece)
            elif isinstance(piece, asyncio.Event):
                await piece.wait()
            else:
                await response.write(piece)
        if complete:
            await response.write_eof()
        elif request.transport is not None:
            request.transport.abort()
        return response

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    async with AppServer(app) as server:
        yield Served(server.url, received)


def sse(event: str | None, data: Any) -> bytes:
    name = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"{name}data: {text}\n\n".encode()


def openai_chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return sse(None, {"object": "chat.completion.chunk", "model": "gpt-x", "choices": [choice]})


OPENAI_USAGE = sse(
    None,
    {
        "object": "chat.completion.chunk",
        "model": "gpt-x",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    },
)
OPENAI_DONE = b"data: [DONE]\n\n"


def anthropic_start(model: str = "claude-x") -> list[bytes]:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 7, "cache_read_input_tokens": 2, "output_tokens": 1},
    }
    return [
        sse("message_start", {"type": "message_start", "message": message}),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]


def anthropic_text(text: str) -> bytes:
    return sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


def anthropic_end(stop: str = "end_turn", output_tokens: int = 4) -> list[bytes]:
    return [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]


# --- the SSE decoder ---------------------------------------------------------------------------

DOCUMENT = (
    b": a comment, then an event named twice and data on two lines\r\n"
    b'event: one\r\nevent: message_start\r\ndata: {"a":\r\ndata:  1}\r\n\r\n'
    b"data: \xe2\x9c\x93 \xf0\x9f\x98\x80\r\rdata\n\n"
    b"id: 7\nretry: 10\nevent: ping\n\n"
    b"event: last\ndata:x\n\n"
    b"data: never dispatched"
)
EXPECTED = [
    ServerSentEvent("message_start", '{"a":\n 1}'),
    ServerSentEvent("", "✓ 😀"),
    ServerSentEvent("", ""),
    ServerSentEvent("last", "x"),
]


def test_every_way_of_cutting_a_stream_into_reads_decodes_the_same() -> None:
    assert SSEDecoder().feed(DOCUMENT) == EXPECTED
    for cut in range(len(DOCUMENT) + 1):
        decoder = SSEDecoder()
        assert decoder.feed(DOCUMENT[:cut]) + decoder.feed(DOCUMENT[cut:]) == EXPECTED, cut
    decoder = SSEDecoder()  # a byte per read: CRLFs and UTF-8 sequences split everywhere
    assert [event for i in range(len(DOCUMENT)) for event in decoder.feed(DOCUMENT[i : i + 1])] == (
        EXPECTED
    )


def test_a_line_has_no_length_limit() -> None:
    text = "y" * 3_000_000
    decoder = SSEDecoder()
    body = f"data: {text}\n\n".encode()
    events = [e for i in range(0, len(body), 4096) for e in decoder.feed(body[i : i + 4096])]
    assert events == [ServerSentEvent("", text)]


# --- against the simulator ---------------------------------------------------------------------


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_a_streamed_answer_is_the_whole_answer_in_pieces(
    wire: str, sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    request = make_request()
    completion, deltas = await stream(wire, sim.url, client, request)
    whole = await adapter(wire, sim.url, client, KEY).complete(request.model_copy(), "m")

    assert completion == whole
    assert completion.content == f"echo: {PROMPT}" == deltas.text
    assert [finish for _, finish in deltas.got] == [None] * (len(deltas.got) - 1) + ["stop"]
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    [call, _] = [
        c
        for c in (await simulator_call(sim, "GET", "/_sim/calls"))["calls"]
        if c["request_id"] == request.request_id
    ]
    assert call["stream"] is True and not call["broken"]


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_a_stream_broken_half_way_is_a_retryable_connection_error(
    wire: str, sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    request = make_request("break this one [break-stream]")
    deltas = Deltas()
    with pytest.raises(ProviderError) as caught:
        await adapter(wire, sim.url, client, KEY).stream(request, "m", deltas)

    assert caught.value.error_type == "connection_error" and caught.value.retryable
    assert deltas.got and all(finish is None for _, finish in deltas.got)
    assert f"echo: {request.messages[-1].content}".startswith(deltas.text)
    # The marker breaks the first stream only: the same request completes the second time.
    completion, again = await stream(wire, sim.url, client, request)
    assert completion.content == again.text == f"echo: {request.messages[-1].content}"


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_failures_before_the_stream_are_classified_as_without_one(
    wire: str, sim: SimulatorServer, client: aiohttp.ClientSession
) -> None:
    request = make_request()
    await simulator_call(
        sim,
        "POST",
        "/_sim/script",
        {
            "request_id": request.request_id,
            "responses": [{"status": 429, "retry_after": 2}, {"status": 401}, {"status": 500}],
        },
    )
    errors = []
    for _ in range(3):
        with pytest.raises(ProviderError) as caught:
            await stream(wire, sim.url, client, request)
        errors.append(caught.value)

    assert [(e.error_type, e.retryable, e.status_code) for e in errors] == [
        ("rate_limited", True, 429),
        ("auth_error", False, 401),
        ("provider_error", True, 500),
    ]
    assert errors[0].retry_after is not None and errors[0].retry_after >= 2
    assert all(KEY not in str(e) + repr(e) + (e.body or "") for e in errors)


# --- streams laid out byte by byte -------------------------------------------------------------


async def test_openai_events_split_across_reads_with_comments_and_usage_last(
    client: aiohttp.ClientSession,
) -> None:
    first, second = openai_chunk("Hel"), openai_chunk("lo ✓, ")
    inside_check_mark = second.index("✓".encode()) + 1
    body: list[Piece] = [
        b": keep-alive\n\n",
        first[:9],  # a read ends inside "data:"
        0.02,
        first[9:] + second[:inside_check_mark],  # ... and inside a UTF-8 sequence
        0.02,
        second[inside_check_mark:-1],  # ... and between an event's two line ends
        0.02,
        b"\n" + openai_chunk("wor"),
        openai_chunk("ld", "length"),
        0.02,
        OPENAI_USAGE,
        OPENAI_DONE,
    ]
    async with serving(body) as served:
        completion, deltas = await stream("openai", served.url, client)

    assert deltas.text == "Hello ✓, world" == completion.content
    assert deltas.got[-1][1] == "length" and len(deltas.got) >= 3
    assert (completion.prompt_tokens, completion.completion_tokens, completion.total_tokens) == (
        5,
        3,
        8,
    )
    assert (completion.model, completion.finish_reason) == ("gpt-x", "length")


async def test_each_delta_is_passed_on_as_it_arrives(client: aiohttp.ClientSession) -> None:
    # The server sends the next piece only once the previous one was passed on: the call
    # completes only if every delta is passed on without waiting for more.
    passed = [asyncio.Event() for _ in range(3)]
    deltas: list[tuple[str, str | None]] = []

    async def on_delta(text: str, finish_reason: str | None) -> None:
        deltas.append((text, finish_reason))
        passed[len(deltas) - 1].set()

    body = [*anthropic_start(), anthropic_text("one "), passed[0], anthropic_text("two")]
    body += [passed[1], *anthropic_end()]
    async with serving(body) as served:
        async with asyncio.timeout(30):
            await adapter("anthropic", served.url, client, KEY).stream(
                make_request(), "m", on_delta
            )

    assert deltas == [("one ", None), ("two", None), ("", "stop")]


async def test_anthropic_events_with_pings_and_usage_from_start_and_delta(
    client: aiohttp.ClientSession,
) -> None:
    body = [
        *anthropic_start(),
        sse("ping", {"type": "ping"}),
        anthropic_text("Bon"),
        0.02,
        anthropic_text("jour ✓"),
        sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "not text"},
            },
        ),
        sse("some_future_event", {"type": "some_future_event"}),
        *anthropic_end("max_tokens", output_tokens=9),
    ]
    async with serving(body) as served:
        completion, deltas = await stream("anthropic", served.url, client)

    assert deltas.text == completion.content == "Bonjour ✓"
    assert [finish for _, finish in deltas.got][-1] == "length"
    # Prompt tokens as a whole answer counts them: input plus cache reads.
    assert (completion.prompt_tokens, completion.completion_tokens) == (9, 9)
    assert (completion.total_tokens, completion.model) == (18, "claude-x")


@pytest.mark.parametrize(
    ("kind", "error_type", "retryable"),
    [
        ("overloaded_error", "provider_error", True),
        ("rate_limit_error", "rate_limited", True),
        ("invalid_request_error", "invalid_request", False),
        ("authentication_error", "auth_error", False),
        ("billing_error", "provider_error", False),
    ],
)
async def test_an_anthropic_error_event_mid_stream_is_classified_by_its_type(
    client: aiohttp.ClientSession, kind: str, error_type: str, retryable: bool
) -> None:
    error = {"type": "error", "error": {"type": kind, "message": f"went wrong ({KEY})"}}
    body = [*anthropic_start(), anthropic_text("partial"), sse("error", error)]
    async with serving(body) as served:
        failure = await stream_failure("anthropic", served.url, client)

    assert (failure.error_type, failure.retryable) == (error_type, retryable)
    assert kind in str(failure) and "stream" in str(failure)
    assert KEY not in str(failure) + (failure.body or "")


@pytest.mark.parametrize(
    ("error", "error_type", "retryable"),
    [
        ({"message": "The server had an error", "type": "server_error"}, "provider_error", True),
        ({"message": "quota", "type": "insufficient_quota"}, "rate_limited", False),
        ({"message": "upstream 429", "code": 429}, "rate_limited", True),  # OpenRouter's shape
        ({"message": "bad", "type": "invalid_request_error"}, "invalid_request", False),
    ],
)
async def test_an_openai_error_object_mid_stream_is_classified(
    client: aiohttp.ClientSession, error: dict[str, Any], error_type: str, retryable: bool
) -> None:
    body = [openai_chunk("partial"), sse(None, {"error": error})]
    async with serving(body) as served:
        failure = await stream_failure("openai", served.url, client)

    assert (failure.error_type, failure.retryable, failure.status_code) == (
        error_type,
        retryable,
        None,
    )


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_a_stream_that_ends_without_its_terminating_event_is_retryable(
    wire: str, client: aiohttp.ClientSession
) -> None:
    # A clean end of the body, with the finish reason already said: still not the end event.
    if wire == "openai":
        body = [openai_chunk("all of it", "stop"), OPENAI_USAGE]
    else:
        body = [*anthropic_start(), anthropic_text("all of it"), *anthropic_end()[:2]]
    async with serving(body) as served:
        failure = await stream_failure(wire, served.url, client)

    assert (failure.error_type, failure.retryable) == ("connection_error", True)
    assert "terminating event" in str(failure)


async def test_a_dropped_connection_mid_stream_is_retryable(
    client: aiohttp.ClientSession,
) -> None:
    async with serving([openai_chunk("half")], complete=False) as served:
        failure = await stream_failure("openai", served.url, client)

    assert (failure.error_type, failure.retryable) == ("connection_error", True)


async def test_a_malformed_event_is_a_provider_error() -> None:
    http = create_http_client(timeout_s=10.0, max_connections=5)
    try:
        async with serving([b"data: {not json\n\n"]) as served:
            failure = await stream_failure("openai", served.url, http)
    finally:
        await http.close()
    assert (failure.error_type, failure.retryable) == ("provider_error", False)
    assert "malformed event" in str(failure)


async def test_a_long_answer_is_not_cut_but_a_stalled_one_is() -> None:
    # Each read may take 1 s: an answer that takes 1.5 s in all, 0.1 s between pieces, is
    # whole; one that stalls for 3 s between two pieces times out.
    http = create_http_client(timeout_s=1.0, max_connections=5)
    pieces: list[Piece] = []
    for word in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o"]:
        pieces += [openai_chunk(word), 0.1]
    try:
        async with serving([*pieces, openai_chunk(None, "stop"), OPENAI_DONE]) as served:
            completion, _ = await stream("openai", served.url, http)
        async with serving([openai_chunk("a"), 3.0, openai_chunk("b")]) as served:
            stalled = await stream_failure("openai", served.url, http)
    finally:
        await http.close()

    assert completion.content == "abcdefghijklmno"
    assert (stalled.error_type, stalled.retryable) == ("timeout", True)


async def test_a_server_that_answers_whole_gives_one_delta(client: aiohttp.ClientSession) -> None:
    answer = {
        "model": "gpt-x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "all at once"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }
    async with serving([orjson.dumps(answer)], content_type="application/json") as served:
        completion, deltas = await stream("openai", served.url, client)

    assert deltas.got == [("all at once", "stop")]
    assert completion.content == "all at once" and completion.total_tokens == 5


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_the_call_asks_for_a_stream(wire: str, client: aiohttp.ClientSession) -> None:
    body = [openai_chunk("ok", "stop"), OPENAI_DONE]
    if wire == "anthropic":
        body = [*anthropic_start(), anthropic_text("ok"), *anthropic_end()]
    async with serving(body) as served:
        await stream(wire, served.url, client)

    [(sent, accept)] = served.received
    assert sent["stream"] is True and accept == "text/event-stream"
    if wire == "openai":
        assert sent["stream_options"] == {"include_usage": True}
    else:
        assert "stream_options" not in sent
