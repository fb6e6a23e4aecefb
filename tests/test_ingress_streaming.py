"""Streaming through the ingress: the chunk hub, followers (SSE, WebSocket) and OpenAI's stream.

Everything runs against the real broker, Redis and HTTP over loopback. Where a test needs a worker
that streams, it stands in for one: it reads the request from the requests topic and produces the
chunk events and the outcome to the real topics, as the worker does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect as websocket_connect

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import create_app
from llmstream.ingress.chunks import ChunkHub, FellBehind
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.settings import IngressSettings
from llmstream.processors.dedup import DedupStore
from llmstream.schemas.codec import encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse, LLMResponseChunk
from tests.harness import (
    configure_simulator,
    produce,
    provider_calls,
    read_topic,
    running_worker,
    serve_app,
    simulator_call,
)
from tests.samples import response_to

pytestmark = pytest.mark.integration

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def streaming(settings: ServiceSettings, unique: str, chunks_topic: str) -> IngressSettings:
    """The ingress on this test's topics (``settings`` created its chunks topic too)."""
    return streaming_settings(settings, unique, chunks_topic=chunks_topic)


def streaming_settings(settings: ServiceSettings, unique: str, **overrides: Any) -> IngressSettings:
    values: dict[str, Any] = {
        **settings.model_dump(),
        "chunks_topic": f"{unique}-llm-response-chunks",
        "listener_fetch_max_wait_ms": 50,
        "rate_limit_per_minute": 0,
        "chat_timeout_s": 30,
        **overrides,
    }
    return IngressSettings(**values)


def chunks_of(
    request_id: str, attempt: int, pieces: Sequence[str], *, finish: bool = True
) -> list[LLMResponseChunk]:
    """One attempt's chunks, one per piece; the last ends the attempt when ``finish``."""
    return [
        LLMResponseChunk(
            request_id=request_id,
            attempt=attempt,
            index=i,
            delta=piece,
            finish_reason="stop" if finish and i == len(pieces) - 1 else None,
            provider="openai",
            model="gpt-4o-mini",
            created_at_ms=wall_clock_ms(),
        )
        for i, piece in enumerate(pieces)
    ]


async def emit_chunks(settings: IngressSettings, chunks: Sequence[LLMResponseChunk]) -> None:
    await produce(
        settings.kafka_bootstrap_servers,
        settings.chunks_topic,
        [(c.request_id.encode(), encode(c)) for c in chunks],
    )


async def emit_outcome(settings: IngressSettings, outcome: LLMResponse | LLMError) -> None:
    topic = settings.responses_topic if isinstance(outcome, LLMResponse) else settings.errors_topic
    assert outcome.request_id is not None
    await produce(
        settings.kafka_bootstrap_servers, topic, [(outcome.request_id.encode(), encode(outcome))]
    )


async def chunks_read(registry: CollectorRegistry, at_least: int) -> float:
    """The hub's count of chunk records read, once it reaches ``at_least`` (or after 10 s)."""
    for _ in range(200):
        read = registry.get_sample_value("llmstream_ingress_chunks_read_total") or 0.0
        if read >= at_least:
            return read
        await asyncio.sleep(0.05)
    return registry.get_sample_value("llmstream_ingress_chunks_read_total") or 0.0


async def submit(client: httpx.AsyncClient, request_id: str, text: str = "hello") -> LLMRequest:
    """Submit a request through the ingress (so it is recorded as queued), not streamed."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    answer = await client.post("/v1/requests", json=body, headers={"Idempotency-Key": request_id})
    assert answer.status_code == 202, answer.text
    return LLMRequest.model_validate(
        {**body, "request_id": request_id, "created_at_ms": wall_clock_ms()}
    )


async def server_sent(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(event, data)`` of an SSE answer, until the server ends it."""
    events, name = [], ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


PIECES = ["Kafka ", "is ", "a ", "distributed ", "event ", "log."]


@dataclass
class Halfway:
    """The ingress at ``url`` serving ``request``, whose stand-in worker has emitted the first
    three of ``chunks``, read by the hub."""

    settings: IngressSettings
    url: str
    client: httpx.AsyncClient
    request: LLMRequest
    chunks: list[LLMResponseChunk]

    async def finish(self) -> LLMResponse:
        """The worker's other chunks, then its response (returned)."""
        await emit_chunks(self.settings, self.chunks[3:])
        response = response_to(self.request, "".join(c.delta for c in self.chunks))
        await emit_outcome(self.settings, response)
        return response


