"""The request pipeline in process: what one event turns into, on the real Redis and the real
adapters over loopback HTTP to the simulator, with a list standing in for the broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio

from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.dedup import ClaimStatus, DedupStore
from llmstream.schemas.codec import decode
from llmstream.schemas.models import LLMResponse
from tests.conftest import Services
from tests.harness import request
from tests.inprocess import Rig, rig, sim, worker_settings

__all__ = ["sim"]  # the module's provider simulator fixture


@pytest_asyncio.fixture
async def pipeline(services: Services, sim: SimulatorServer) -> AsyncIterator[Rig]:
    async with rig(sim, worker_settings(services.redis_url, max_attempts=3)) as r:
        yield r


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


async def test_success_emits_the_response_and_its_metric_after_storing_it(pipeline: Rig) -> None:
    rid = new_id()

    await pipeline.process(request(rid, text="hello pipeline"))

    [response] = pipeline.responses()
    assert (response.request_id, response.content, response.attempts) == (
        rid,
        "echo: hello pipeline",
        1,
    )
    assert (response.provider, response.model) == ("openai", "gpt-4o-mini")
    assert response.total_tokens > 0
    assert pipeline.metric_statuses() == ["success"]
    assert len(await pipeline.calls(rid)) == 1
    # Stored in Redis: another worker asking for the ID finds it done, with this response.
    other = DedupStore(
        pipeline.redis,
        key_prefix=pipeline.settings.redis_key_prefix,
        worker_token="other-worker",
        lease_ms=10_000,
        result_ttl_s=60,
    )
    await other.heartbeat()
    claim = await other.claim(rid, int(time.time() * 1000))
    assert claim.status is ClaimStatus.DONE and claim.payload is not None
    assert decode(claim.payload, LLMResponse).content == "echo: hello pipeline"


async def test_a_duplicate_request_id_calls_the_provider_once(pipeline: Rig) -> None:
    rid = new_id()

    await pipeline.process(request(rid))
    await pipeline.process(request(rid))

    assert len(await pipeline.calls(rid)) == 1
    assert len(pipeline.responses()) == 1
    assert pipeline.metric_statuses() == ["success", "duplicate"]


async def test_undecodable_bytes_go_to_errors_with_the_raw_bytes(pipeline: Rig) -> None:
    raw = b"\x00\xffnot json at all"

    await pipeline.process(raw)

    [error] = pipeline.errors()
    assert error.raw_payload == raw
    assert error.retryable is False
    assert (error.source_topic, error.source_partition, error.source_offset) == (
        "llm-requests",
        0,
        7,
    )
    assert pipeline.responses() == []
    assert pipeline.metric_statuses() == ["error"]


async def test_retryable_failures_are_retried_until_the_answer(pipeline: Rig) -> None:
    rid = new_id()
    await pipeline.script(rid, {"status": 500}, {"status": 503}, {"status": 200})

    await pipeline.process(request(rid))

    [response] = pipeline.responses()
    assert response.attempts == 3
    assert [c["status"] for c in await pipeline.calls(rid)] == [500, 503, 200]
    assert (
        pipeline.sample("llmstream_retries_total", provider="openai", error_type="provider_error")
        == 2
    )


async def test_retries_stop_at_max_attempts(pipeline: Rig) -> None:
    rid = new_id()
    await pipeline.script(rid, *[{"status": 500}] * 5)

    await pipeline.process(request(rid))

    [error] = pipeline.errors()
    assert (error.error_type, error.status_code, error.attempts) == ("provider_error", 500, 3)
    assert error.request is not None and error.request.request_id == rid  # replayable
    assert len(await pipeline.calls(rid)) == 3


async def test_a_400_is_not_retried(pipeline: Rig) -> None:
    rid = new_id()
    await pipeline.script(rid, {"status": 400}, {"status": 200})

    await pipeline.process(request(rid))

    [error] = pipeline.errors()
    assert (error.error_type, error.status_code, error.retryable, error.attempts) == (
        "invalid_request",
        400,
        False,
        1,
    )
    assert len(await pipeline.calls(rid)) == 1
    assert pipeline.responses() == []


async def test_an_expired_deadline_makes_no_call(pipeline: Rig) -> None:
    rid = new_id()

    await pipeline.process(request(rid, deadline_ms=int(time.time() * 1000) - 1))

    [error] = pipeline.errors()
    assert (error.error_type, error.attempts) == ("expired", 0)
    assert await pipeline.calls(rid) == []
    assert pipeline.metric_statuses() == ["expired"]
