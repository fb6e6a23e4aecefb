"""Streamed requests through the worker: chunks on llm-response-chunks that a consumer reassembles
into exactly the final responses, over retries, fallbacks, failures and cache hits.

In-process (the real pipeline, Redis and simulator; a list for the broker) for each case, then
a real ``llmstream worker`` process against the real broker for a 200-request run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.outcomes import Output
from llmstream.schemas.codec import encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse, LLMResponseChunk
from tests import harness
from tests.conftest import Services
from tests.inprocess import SOURCE, ListEmitter, Rig, rig, sim, worker_settings
from tests.samples import request

__all__ = ["sim"]  # the module's simulator, for the in-process rigs

OPENAI = "openai/gpt-4o-mini"
ANTHROPIC = "anthropic/claude-sonnet-4-5"


def streamed(request_id: str, model: str = OPENAI, text: str = "hello", **kw: object) -> LLMRequest:
    return request(request_id, model=model, text=text, stream=True, **kw)


def chunks_of(r: Rig, request_id: str | None = None) -> list[LLMResponseChunk]:
    chunks = r.emitter.events(r.settings.chunks_topic, LLMResponseChunk)
    return [c for c in chunks if request_id is None or c.request_id == request_id]


def by_attempt(chunks: Iterable[LLMResponseChunk]) -> dict[int, list[LLMResponseChunk]]:
    attempts: dict[int, list[LLMResponseChunk]] = defaultdict(list)
    for chunk in chunks:
        attempts[chunk.attempt].append(chunk)
    return dict(attempts)


class Follower:
    """A consumer of llm-response-chunks as the contract tells one to be: chunks grouped by
    (request_id, attempt), a higher attempt discarding the lower ones; the answer is the
    attempt the final response names, in index order, once its last chunk arrived.

    Also: a chunk with index 0 begins a call, so what was held for the request is discarded.
    That is the same rule while one worker serves a request; it is the one that holds when a
    worker dies mid-stream and the next owner calls again, counting its attempts from 1.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, dict[int, dict[int, LLMResponseChunk]]] = defaultdict(dict)
        self.discarded: Counter[str] = Counter()  # calls discarded, per request

    def read(self, chunks: Iterable[LLMResponseChunk]) -> None:
        for chunk in chunks:
            seen = self.attempts[chunk.request_id]
            if seen and (chunk.index == 0 or chunk.attempt > max(seen)):
                self.discarded[chunk.request_id] += len(seen)
                seen.clear()
            seen.setdefault(chunk.attempt, {})[chunk.index] = chunk

    def answer(self, response: LLMResponse) -> str | None:
        """The text of ``response``'s attempt, or None while its last chunk is missing."""
        chunks = self.attempts[response.request_id].get(response.attempts, {})
        ordered = [chunks[i] for i in sorted(chunks)]
        if not ordered or ordered[-1].finish_reason is None:
            return None
        assert [c.index for c in ordered] == list(range(len(ordered)))
        assert all(c.finish_reason is None for c in ordered[:-1])
        assert ordered[-1].finish_reason == response.finish_reason
        return "".join(c.delta for c in ordered)


