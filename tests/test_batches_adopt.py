"""A dead submitter's OpenAI batch, found at the provider simulator itself: the simulator lists
OpenAI batches (``GET /v1/batches``) as OpenAI does, newest first with their metadata, so the
worker that takes the request over looks the submission up there and adopts its batch instead
of sending the request again (core/record/batches.py, ``intent`` with its owner dead)."""

from __future__ import annotations

import asyncio

import openai

from llmstream.core.record import SubmissionStore
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.batches.api import METADATA_KEY
from llmstream.schemas.models import LLMResponse
from tests.conftest import Services
from tests.test_batches import (
    OPENAI,
    batch_request,
    batch_rig,
    batch_settings,
    dead_worker,
    sim,
    stats,
    submit_until,
)

__all__ = ["sim"]  # the simulator fixture, shared with tests/test_batches.py


async def test_a_dead_submitters_batch_listed_by_the_simulator_is_adopted_and_answered_once(
    services: Services, sim: SimulatorServer
) -> None:
    settings = batch_settings(services)
    original = batch_request("adopted-at-sim", OPENAI, "found")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            # Died once the simulator accepted the batch, before recording it (step 4).
            _, batch = await submit_until(doomed, rig, original, last_step=3)
        await rig.process(original)  # its event again
        [response] = await rig.outcomes(1)
        adopted = rig.sample(
            "llmstream_batch_submissions_total", provider="openai", result="adopted"
        )
        abandoned = rig.sample(
            "llmstream_batch_submissions_total", provider="openai", result="abandoned"
        )
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    assert response.request_id == original.request_id
    assert (adopted, abandoned) == (1, 0)
    seen = await stats(sim)
    assert seen["batches_by_request_id"] == {"adopted-at-sim": [batch]}
    assert seen["calls_by_request_id"] == {}


async def test_a_dead_submitters_batch_is_found_pages_back_behind_newer_batches(
    services: Services, sim: SimulatorServer
) -> None:
    # 120 batches created after it, other submissions in their metadata: the batch is on the
    # second page of 100, reached by the list's ``after`` cursor.
    settings = batch_settings(services)
    original = batch_request("paged-back", OPENAI, "found later")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            _, batch = await submit_until(doomed, rig, original, last_step=3)
            newer = await _newer_batches(sim, 120)
        await rig.process(original)
        [response] = await rig.outcomes(1)
        adopted = rig.sample(
            "llmstream_batch_submissions_total", provider="openai", result="adopted"
        )
    assert isinstance(response, LLMResponse) and response.service_tier == "batch"
    assert adopted == 1
    seen = await stats(sim)
    assert seen["batches_by_request_id"]["paged-back"] == [batch]
    assert len(seen["batches_by_request_id"]["filler"]) == len(newer) == 120
    assert seen["calls_by_request_id"] == {}


async def test_a_submission_settled_by_two_at_once_is_adopted_and_counted_once(
    services: Services, sim: SimulatorServer
) -> None:
    # The request's taker and the poller both find the dead submitter's intent and adopt it at
    # the same moment: one of them writes the submission, the other finds it written.
    settings = batch_settings(services)
    original = batch_request("settled-twice", OPENAI, "once")
    async with batch_rig(sim, settings) as rig:
        async with dead_worker(settings) as doomed:
            submission, batch = await submit_until(doomed, rig, original, last_step=3)
        store = SubmissionStore(rig.redis, key_prefix=settings.redis_key_prefix)
        found = await store.get(submission)
        assert found is not None
        settled = await asyncio.gather(*(rig.tier.settle_intent(found) for _ in range(4)))
        adopted = rig.sample(
            "llmstream_batch_submissions_total", provider="openai", result="adopted"
        )
        after = await store.get(submission, requests=False)
    assert settled == [True] * 4
    assert adopted == 1
    assert after is not None and after.state == "created" and after.batch == batch


async def _newer_batches(sim: SimulatorServer, count: int) -> list[str]:
    """``count`` OpenAI batches of one filler request, each for a submission of its own."""
    line = (
        b'{"custom_id": "filler", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}\n'
    )
    async with openai.AsyncOpenAI(
        base_url=f"{sim.url}/v1", api_key="sk-test-not-a-real-key", max_retries=0
    ) as client:
        file = await client.files.create(file=("filler.jsonl", line), purpose="batch")
        created = [
            await client.batches.create(
                input_file_id=file.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={METADATA_KEY: f"other-{i}"},
            )
            for i in range(count)
        ]
    return [batch.id for batch in created]
