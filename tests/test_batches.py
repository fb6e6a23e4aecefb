"""The batch tier in process: the real pipeline, collector and poller on real Redis, the provider
simulator's batch endpoints over loopback HTTP, and a list in place of the broker. The same on
the real broker, with worker processes killed, is tests/test_batches_broker.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from llmstream.core.catalog import BUILTIN_PRICES
from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import State, SubmissionStore, WorkerOp
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.batches import BatchTier, batch_apis
from llmstream.processors.dedup import DedupStore
from llmstream.processors.providers.settings import (
    EndpointConfig,
)
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse
from tests.conftest import Services
from tests.inprocess import Rig, worker_settings
from tests.inprocess import rig as inprocess_rig
from tests.samples import request, response_to

OPENAI = "openai/gpt-4o-mini"
ANTHROPIC = "anthropic/claude-3-5-haiku"


@dataclass
class BatchRig(Rig):
    """One worker's pipeline and batch tier, with its background tasks running."""

    tier: BatchTier
    dies: bool = False  # at the end of its block, gone without a goodbye: its lease lapses

    async def outcomes(self, count: int, polls: int = 600) -> list[LLMResponse | LLMError]:
        """Every response and error, once there are ``count`` (or after ``polls`` * 50 ms)."""
        for _ in range(polls):
            found: list[LLMResponse | LLMError] = [*self.responses(), *self.errors()]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        return [*self.responses(), *self.errors()]

    async def state(self, request_id: str) -> str | None:
        raw = await self.redis.hget(self.dedup.key(request_id), "state")
        return raw.decode() if raw is not None else None


def batch_settings(services: Services, **overrides: Any) -> WorkerSettings:
    """Small batches that go at once and are polled often; short retry waits."""
    fields: dict[str, Any] = {
        "batch_max_requests": 8,
        "batch_max_wait_s": 0.2,
        "batch_poll_interval_s": 0.1,
        "lease_ms": 2000,
        **overrides,
    }
    return worker_settings(services.redis_url, **fields)


@asynccontextmanager
async def batch_rig(
    sim: SimulatorServer,
    settings: WorkerSettings,
    *,
    openai_url: str | None = None,
    anthropic_url: str | None = None,
    endpoints: dict[str, EndpointConfig] | None = None,
) -> AsyncIterator[BatchRig]:
    """A worker's pipeline and batch tier calling ``sim`` (OpenAI or Anthropic at another URL
    when given, and any other ``endpoints``)."""
    async with inprocess_rig(
        sim,
        settings,
        openai_url=openai_url,
        anthropic_url=anthropic_url,
        endpoints=endpoints or {},
    ) as base:
        tier = BatchTier(
            settings,
            apis=batch_apis(base.providers, base.router, base.http),
            router=base.router,
            dedup=base.dedup,
            traffic=base.traffic,
            metrics=base.metrics,
        )
        parts = {**vars(base), "processor": base.processor_with(batches=tier)}
        rig = BatchRig(**parts, tier=tier)

        async def heartbeat() -> None:
            while True:
                await rig.dedup.heartbeat()
                await asyncio.sleep(settings.lease_ms / 4000)

        background = [asyncio.create_task(heartbeat()), asyncio.create_task(tier.run())]
        try:
            yield rig
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await tier.close(0 if rig.dies else 1.0)
            if rig.dies:
                await rig.dedup.resign()


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    """The simulator, answering batches 300 ms after they are created."""
    settings = SimulatorSettings(port=0, latency_ms=0, batch_delay_ms=300, seed=1)
    async with SimulatorServer(settings) as server:
        yield server


async def stats(server: SimulatorServer) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        found: dict[str, Any] = (await client.get(f"{server.url}/_sim/stats")).json()
    return found


def batch_price(model: str, response: LLMResponse) -> float:
    price = BUILTIN_PRICES[model.partition("/")[2]]
    batch_input, batch_output = price.input / 2, price.output / 2
    return (response.prompt_tokens * batch_input + response.completion_tokens * batch_output) / 1e6


def batch_request(
    request_id: str, model: str = OPENAI, text: str = "hello", **kw: Any
) -> LLMRequest:
    return request(request_id, model=model, text=text, service_tier="batch", **kw)


# -- answered through the batch endpoints ----------------------------------------------------------


