"""The batch tier end to end: worker processes on the real broker and Redis, the provider
simulator's batch endpoints over HTTP. A thousand batch requests across two models are answered
only through batches, their offsets committed before any batch completes; the same with the
submitting worker SIGKILLed and another finishing; per-line errors and expiry."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from llmstream.core.catalog import BUILTIN_PRICES
from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.codec import encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse
from tests.harness import (
    WorkerProcess,
    configure_simulator,
    read_outputs,
    read_topic,
    running_worker,
    simulator_call,
    worker_env,
)
from tests.samples import request

pytestmark = pytest.mark.integration

OPENAI = "openai/gpt-4o-mini"
ANTHROPIC = "anthropic/claude-3-5-haiku"
MAX_BATCH = 200
# Batches fill at once (200 of 1,000), go after half a second otherwise, are polled every 0.3 s.
BATCH_ENV = {
    "LLMSTREAM_BATCH_MAX_REQUESTS": str(MAX_BATCH),
    "LLMSTREAM_BATCH_MAX_WAIT_S": "0.5",
    "LLMSTREAM_BATCH_POLL_INTERVAL_S": "0.3",
}


def thousand(unique: str) -> list[LLMRequest]:
    return [
        request(
            f"b{i}-{unique}",
            model=OPENAI if i % 2 else ANTHROPIC,
            text=f"question {i}",
            service_tier="batch",
        )
        for i in range(1000)
    ]


async def produce(settings: ServiceSettings, requests: Sequence[LLMRequest]) -> dict[int, int]:
    """Publish ``requests``; the last offset written to each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(settings.requests_topic, encode(r), key=r.request_id.encode())
            for r in requests
        ]
        written = await asyncio.gather(*sent)
    finally:
        await producer.stop()
    last: dict[int, int] = {}
    for meta in written:
        last[meta.partition] = max(last.get(meta.partition, -1), meta.offset)
    return last


async def committed(settings: ServiceSettings, group: str, partitions: Sequence[int]) -> dict:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        tps = [TopicPartition(settings.requests_topic, p) for p in partitions]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta is not None}


async def committed_while_batches_run(
    settings: ServiceSettings, group: str, simulator: SimulatorServer, last: dict[int, int]
) -> dict[str, Any]:
    """Wait until the group's committed offsets pass every request; the simulator's stats
    right after (what had happened by then at the latest)."""
    for _ in range(600):
        done = await committed(settings, group, list(last))
        if all(done.get(p, -1) > offset for p, offset in last.items()):
            stats: dict[str, Any] = await simulator_call(simulator, "GET", "/_sim/stats")
            return stats
        await asyncio.sleep(0.2)
    pytest.fail(f"offsets not committed: {await committed(settings, group, list(last))}")


def batch_cost(response: LLMResponse) -> float:
    price = BUILTIN_PRICES[response.model]
    return (response.prompt_tokens * price.input + response.completion_tokens * price.output) / 2e6


def standard_cost(response: LLMResponse) -> float:
    return batch_cost(response) * 2


async def every_response(settings: ServiceSettings, count: int) -> list[LLMResponse]:
    """Every response on the topic once ``count`` request IDs are answered, read again after a
    few poll intervals, so that a second answer to any of them would be among them."""
    await read_topic(
        settings.kafka_bootstrap_servers,
        settings.responses_topic,
        LLMResponse,
        until=lambda got: len({r.request_id for r in got}) >= count,
        timeout=240,
    )
    await asyncio.sleep(2)
    return await read_topic(
        settings.kafka_bootstrap_servers,
        settings.responses_topic,
        LLMResponse,
        until=lambda got: len(got) >= count + 1,  # never: everything there is read
        timeout=5,
    )


def check_answered_once_by_batches(
    requests: Sequence[LLMRequest], responses: Sequence[LLMResponse], stats: dict[str, Any]
) -> None:
    assert sorted(r.request_id for r in responses) == sorted(r.request_id for r in requests)
    for response in responses:
        assert response.service_tier == "batch", response
        assert response.cost_usd == pytest.approx(batch_cost(response))
    assert stats["calls_total"] == 0  # not one synchronous call
    batches = stats["batches_by_request_id"]
    assert sorted(batches) == sorted(r.request_id for r in requests)
    assert all(len(ids) == 1 for ids in batches.values()), "a request in two batches"
    sizes = Counter(batch for [batch] in batches.values())
    assert max(sizes.values()) <= MAX_BATCH


