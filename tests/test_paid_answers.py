"""A provider's answer, once it arrived, is delivered and never turned into ``internal_error``:
bad usage counts from the provider, and a failure of ours after the answer is stored, on the real
Redis and real adapters over loopback HTTP (the simulator, or a tiny server answering a fixed
body), with a list standing in for the broker."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmstream.core.record import RecordKeys
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.pipeline import Output
from llmstream.processors.pricing import Price, PriceTable
from llmstream.processors.providers import Completion, ProviderRouter
from llmstream.processors.traffic import TrafficControl
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import SOURCE, ListEmitter, Rig, rig, sim, worker_settings
from tests.loopback import LoopbackServer, Reply

__all__ = ["sim"]  # the module's provider simulator fixture

ABSURD = 10**12  # over the events' 32-bit token fields


def fixed_provider(openai: dict[str, Any], anthropic: dict[str, Any]) -> LoopbackServer:
    """A real HTTP server on loopback answering every call with one body per API."""
    bodies = {"/v1/chat/completions": openai, "/v1/messages": anthropic}
    return LoopbackServer(lambda received: Reply.json(bodies[received.path]))


BAD_USAGE_OPENAI = {
    "id": "x",
    "object": "chat.completion",
    "model": "whatever",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "paid answer"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": -5, "completion_tokens": -7, "total_tokens": -12},
}
BAD_USAGE_ANTHROPIC = {
    "id": "x",
    "type": "message",
    "role": "assistant",
    "model": "whatever",
    "content": [{"type": "text", "text": "paid answer"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": -5, "output_tokens": ABSURD},
}


@pytest_asyncio.fixture
async def bad_usage() -> AsyncIterator[LoopbackServer]:
    async with fixed_provider(BAD_USAGE_OPENAI, BAD_USAGE_ANTHROPIC) as server:
        yield server


async def record_of(r: Rig, request_id: str) -> dict[bytes, bytes]:
    key = RecordKeys(r.settings.redis_key_prefix).record(request_id)
    return cast(dict[bytes, bytes], await r.redis.hgetall(key))


@pytest.mark.parametrize(
    "model",
    [
        "openai/gpt-4o-mini",  # priced: the cost is computed from the counts
        "openai/my-finetune",  # not priced: the token counters see the counts after the emit
        "anthropic/claude-3-5-haiku",
    ],
)
async def test_bad_usage_counts_keep_the_answer_with_one_call(
    services: Services, bad_usage: LoopbackServer, model: str
) -> None:
    # rig() reads only the provider's URL.
    async with rig(cast(SimulatorServer, bad_usage), worker_settings(services.redis_url)) as r:
        rid = f"paid-{uuid.uuid4().hex}"
        await r.process(request(rid, model=model))
        await r.process(request(rid, model=model))  # a redelivery: a duplicate, not a call

        assert r.errors() == []
        [response] = r.responses()
        assert response.content == "paid answer"
        assert (response.prompt_tokens, response.completion_tokens, response.total_tokens) == (
            0,
            0,
            0,
        )
        assert response.cost_usd in (0.0, None)
        assert r.metric_statuses() == ["success", "duplicate"]
        assert len(bad_usage.received) == 1
        stored = await record_of(r, rid)
        assert stored[b"state"] == b"completed" and stored[b"emitted"] == b"1"


class FailsOnceAfterStore:
    """The broker client with a bug: its first emit raises (not a Kafka error, which would be
    retried), after the outcome was stored; later emits go through."""

    def __init__(self) -> None:
        self.inner = ListEmitter()
        self.failed = False

    async def emit(self, outputs: Sequence[Output]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in emitting")
        await self.inner.emit(outputs)


async def test_a_failure_after_the_answer_is_stored_emits_the_answer_not_an_error(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        emitter = FailsOnceAfterStore()
        processor = r.processor_with(emitter=emitter)
        rid = f"paid-{uuid.uuid4().hex}"
        await processor.process(encode(request(rid, text="keep me")), None, SOURCE)

        assert emitter.failed
        assert emitter.inner.events(r.settings.errors_topic, LLMError) == []
        [response] = emitter.inner.events(r.settings.responses_topic, LLMResponse)
        assert response.content == "echo: keep me"
        stored = await record_of(r, rid)
        assert stored[b"state"] == b"completed" and stored[b"emitted"] == b"1"
        assert decode(stored[b"response"], LLMResponse).content == "echo: keep me"
        assert len(await r.calls(rid)) == 1


class Broken:
    """A provider implementation with a bug: raises what no adapter may raise."""

    name = "openai"

    async def complete(self, request: LLMRequest, model: str) -> Completion:
        raise RuntimeError("a bug before any answer")


async def test_a_bug_before_any_answer_is_an_internal_error_with_the_request(
    services: Services, sim: SimulatorServer
) -> None:
    async with rig(sim, worker_settings(services.redis_url)) as r:
        router = ProviderRouter({"openai": Broken()})
        metrics = WorkerMetrics(CollectorRegistry())  # the rig's registry has its traffic's
        traffic = TrafficControl.from_settings(
            r.settings,
            redis=r.redis,
            router=router,
            metrics=metrics,
            worker_token=r.dedup.worker_token,
        )
        processor = r.processor_with(router=router, metrics=metrics, traffic=traffic)
        rid = f"bug-{uuid.uuid4().hex}"
        await processor.process(encode(request(rid)), None, SOURCE)

        [error] = r.errors()
        assert error.error_type == "internal_error" and "a bug before any answer" in error.message
        assert error.request is not None and error.request.request_id == rid  # replayable
        assert (await record_of(r, rid))[b"state"] == b"failed"


def test_a_cost_that_cannot_be_right_is_unknown_never_negative_or_infinite() -> None:
    prices = PriceTable({"m": Price(input=1.0, output=2.0), "inf": Price(input=math.inf, output=1)})
    assert prices.cost("p", "m", 1_000_000, 1_000_000) == 3.0
    assert prices.cost("p", "m", -1_000_000, 0) is None
    assert prices.cost("p", "inf", 1, 0) is None
    assert prices.cost("p", "inf", 0, 0) is None  # inf * 0 is nan