# --- in-process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
async def test_a_streamed_answer_is_its_chunks(
    services: Services, sim: SimulatorServer, model: str
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = f"s-{uuid.uuid4().hex}"
        await r.process(streamed(rid, model, "tell me about the sea"))

        [response] = r.responses()
        chunks = chunks_of(r, rid)
        follower = Follower()
        follower.read(chunks)
        assert follower.answer(response) == response.content == "echo: tell me about the sea"
        assert response.attempts == 1 and {c.attempt for c in chunks} == {1}
        assert {(c.provider, c.model, c.client_id) for c in chunks} == {
            (response.provider, response.model, None)
        }
        # Every chunk was written before the response: a consumer of the response finds them.
        topics = [o.topic for o in r.emitter.outputs]
        assert topics.index(r.settings.responses_topic) > max(
            i for i, t in enumerate(topics) if t == r.settings.chunks_topic
        )
        provider = response.provider
        assert r.sample("llmstream_worker_first_chunk_seconds_count", provider=provider) == 1
        assert r.sample("llmstream_worker_stream_chunks_total", provider=provider) == len(chunks)
        [call] = await r.calls(rid)
        assert call["stream"] is True


async def test_a_request_that_does_not_stream_has_no_chunks(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = f"n-{uuid.uuid4().hex}"
        await r.process(request(rid))

        assert [x.content for x in r.responses()] == ["echo: hello"]
        assert chunks_of(r) == []
        assert [c["stream"] for c in await r.calls(rid)] == [False]


async def test_a_broken_stream_is_retried_as_a_new_attempt(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = f"b-{uuid.uuid4().hex}"
        await r.process(streamed(rid, text="a long answer please [break-stream]"))

        [response] = r.responses()
        attempts = by_attempt(chunks_of(r, rid))
        assert response.attempts == 2 and set(attempts) == {1, 2}
        # The broken attempt's chunks stay, unfinished; the consumer rule discards them.
        assert all(c.finish_reason is None for c in attempts[1])
        follower = Follower()
        follower.read(chunks_of(r, rid))
        assert follower.discarded[rid] == 1
        assert follower.answer(response) == response.content
        assert response.content == "echo: a long answer please [break-stream]"
        assert [c["broken"] for c in await r.calls(rid)] == [True, False]
        assert r.sample("llmstream_retries_total", provider="openai", error_type="connection_error")


async def test_a_stream_that_keeps_breaking_becomes_an_error(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url, max_attempts=3)) as r:
        rid = f"d-{uuid.uuid4().hex}"
        await r.script(rid, *[{"status": 200, "break_stream": True}] * 3)
        await r.process(streamed(rid, ANTHROPIC))

        [error] = r.errors()
        assert r.responses() == []
        assert (error.error_type, error.retryable, error.attempts) == ("connection_error", True, 3)
        assert error.request is not None and error.request.stream  # replayable as it was
        attempts = by_attempt(chunks_of(r, rid))
        assert set(attempts) == {1, 2, 3}
        assert all(c.finish_reason is None for chunks in attempts.values() for c in chunks)
        assert len(await r.calls(rid)) == 3


async def test_a_fallback_streams_as_the_next_attempt(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        rid = f"f-{uuid.uuid4().hex}"
        await r.script(rid, {"status": 404})  # the first model does not exist
        await r.process(streamed(rid, OPENAI, "fall back", fallbacks=[ANTHROPIC]))

        [response] = r.responses()
        assert (response.provider, response.attempts) == ("anthropic", 2)
        chunks = chunks_of(r, rid)
        assert {(c.attempt, c.provider) for c in chunks} == {(2, "anthropic")}
        follower = Follower()
        follower.read(chunks)
        assert follower.answer(response) == response.content == "echo: fall back"


async def test_a_cache_hit_is_one_chunk_of_attempt_zero(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        first, second = f"c1-{uuid.uuid4().hex}", f"c2-{uuid.uuid4().hex}"
        text = f"cache me {uuid.uuid4().hex}"
        await r.process(streamed(first, text=text, cache=True))
        await r.process(streamed(second, text=text, cache=True))

        fresh, cached = r.responses()
        assert (fresh.cached, cached.cached, cached.attempts) == (False, True, 0)
        [chunk] = chunks_of(r, second)
        assert (chunk.attempt, chunk.index, chunk.delta) == (0, 0, fresh.content)
        assert chunk.finish_reason == cached.finish_reason == "stop"
        assert await r.calls(second) == []
        # Counted as a chunk, but a cache hit has no time to first token.
        assert r.sample("llmstream_worker_first_chunk_seconds_count", provider="openai") == 1


class FlakyBroker(ListEmitter):
    """A broker that refuses the 2nd chunk handed to it and fails the write of the 4th (both
    retryable Kafka errors); everything sent again goes through."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = 0

    async def send(self, output: Output) -> Awaitable[object]:
        self.handed += 1
        if self.handed == 2:
            raise KafkaConnectionError("the broker went away")
        if self.handed == 4:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(KafkaTimeoutError())
            return failed
        return await super().send(output)


async def test_chunks_the_broker_failed_are_written_before_the_response(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        broker = FlakyBroker()
        processor = r.processor_with(emitter=broker)
        rid = f"k-{uuid.uuid4().hex}"
        await processor.process(encode(streamed(rid, text="one two three four five")), None, SOURCE)

        [response] = broker.events(r.settings.responses_topic, LLMResponse)
        chunks = broker.events(r.settings.chunks_topic, LLMResponseChunk)
        assert broker.handed >= 6  # the two failed chunks were handed over again
        assert sorted(c.index for c in chunks) == list(range(len(chunks)))
        follower = Follower()
        follower.read(chunks)
        assert follower.answer(response) == response.content == "echo: one two three four five"
        topics = [o.topic for o in broker.outputs]
        assert topics[-2:] == [r.settings.responses_topic, r.settings.metrics_topic]


# --- a worker process, the real broker ------------------------------------------------------


async def read_chunks(
    bootstrap: str, topic: str, follower: Follower, responses: Sequence[LLMResponse]
) -> None:
    """Read ``topic`` from the start into ``follower`` until every response's answer is whole
    (the final response may come before its last chunk)."""
    read = 0

    def whole(chunks: list[LLMResponseChunk]) -> bool:
        nonlocal read
        follower.read(chunks[read:])
        read = len(chunks)
        return all(follower.answer(response) is not None for response in responses)

    await harness.read_topic(bootstrap, topic, LLMResponseChunk, until=whole, timeout=60)


async def test_a_consumer_reassembles_every_answer_of_a_streamed_run(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    chunks_topic: str,
    tmp_path: Path,
) -> None:
    # 200 streamed requests over both wire formats, one of them broken half-way once; one whose
    # stream breaks every time; then a cache hit.
    run = [
        streamed(f"r-{i}", OPENAI if i % 2 else ANTHROPIC, f"question {i} " + "word " * (i % 7))
        for i in range(199)
    ]
    run.append(streamed("broken-once", ANTHROPIC, "answer me [break-stream]"))
    run[7] = streamed("r-7", OPENAI, "the cached question", cache=True)
    breaks = {"request_id": "doomed", "responses": [{"status": 200, "break_stream": True}] * 3}
    await harness.simulator_call(simulator, "POST", "/_sim/script", breaks)
    env = {"LLMSTREAM_CHUNKS_TOPIC": chunks_topic, "LLMSTREAM_MAX_ATTEMPTS": "3"}

    async with harness.running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env):
        await harness.produce_requests(settings, [*run, streamed("doomed", OPENAI, "doomed")])
        responses = await harness.read_answers(settings, len(run), timeout=120)
        await harness.produce_requests(
            settings, [streamed("from-cache", OPENAI, "the cached question", cache=True)]
        )
        responses += await harness.read_topic(
            settings.kafka_bootstrap_servers,
            settings.responses_topic,
            LLMResponse,
            until=lambda got: any(r.request_id == "from-cache" for r in got),
        )
        [error] = await harness.read_outputs(settings, LLMError, 1)

    by_id = {r.request_id: r for r in responses}
    assert set(by_id) == {r.request_id for r in run} | {"from-cache"}
    follower = Follower()
    await read_chunks(
        settings.kafka_bootstrap_servers, chunks_topic, follower, list(by_id.values())
    )
    # Every answer, exactly as its final response says.
    assert {rid: follower.answer(r) for rid, r in by_id.items()} == {
        rid: r.content for rid, r in by_id.items()
    }
    assert all(r.content.startswith("echo: ") for r in by_id.values())
    # One provider call per request, two for the stream that broke once, none for the cache hit.
    calls = await harness.provider_calls(simulator)
    assert {rid: calls.get(rid, 0) for rid in by_id} == {
        rid: {"broken-once": 2, "from-cache": 0}.get(rid, 1) for rid in by_id
    }
    assert by_id["broken-once"].attempts == 2 and follower.discarded["broken-once"] == 1
    assert {r.attempts for rid, r in by_id.items() if rid not in ("broken-once", "from-cache")} == {
        1
    }
    assert (by_id["from-cache"].cached, by_id["from-cache"].attempts) == (True, 0)
    [cached_chunk] = follower.attempts["from-cache"][0].values()
    assert cached_chunk.delta == by_id["r-7"].content
    assert {by_id[f"r-{i}"].provider for i in range(2)} == {"openai", "anthropic"}
    # The stream that broke every time is an error, its partial chunks left unfinished.
    assert (error.request_id, error.error_type, error.attempts) == ("doomed", "connection_error", 3)
    assert calls["doomed"] == 3
    assert set(follower.attempts["doomed"]) == {3}  # the follower kept only the last attempt
    assert all(c.finish_reason is None for c in follower.attempts["doomed"][3].values())


@pytest.mark.slow
async def test_a_stream_cut_by_a_dead_worker_is_called_again_by_the_next_owner(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    chunks_topic: str,
    tmp_path: Path,
) -> None:
    # A slow stream of many pieces, so the first worker dies in the middle of it; the next
    # owner's call answers in fewer pieces.
    await harness.configure_simulator(simulator, stream_chunks=12, stream_chunk_delay_ms=500)
    env = harness.worker_env(
        settings, simulator.url, f"g-{unique}", LLMSTREAM_CHUNKS_TOPIC=chunks_topic
    )
    bootstrap = settings.kafka_bootstrap_servers
    first = harness.WorkerProcess(env, tmp_path, name="first").start()
    try:
        await first.wait_ready()
        await harness.produce_requests(settings, [streamed("cut", text="a slow story to tell")])
        await harness.read_topic(
            bootstrap, chunks_topic, LLMResponseChunk, until=lambda got: len(got) >= 4
        )
    finally:
        first.kill()
    await harness.configure_simulator(simulator, stream_chunks=2, stream_chunk_delay_ms=20)
    second = harness.WorkerProcess(env, tmp_path, name="second").start()
    try:
        [response] = await harness.read_answers(settings, 1, timeout=120)
    finally:
        second.stop()

    chunks = await harness.read_topic(
        bootstrap,
        chunks_topic,
        LLMResponseChunk,
        until=lambda got: bool(got) and got[-1].finish_reason is not None,
    )
    restart = max(i for i, chunk in enumerate(chunks) if chunk.index == 0)
    cut, called_again = chunks[:restart], chunks[restart:]
    # The record counts calls over every owner: the next owner's call is attempt 2, so its
    # chunks are told from the cut ones by their attempt, as the contract's rule says.
    assert {c.attempt for c in cut} == {1} and {c.attempt for c in called_again} == {2}
    assert response.attempts == 2
    assert len(cut) >= 4 > len(called_again)
    follower = Follower()
    follower.read(chunks)
    assert follower.answer(response) == response.content == "echo: a slow story to tell"
    assert follower.discarded["cut"] == 1
    assert (await harness.provider_calls(simulator))["cut"] == 2