async def measured(worker: WorkerProcess) -> str:
    """The batches' mean turnaround and what they saved, as the worker's /metrics says."""
    async with httpx.AsyncClient() as client:
        page = (await client.get(worker.url("/metrics"))).text
    values: Counter[str] = Counter()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name.startswith("llmstream_batch_turnaround_seconds_"):
                values[sample.name.rpartition("_")[2]] += sample.value
            if sample.name == "llmstream_saved_usd_total" and sample.labels["tier"] == "batch":
                values["saved"] += sample.value
    mean = values["sum"] / values["count"] if values["count"] else float("nan")
    return (
        f"{values['count']:.0f} batches, mean turnaround {mean:.1f} s, "
        f"llmstream_saved_usd_total{{tier=batch}} {values['saved']:.6f}"
    )


async def test_a_thousand_batch_requests_are_answered_by_batches_only_after_their_commit(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    # Batches take 15 s at the provider: the offsets are committed long before.
    await configure_simulator(simulator, batch_delay_ms=15_000)
    requests = thousand(unique)
    group = f"g-{unique}"
    started = time.monotonic()
    async with running_worker(settings, simulator.url, group, tmp_path, **BATCH_ENV) as worker:
        last = await produce(settings, requests)
        at_commit = await committed_while_batches_run(settings, group, simulator, last)
        responses = await every_response(settings, len(requests))
        metrics = await measured(worker)
    stats = await simulator_call(simulator, "GET", "/_sim/stats")

    # When every offset was committed, no batch had completed and nothing was answered.
    assert set(at_commit["batches_by_status"]) <= {"validating", "in_progress", "finalizing"}
    assert at_commit["batch_lines_total"] == len(requests)
    check_answered_once_by_batches(requests, responses, stats)
    saved = sum(standard_cost(r) - (r.cost_usd or 0) for r in responses)
    standard = sum(standard_cost(r) for r in responses)
    print(  # the run's measurements, for the record (pytest -s)
        f"\n1000 batch requests in {time.monotonic() - started:.1f} s: {metrics}; "
        f"answers cost {standard - saved:.6f} USD, {standard:.6f} at standard prices"
    )


async def test_a_worker_killed_after_submitting_leaves_its_batches_to_the_next(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    await configure_simulator(simulator, batch_delay_ms=15_000)
    requests = thousand(unique)
    group = f"g-{unique}"
    async with running_worker(settings, simulator.url, group, tmp_path, **BATCH_ENV) as first:
        last = await produce(settings, requests)
        at_commit = await committed_while_batches_run(settings, group, simulator, last)
        assert at_commit["batch_lines_total"] == len(requests)
        first.kill()  # after submitting, before any batch completed: no answer from it
    env = worker_env(settings, simulator.url, group, **BATCH_ENV)
    second = WorkerProcess(env, tmp_path, name="second").start()
    try:
        responses = await every_response(settings, len(requests))
    finally:
        second.stop()
    stats = await simulator_call(simulator, "GET", "/_sim/stats")
    check_answered_once_by_batches(requests, responses, stats)
    assert "took over polling batch" in second.log()


async def test_line_errors_and_expiry_through_the_broker(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    await configure_simulator(simulator, batch_delay_ms=300)
    soon = wall_clock_ms() + 600_000
    requests = [
        request(f"flaky-{unique}", text="[batch-error:500:1] again", service_tier="batch"),
        request(f"refused-{unique}", text="[batch-error:400] no", service_tier="batch"),
        request(f"patient-{unique}", text="[batch-expire:1] later", service_tier="batch"),
        request(
            f"due-{unique}", text="[batch-expire:1] soon", service_tier="batch", deadline_ms=soon
        ),
    ]
    env = {**BATCH_ENV, "LLMSTREAM_BATCH_MIN_DEADLINE_S": "3600"}
    async with running_worker(settings, simulator.url, f"g-{unique}", tmp_path, **env):
        await produce(settings, requests)
        responses = {r.request_id: r for r in await every_response(settings, 3)}
        [error] = await read_outputs(settings, LLMError, 1)
    stats = await simulator_call(simulator, "GET", "/_sim/stats")
    batches = stats["batches_by_request_id"]

    assert sorted(responses) == sorted(f"{n}-{unique}" for n in ("flaky", "patient", "due"))
    assert responses[f"flaky-{unique}"].attempts == 2 and len(batches[f"flaky-{unique}"]) == 2
    assert responses[f"patient-{unique}"].service_tier == "batch"
    assert len(batches[f"patient-{unique}"]) == 2
    # Too near its deadline for another batch: called at once, once, at the standard tier.
    assert responses[f"due-{unique}"].service_tier == "standard"
    assert stats["calls_by_request_id"] == {f"due-{unique}": 1}
    assert (error.request_id, error.error_type, error.retryable) == (
        f"refused-{unique}",
        "invalid_request",
        False,
    )
    assert len(batches[f"refused-{unique}"]) == 1