async def test_batch_requests_are_answered_through_the_providers_batch_apis_only(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    requests = [batch_request(f"oa-{i}", OPENAI, f"question {i}") for i in range(20)]
    requests += [batch_request(f"an-{i}", ANTHROPIC, f"question {i}") for i in range(10)]
    async with batch_rig(sim, settings) as rig:
        # Each returns once a batch holds its request: what lets the worker commit its offset.
        await asyncio.gather(*(rig.process(r) for r in requests))
        states = {await rig.state(r.request_id) for r in requests}
        assert states <= {State.BATCHED, State.COMPLETED}
        outcomes = await rig.outcomes(len(requests))
        seen = await stats(sim)

    responses = {r.request_id: r for r in outcomes if isinstance(r, LLMResponse)}
    assert sorted(responses) == sorted(r.request_id for r in requests)
    assert len(outcomes) == len(requests)  # one outcome each
    for original in requests:
        response = responses[original.request_id]
        assert response.service_tier == "batch"
        assert response.content == f"echo: {original.messages[0].content}"
        assert response.attempts == 1
        assert response.cost_usd == pytest.approx(batch_price(original.model, response))
    # Only through the batch endpoints, each request in one batch, no batch over 8.
    assert seen["calls_by_request_id"] == {}
    assert all(len(ids) == 1 for ids in seen["batches_by_request_id"].values())
    sizes: dict[str, int] = {}
    for [batch] in seen["batches_by_request_id"].values():
        sizes[batch] = sizes.get(batch, 0) + 1
    assert max(sizes.values()) <= 8 and sum(sizes.values()) == len(requests)
    assert len(sizes) == 5  # 20 OpenAI requests in 3 batches, 10 Anthropic ones in 2
    assert rig.sample("llmstream_batch_turnaround_seconds_count", provider="openai") == 3
    assert rig.sample("llmstream_saved_usd_total", provider="openai", tier="batch") > 0


async def test_a_request_whose_record_says_batched_is_acked_without_a_call(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services, batch_max_wait_s=0.05)
    original = batch_request("again-1")
    async with batch_rig(sim, settings) as rig:
        await rig.process(original)
        await rig.process(original)  # the event again (a rebalance): a batch holds it
        [response] = await rig.outcomes(1)
        await asyncio.sleep(0.3)  # a second answer would be out by now
        assert len(rig.responses()) == 1
    assert response.service_tier == "batch"
    seen = await stats(sim)
    assert len(seen["batches_by_request_id"]["again-1"]) == 1
    assert seen["calls_by_request_id"] == {}


# -- per-line errors and expiry ------------------------------------------------------------------


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
async def test_a_retryable_line_error_goes_in_a_later_batch_and_a_permanent_one_fails(
    services: Services, sim: SimulatorServer, model: str
) -> None:
    settings = batch_settings(services)
    flaky = batch_request("flaky", model, "[batch-error:500:1] once more")
    refused = batch_request("refused", model, "[batch-error:400] never")
    fine = batch_request("fine", model, "fine")
    async with batch_rig(sim, settings) as rig:
        await asyncio.gather(*(rig.process(r) for r in (flaky, refused, fine)))
        outcomes = {o.request_id: o for o in await rig.outcomes(3)}
        await asyncio.sleep(0.3)  # nothing more comes
        assert len(rig.responses()) + len(rig.errors()) == 3
    seen = await stats(sim)

    answer = outcomes["flaky"]
    assert isinstance(answer, LLMResponse) and answer.service_tier == "batch"
    assert answer.attempts == 2  # its first batch failed it, the next answered
    assert len(seen["batches_by_request_id"]["flaky"]) == 2
    error = outcomes["refused"]
    assert isinstance(error, LLMError)
    assert (error.error_type, error.retryable, error.status_code) == ("invalid_request", False, 400)
    assert error.request == refused  # carried whole, for replay
    assert len(seen["batches_by_request_id"]["refused"]) == 1
    assert isinstance(outcomes["fine"], LLMResponse)
    assert seen["calls_by_request_id"] == {}


async def test_a_line_that_keeps_failing_fails_after_max_attempts_batches(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services, max_attempts=2)
    async with batch_rig(sim, settings) as rig:
        await rig.process(batch_request("doomed", OPENAI, "[batch-error:503] always"))
        [error] = await rig.outcomes(1)
    assert isinstance(error, LLMError)
    assert (error.error_type, error.retryable, error.attempts) == ("provider_error", True, 2)
    assert len((await stats(sim))["batches_by_request_id"]["doomed"]) == 2


async def test_an_expired_batch_is_sent_again_or_called_at_once_when_the_deadline_is_near(
    services: Services, sim: SimulatorServer
) -> None:
    # Another batch may take the providers' whole window: only a request with a day to spare
    # goes in one again; one due in ten minutes is called now, at the standard tier.
    settings = batch_settings(services, batch_min_deadline_s=3600)
    patient = batch_request("patient", OPENAI, "[batch-expire:1] later is fine")
    due = batch_request(
        "due", OPENAI, "[batch-expire:1] soon", deadline_ms=wall_clock_ms() + 600_000
    )
    async with batch_rig(sim, settings) as rig:
        await asyncio.gather(rig.process(patient), rig.process(due))
        outcomes = {o.request_id: o for o in await rig.outcomes(2)}
    seen = await stats(sim)

    again, now = outcomes["patient"], outcomes["due"]
    assert isinstance(again, LLMResponse) and isinstance(now, LLMResponse)
    assert again.service_tier == "batch" and again.attempts == 2
    assert len(seen["batches_by_request_id"]["patient"]) == 2
    assert now.service_tier == "standard"
    assert seen["calls_by_request_id"] == {"due": 1}  # one synchronous call, after the batch
    assert len(seen["batches_by_request_id"]["due"]) == 1
    assert rig.sample("llmstream_batch_lines_total", provider="openai", outcome="standard") == 1


async def test_a_batch_expired_by_the_provider_has_its_requests_answered_in_the_next(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    await _configure(sim, batch_delay_ms=60_000)  # the first batch would take a minute
    requests = [batch_request(f"late-{i}", ANTHROPIC, f"late {i}") for i in range(3)]
    async with batch_rig(sim, settings) as rig:
        await asyncio.gather(*(rig.process(r) for r in requests))
        [first] = {b for [b] in (await stats(sim))["batches_by_request_id"].values()}
        await _configure(sim, batch_delay_ms=100)
        async with httpx.AsyncClient() as client:
            expired = await client.post(f"{sim.url}/_sim/batches/{first}/expire")
            assert expired.json()["status"] == "expired"
        outcomes = await rig.outcomes(3)
    seen = await stats(sim)
    assert all(isinstance(o, LLMResponse) and o.attempts == 2 for o in outcomes)
    assert all(seen["batches_by_request_id"][r.request_id][0] == first for r in requests)
    assert all(len(seen["batches_by_request_id"][r.request_id]) == 2 for r in requests)


async def _configure(sim: SimulatorServer, **config: Any) -> None:
    async with httpx.AsyncClient() as client:
        (await client.post(f"{sim.url}/_sim/config", json=config)).raise_for_status()


# -- a submitter or poller that dies ---------------------------------------------------------------


@asynccontextmanager
async def dead_worker(settings: WorkerSettings) -> AsyncIterator[DedupStore]:
    """Another worker's dedup store: alive until the block ends, then its heartbeat is gone."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    dedup = DedupStore(
        redis,
        key_prefix=settings.redis_key_prefix,
        worker_token=f"doomed-{uuid.uuid4().hex[:6]}",
        lease_ms=settings.lease_ms,
        result_ttl_s=settings.result_ttl_s,
    )
    await dedup.heartbeat()
    try:
        yield dedup
    finally:
        await dedup.resign()
        await redis.aclose()


async def submit_until(
    dedup: DedupStore, rig: BatchRig, original: LLMRequest, last_step: int
) -> tuple[str, str | None]:
    """The submission steps (core/record/batches.py) of one request, as worker ``dedup`` would
    take them, up to ``last_step``; the submission ID and the provider's batch ID (once sent)."""
    submission, rid, token = uuid.uuid4().hex, original.request_id, dedup.worker_token
    store = SubmissionStore(dedup.records.redis, key_prefix=rig.settings.redis_key_prefix)
    provider, _, model = original.model.partition("/")
    api = rig.tier.apis[provider]
    assert (await dedup.claim(rid, wall_clock_ms())).status.value == "claimed"
    payload = encode(original, WireFormat.JSON)
    op = WorkerOp("b", rid, (submission, payload, "topic:0:7", dedup.epoch(rid)))
    assert (await dedup.records.run(token, [op]))[0][0] == "1"
    if last_step >= 2:
        pairs = [(rid, rid)]
        intent = await store.intent(
            submission, token, provider=provider, model=model, requests=pairs, now_ms=1
        )
        assert intent.answer == "intent"
    batch = None
    if last_step >= 3:
        batch = await api.create([api.line(original, model, rid)], model, submission)
    if last_step >= 4:
        assert batch is not None
        assert (await store.created(submission, token, "1", batch, 2)).answer == "created"
    return submission, batch


async def test_a_taker_finds_the_batch_a_dead_submitter_created_and_sends_nothing_again(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("accepted", OPENAI, "sent once")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            # Died after the provider accepted the batch, before its records said batched.
            _, batch = await submit_until(doomed, rig, original, last_step=4)
        assert await rig.state("accepted") == State.SUBMITTING
        await rig.process(original)  # its event again: resolved, no new batch
        assert await rig.state("accepted") in (State.BATCHED, State.COMPLETED)
        [response] = await rig.outcomes(1)  # polled by the taker, the submitter being dead
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    seen = await stats(sim)
    assert seen["batches_by_request_id"] == {"accepted": [batch]}
    assert seen["calls_by_request_id"] == {}


@pytest.mark.parametrize("last_step", [1, 2])
async def test_a_submission_that_was_never_sent_is_abandoned_and_its_request_batched_again(
    services: Services, sim: SimulatorServer, last_step: int
) -> None:
    settings = batch_settings(services)
    original = batch_request(f"unsent-{last_step}", OPENAI, "not sent yet")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            submission, _ = await submit_until(doomed, rig, original, last_step=last_step)
            token = doomed.worker_token
        await rig.process(original)
        [response] = await rig.outcomes(1)
        # The submitter, had it only stalled, could neither record nor finish it now.
        store = SubmissionStore(rig.redis, key_prefix=settings.redis_key_prefix)
        pairs = [(original.request_id, original.request_id)]
        late = await store.intent(
            submission, token, provider="openai", model="gpt-4o-mini", requests=pairs, now_ms=3
        )
        assert late.answer == "abandoned"
        assert (await store.created(submission, token, "1", "batch_late", 4)).answer != "created"
    assert isinstance(response, LLMResponse) and response.attempts == 2
    seen = await stats(sim)
    assert len(seen["batches_by_request_id"][original.request_id]) == 1
    assert seen["calls_by_request_id"] == {}


async def test_another_worker_polls_the_batches_of_a_worker_that_died_after_submitting(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    await _configure(sim, batch_delay_ms=1500)
    requests = [batch_request(f"orphan-{i}", ANTHROPIC, f"orphan {i}") for i in range(5)]
    async with batch_rig(sim, settings) as first:
        await asyncio.gather(*(first.process(r) for r in requests))
        assert first.responses() == []
        first.dies = True
    async with batch_rig(sim, settings) as second:
        outcomes = await second.outcomes(len(requests))
        await asyncio.sleep(0.3)
        assert len(second.responses()) == len(requests)
    assert {o.request_id for o in outcomes} == {r.request_id for r in requests}
    assert all(isinstance(o, LLMResponse) and o.service_tier == "batch" for o in outcomes)
    seen = await stats(sim)
    assert all(len(seen["batches_by_request_id"][r.request_id]) == 1 for r in requests)


async def test_an_outcome_stored_by_a_poller_that_died_before_emitting_it_is_emitted_by_the_next(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("stored", OPENAI, "kept")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            submission, batch = await submit_until(doomed, rig, original, last_step=4)
            mark = WorkerOp("B", "stored", (submission, batch or "", "", ""))
            assert (await doomed.records.run(doomed.worker_token, [mark]))[0][0] == "1"
            # Its poller stored the line's answer, then died before emitting it.
            kept = response_to(original, "as stored", service_tier="batch")
            payload = encode(kept, WireFormat.JSON)
            line = WorkerOp("r", "stored", ("c", payload, 5, submission))
            assert (await doomed.records.run(doomed.worker_token, [line]))[0][0] != "0"
        [response] = await rig.outcomes(1)
        assert rig.sample("llmstream_dedup_total", outcome="recovered") == 1
    assert isinstance(response, LLMResponse) and response.content == "as stored"


@pytest.mark.parametrize("own", [True, False])
async def test_requests_of_a_submission_never_sent_are_sent_on_without_their_events(
    services: Services, sim: SimulatorServer, own: bool
) -> None:
    # Their events are not read again (a failover lost writes after they were committed): the
    # poller finds the submission in intent, its submitter dead or (own) not sending it, and
    # sends its requests on itself.
    settings = batch_settings(services)
    original = batch_request(f"stranded-{own}", ANTHROPIC, "stranded")
    async with batch_rig(sim, settings) as rig:
        if own:
            await submit_until(rig.dedup, rig, original, last_step=2)
        else:
            async with dead_worker(settings) as doomed:
                await submit_until(doomed, rig, original, last_step=2)
        [response] = await rig.outcomes(1)
        for _ in range(200):  # its new batch is forgotten once settled
            if not (unfinished := await rig.tier.store.unfinished()):
                break
            await asyncio.sleep(0.05)
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    seen = await stats(sim)
    assert len(seen["batches_by_request_id"][original.request_id]) == 1
    assert unfinished == []