@asynccontextmanager
async def halfway(
    settings: IngressSettings,
    registry: CollectorRegistry,
    request_id: str,
    pieces: Sequence[str] = PIECES,
    **client_options: Any,
) -> AsyncIterator[Halfway]:
    """An ingress app and a client to it (``client_options`` for httpx, 30 s timeout unless
    given), and ``request_id`` submitted and three chunks into its answer."""
    chunks = chunks_of(request_id, 1, pieces)
    async with (
        serve_app(create_app(settings, registry=registry)) as url,
        httpx.AsyncClient(base_url=url, **{"timeout": 30, **client_options}) as client,
    ):
        request = await submit(client, request_id)
        await emit_chunks(settings, chunks[:3])
        assert await chunks_read(registry, 3) == 3
        yield Halfway(settings, url, client, request, chunks)


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "read-back"])
async def test_sse_follower_joining_after_the_third_chunk_gets_every_chunk(
    streaming: IngressSettings, kept: bool
) -> None:
    # Kept: the hub vouches for every chunk since it started (no clock skew allowed for). Without
    # a buffer nothing is kept: the follower's first chunks are read back from the topic.
    update = {"stream_clock_skew_s": 0} if kept else {"stream_buffer_bytes": 0}
    settings = streaming.model_copy(update=update)
    registry = CollectorRegistry()
    async with (
        halfway(settings, registry, "follow-1") as run,
        run.client.stream("GET", "/v1/requests/follow-1/stream") as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        response = await run.finish()
        events = await server_sent(answer)
    assert [name for name, _ in events] == ["chunk"] * 6 + ["response"]
    assert [LLMResponseChunk.model_validate(data) for _, data in events[:6]] == run.chunks
    assert LLMResponse.model_validate(events[-1][1]) == response
    read_backs = registry.get_sample_value("llmstream_ingress_chunk_read_backs_total")
    assert read_backs == (0 if kept else 1)
    assert registry.get_sample_value("llmstream_ingress_chunks_read_total") == 6


async def test_websocket_follower_joining_after_the_third_chunk_gets_every_chunk(
    streaming: IngressSettings,
) -> None:
    registry = CollectorRegistry()
    async with halfway(streaming, registry, "ws-1") as run:
        ws_url = run.url.replace("http://", "ws://")
        async with websocket_connect(f"{ws_url}/v1/requests/ws-1/ws") as websocket:
            response = await run.finish()
            messages = [json.loads(message) async for message in websocket]
        # Somebody else's request (an unknown ID) is refused in place of the handshake.
        with pytest.raises(Exception, match="404"):
            async with websocket_connect(f"{ws_url}/v1/requests/x/ws"):
                pass
    assert [m["event"] for m in messages] == ["chunk"] * 6 + ["response"]
    assert [LLMResponseChunk.model_validate(m["data"]) for m in messages[:6]] == run.chunks
    assert LLMResponse.model_validate(messages[-1]["data"]) == response


async def test_a_finished_request_is_followed_at_once_and_others_answer_404(
    streaming: IngressSettings, redis_client: aioredis.Redis
) -> None:
    registry = CollectorRegistry()
    chunks = chunks_of("done-1", 1, PIECES)
    # A long idle limit: the answer must come from what is stored, not from waiting.
    settings = streaming.model_copy(update={"chat_timeout_s": 600})
    async with (
        serve_app(create_app(settings, registry=registry)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        request = await submit(client, "done-1")
        await emit_chunks(settings, chunks)
        response = response_to(request, "".join(PIECES))
        # The worker's part: claim the request, store its response (then it would emit it).
        store = DedupStore(
            redis_client,
            key_prefix=settings.redis_key_prefix,
            worker_token="stand-in",
            lease_ms=30_000,
            result_ttl_s=600,
        )
        await store.heartbeat()
        await store.claim("done-1", wall_clock_ms())
        await store.settle("done-1", failed=False, payload=encode(response), now_ms=wall_clock_ms())
        await chunks_read(registry, 6)
        async with client.stream("GET", "/v1/requests/done-1/stream") as answer:
            events = await server_sent(answer)
        unknown = await client.get("/v1/requests/nobody/stream")
    assert [name for name, _ in events] == ["chunk"] * 6 + ["response"]
    assert LLMResponse.model_validate(events[-1][1]) == response
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"


async def test_two_hundred_followers_of_one_request_cost_one_read_of_the_topic(
    streaming: IngressSettings,
) -> None:
    registry = CollectorRegistry()
    followers = 200
    connected = asyncio.Event()
    opened = 0

    async def follow(client: httpx.AsyncClient) -> list[tuple[str, dict[str, Any]]]:
        nonlocal opened
        async with client.stream("GET", "/v1/requests/many-1/stream") as answer:
            assert answer.status_code == 200
            opened += 1
            if opened == followers:
                connected.set()
            return await server_sent(answer)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    pieces = [f"piece {i} " for i in range(10)]
    async with halfway(streaming, registry, "many-1", pieces, timeout=120, limits=limits) as run:
        tasks = [asyncio.create_task(follow(run.client)) for _ in range(followers)]
        await asyncio.wait_for(connected.wait(), 120)
        await run.finish()
        results = await asyncio.gather(*tasks)
    chunks = run.chunks
    for events in results:
        assert [LLMResponseChunk.model_validate(data) for _, data in events[:-1]] == chunks
        assert events[-1][0] == "response"
    # Each chunk was read from the topic once; the first follower read the first three back
    # (the replica had just started), and the 199 others found them kept.
    assert registry.get_sample_value("llmstream_ingress_chunks_read_total") == len(chunks)
    assert registry.get_sample_value("llmstream_ingress_chunk_read_backs_total") == 1


async def test_a_client_that_does_not_read_is_dropped_and_never_slows_the_others(
    streaming: IngressSettings,
) -> None:
    settings = streaming.model_copy(update={"stream_client_backlog": 20})
    registry = CollectorRegistry()
    hub = ChunkHub(settings, IngressMetrics(registry))
    chunks = chunks_of("slow-1", 1, [f"{i} " for i in range(100)])
    await hub.start()
    try:
        async with hub.subscribe("slow-1") as stalled, hub.subscribe("slow-1") as reader:
            got: list[LLMResponseChunk] = []
            # Bursts of 10, each once the reader has the last: the reader is never 20 behind.
            for burst in range(0, len(chunks), 10):
                await emit_chunks(settings, chunks[burst : burst + 10])
                got += [await asyncio.wait_for(reader.next(), 30) for _ in range(10)]
            assert got == chunks  # all 100, though the other client read none
            assert stalled.dropped and not reader.dropped
            assert [stalled.ready() for _ in range(20)] == chunks[:20]
            with pytest.raises(FellBehind):
                await stalled.next()
    finally:
        await hub.stop()
    assert registry.get_sample_value("llmstream_ingress_stream_dropped_total") == 1


async def stand_in_worker(
    settings: IngressSettings,
    request_id: str,
    attempts: Sequence[tuple[list[str], bool]],
    *,
    outcome: str | None = "",
    between: asyncio.Event | None = None,
) -> LLMRequest:
    """Waits for ``request_id`` on the requests topic, then streams each attempt's pieces
    (``(pieces, finished)``; after the first, once ``between`` is set) and emits the outcome:
    the last attempt's text (``outcome=""``), that text, or with None a provider error."""
    published = await read_topic(
        settings.kafka_bootstrap_servers,
        settings.requests_topic,
        LLMRequest,
        until=lambda got: any(r.request_id == request_id for r in got),
        timeout=30,
    )
    [request] = [r for r in published if r.request_id == request_id]
    assert request.stream
    for attempt, (pieces, finished) in enumerate(attempts, start=1):
        if attempt > 1 and between is not None:
            await asyncio.wait_for(between.wait(), 30)
        for chunk in chunks_of(request_id, attempt, pieces, finish=finished):
            await emit_chunks(settings, [chunk])
    if outcome is None:
        error = LLMError(
            request_id=request_id,
            error_type="provider_error",
            message="HTTP 500 from http://provider.internal:8000/v1/chat/completions",
            status_code=500,
            attempts=len(attempts),
            occurred_at_ms=wall_clock_ms(),
        )
        await emit_outcome(settings, error)
    else:
        content = outcome or "".join(attempts[-1][0])
        await emit_outcome(settings, response_to(request, content, attempts=len(attempts)))
    return request


def texts(chunks: Sequence[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


async def sdk_stream(
    url: str,
    request_id: str | None = None,
    text: str = "a sentence",
    *,
    on_chunk: Callable[[list[Any]], Awaitable[None]] | None = None,
    **options: Any,
) -> list[Any]:
    """The chunks the async openai SDK gets for one streamed chat request (``options`` are the
    SDK's: ``model``, ``stream_options``, ``n`` ...); ``on_chunk`` sees them as they come."""
    options.setdefault("model", MODEL)
    headers = {"Idempotency-Key": request_id} if request_id else {}
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            messages=[{"role": "user", "content": text}],
            stream=True,
            extra_headers=headers,
            **options,
        )
        got: list[Any] = []
        async for chunk in stream:
            got.append(chunk)
            if on_chunk is not None:
                await on_chunk(got)
        return got


async def test_the_openai_sdk_streams_through_the_ingress_sync_and_async(
    streaming: IngressSettings,
) -> None:
    async with serve_app(create_app(streaming)) as url:
        worker = asyncio.create_task(stand_in_worker(streaming, "sdk-async", [(PIECES, True)]))
        got = await sdk_stream(url, "sdk-async", stream_options={"include_usage": True})
        await worker

        def sync_stream() -> list[Any]:
            with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sync:
                return list(
                    sync.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "what is Kafka?"}],
                        stream=True,
                        extra_headers={"Idempotency-Key": "sdk-sync"},
                    )
                )

        worker = asyncio.create_task(stand_in_worker(streaming, "sdk-sync", [(PIECES, True)]))
        got_sync = await asyncio.to_thread(sync_stream)
        await worker
    for chunks, request_id in ((got, "sdk-async"), (got_sync, "sdk-sync")):
        assert {c.id for c in chunks} == {request_id}
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len(texts(chunks)) >= 2
        assert "".join(texts(chunks)) == "".join(PIECES)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert got[-1].choices == [] and got[-1].usage is not None
    assert got[-1].usage.total_tokens == 7
    assert all(c.usage is None for c in got_sync)


async def test_a_stream_broken_half_way_and_retried_gives_the_client_the_text_once(
    streaming: IngressSettings,
) -> None:
    answer = ["The ", "quick ", "brown ", "fox ", "jumps."]
    half_sent = asyncio.Event()

    async def note_half(got: list[Any]) -> None:
        if "".join(texts(got)) == "".join(answer[:3]):
            half_sent.set()

    async with serve_app(create_app(streaming)) as url:
        # Attempt 1 breaks after three chunks; attempt 2 starts once the client has those.
        attempts = [(answer[:3], False), (answer, True)]
        worker = asyncio.create_task(
            stand_in_worker(streaming, "broken-1", attempts, between=half_sent)
        )
        got = await sdk_stream(url, "broken-1", on_chunk=note_half)
        await worker
    assert half_sent.is_set()
    assert "".join(texts(got)) == "".join(answer)
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "stop"


async def test_a_retried_stream_that_differs_or_a_failure_ends_with_an_error_chunk(
    streaming: IngressSettings,
) -> None:
    half_sent = asyncio.Event()

    async def note_text(got: list[Any]) -> None:
        if texts(got):
            half_sent.set()

    async with serve_app(create_app(streaming)) as url:
        attempts = [(["Once ", "upon "], False), (["Another ", "answer."], True)]
        worker = asyncio.create_task(
            stand_in_worker(streaming, "differs-1", attempts, between=half_sent)
        )
        with pytest.raises(openai.APIError) as differs:
            await sdk_stream(url, "differs-1", on_chunk=note_text)
        await worker
        worker = asyncio.create_task(
            stand_in_worker(streaming, "fails-1", [(["Half "], False)], outcome=None)
        )
        with pytest.raises(openai.APIError) as fails:
            await sdk_stream(url, "fails-1")
        await worker
        with pytest.raises(openai.BadRequestError) as several:
            await sdk_stream(url, text="two answers", n=2)
    assert "GET /v1/requests/differs-1" in differs.value.message
    assert differs.value.code == "stream_diverged"
    assert fails.value.code == "provider_error"
    assert fails.value.message == "the provider failed"  # never the worker's message
    assert several.value.status_code == 400
    assert several.value.body["param"] == "n"  # type: ignore[index]


async def test_without_the_chunks_topic_a_stream_comes_whole_at_its_end(
    settings: ServiceSettings, unique: str
) -> None:
    missing = streaming_settings(settings, unique, chunks_topic=f"{unique}-not-created")
    async with serve_app(create_app(missing)) as url:
        worker = asyncio.create_task(
            stand_in_worker(missing, "whole-1", [([], False)], outcome="x")
        )
        got = await sdk_stream(url, "whole-1")
        await worker
    assert texts(got) == ["x"]


# -- through a real worker and the provider simulator --------------------------------------------


async def test_a_workers_answer_streams_to_the_openai_sdk_while_it_is_generated(
    streaming: IngressSettings,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
) -> None:
    # Ten pieces 300 ms apart: the answer takes the provider about three seconds.
    await configure_simulator(simulator, stream_chunks=10, stream_chunk_delay_ms=300)
    env = {"LLMSTREAM_CHUNKS_TOPIC": streaming.chunks_topic}
    streamed: dict[str, tuple[list[str], dict[str, Any]]] = {}
    async with (
        running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env),
        serve_app(create_app(streaming)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for model in (MODEL, "anthropic/claude-sonnet-4-5"):
            stats: dict[str, Any] = {}

            async def first_text(got: list[Any], stats: dict[str, Any] = stats) -> None:
                # Asked once, at the first piece of text: the provider is still answering.
                if len(texts(got)) == 1 and not stats:
                    stats.update(await simulator_call(simulator, "GET", "/_sim/stats"))

            text = f"tell me about {model}"
            got = await sdk_stream(url, text=text, on_chunk=first_text, model=model)
            streamed[got[0].id] = (texts(got), stats)
        final = {rid: (await http.get(f"/v1/requests/{rid}")).json() for rid in streamed}
    for request_id, (pieces, while_generating) in streamed.items():
        assert len(pieces) >= 2
        assert while_generating["in_flight"] == 1
        # The answers before this one were complete; this one was not.
        assert while_generating["completed_total"] == list(streamed).index(request_id)
        assert final[request_id]["status"] == "completed"
        assert "".join(pieces) == final[request_id]["response"]["content"]
    assert {f["response"]["provider"] for f in final.values()} == {"openai", "anthropic"}


async def test_a_broken_provider_stream_is_retried_and_a_client_that_leaves_loses_nothing(
    streaming: IngressSettings,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
) -> None:
    await configure_simulator(simulator, stream_chunks=8, stream_chunk_delay_ms=100)
    env = {"LLMSTREAM_CHUNKS_TOPIC": streaming.chunks_topic}
    async with (
        running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env),
        serve_app(create_app(streaming)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        # The simulator cuts this one's first stream half-way; the worker calls again.
        retried = await sdk_stream(url, "broken-real", "a long answer [break-stream]")
        # The same request again (its Idempotency-Key): not called again, its chunks are read
        # back from the topic, the broken attempt's among them.
        replayed = await sdk_stream(url, "broken-real", "a long answer [break-stream]")
        # A client that reads the first piece and hangs up.
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "I will not wait"}],
            "stream": True,
        }
        headers = {"Idempotency-Key": "left-1"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as left:
            async for line in left.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
        for _ in range(300):
            after = (await http.get("/v1/requests/left-1")).json()
            if after["status"] != "pending":
                break
            await asyncio.sleep(0.05)
        broken = (await http.get("/v1/requests/broken-real")).json()
    assert broken["response"]["attempts"] == 2
    assert "".join(texts(retried)) == broken["response"]["content"]
    assert "".join(texts(replayed)) == broken["response"]["content"]
    assert after["status"] == "completed"
    assert after["response"]["content"] == "echo: I will not wait"
    calls = await provider_calls(simulator)
    assert (calls["broken-real"], calls["left-1"]) == (2, 1)


async def test_with_api_keys_a_client_follows_only_its_own_requests(
    streaming: IngressSettings,
) -> None:
    keys = {"sk-a-not-a-real-key": "a", "sk-b-not-a-real-key": "b"}
    settings = streaming.model_copy(
        update={"api_keys": {hashlib.sha256(k.encode()).hexdigest(): c for k, c in keys.items()}}
    )
    registry = CollectorRegistry()
    mine = [c.model_copy(update={"client_id": "a"}) for c in chunks_of("own-1", 1, PIECES)]
    # An event with the same ID produced straight to Kafka by someone else: not a's to see.
    stranger = chunks_of("own-1", 1, ["not yours"], finish=False)[0]
    stranger = stranger.model_copy(update={"client_id": "b", "index": 3})
    as_a = {"Authorization": "Bearer sk-a-not-a-real-key"}
    as_b = {"Authorization": "Bearer sk-b-not-a-real-key"}
    async with (
        serve_app(create_app(settings, registry=registry)) as url,
        httpx.AsyncClient(base_url=url, timeout=30, headers=as_a) as client,
    ):
        request = await submit(client, "own-1")
        await emit_chunks(settings, [*mine[:3], stranger])
        await chunks_read(registry, 4)
        not_b = await client.get("/v1/requests/own-1/stream", headers=as_b)
        ws_url = url.replace("http://", "ws://") + "/v1/requests/own-1/ws"
        with pytest.raises(Exception, match="404"):
            async with websocket_connect(ws_url, additional_headers=as_b):
                pass
        with pytest.raises(Exception, match="401"):
            async with websocket_connect(ws_url):
                pass
        async with client.stream("GET", "/v1/requests/own-1/stream") as answer:
            await emit_chunks(settings, mine[3:])
            response = response_to(request, "".join(PIECES), client_id="a")
            await emit_outcome(settings, response)
            events = await server_sent(answer)
    assert not_b.status_code == 404
    assert [LLMResponseChunk.model_validate(data) for _, data in events[:-1]] == mine
    assert events[-1] == ("response", json.loads(encode(response)))
