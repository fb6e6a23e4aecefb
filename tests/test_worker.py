"""The worker end to end: real broker, Redis and worker processes; the simulator over HTTP."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.codec import encode
from llmstream.schemas.models import LLMError, LLMMetric, LLMResponse
from tests import harness

pytestmark = pytest.mark.integration


async def test_requests_duplicates_and_malformed_events(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    rng = random.Random(3)
    unique_requests = [
        harness.request(
            f"r-{i}",
            model=rng.choice(["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku"]),
            text=f"question {i}",
        )
        for i in range(880)
    ]
    events = harness.request_events(unique_requests)
    # 10% duplicate IDs (100 events re-using IDs) and 2% malformed events (20).
    events += [events[rng.randrange(len(unique_requests))] for _ in range(100)]
    malformed = [
        (None, b"\x00\x01not json at all"),
        (b"bad-json", b'{"request_id": "x", "model": '),
        (b"bad-field", encode(harness.request("bad-field"))[:-1] + b', "temperature": 9}'),
    ] * 6 + [(b"empty", b""), (b"array", b"[1, 2]")]
    events += malformed
    rng.shuffle(events)
    assert len(events) == 1000

    async with harness.running_worker(settings, simulator.url, f"g-{unique}", tmp_path):
        await harness.produce(settings.kafka_bootstrap_servers, settings.requests_topic, events)
        metrics = await harness.read_outputs(settings, LLMMetric, 1000, timeout=120)

    responses = await harness.read_outputs(settings, LLMResponse, 880, timeout=10)
    errors = await harness.read_outputs(settings, LLMError, 20, timeout=10)
    # Every unique valid ID got exactly one response, with the simulator's answer to its question.
    by_id = Counter(r.request_id for r in responses)
    assert set(by_id) == {r.request_id for r in unique_requests}
    assert set(by_id.values()) == {1}
    assert all(r.content.endswith(f"question {r.request_id[2:]}") for r in responses)
    # The simulator received exactly one call per unique ID.
    calls = await harness.provider_calls(simulator)
    assert {k: v for k, v in calls.items() if v != 1} == {}
    assert set(calls) == {r.request_id for r in unique_requests}
    # Every malformed event is on llm-errors, with its raw bytes and where it came from.
    assert sorted(e.raw_payload or b"" for e in errors) == sorted(v for _, v in malformed)
    assert {e.error_type for e in errors} == {"undecodable", "invalid_request"}
    assert all(
        e.source_topic == settings.requests_topic and e.source_offset is not None for e in errors
    )
    bad_field = next(e for e in errors if e.request_id == "bad-field")
    assert "temperature" in bad_field.message
    # llm-metrics accounts for every input event.
    statuses = Counter(m.status for m in metrics)
    assert len(metrics) == 1000
    assert statuses == {"success": 880, "duplicate": 100, "error": 20}


async def test_transient_failures_are_retried_and_client_errors_are_not(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    scripts = {
        "flaky-500": [{"status": 500}, {"status": 503}],
        "limited-429": [{"status": 429, "retry_after": 1.0}],
        "bad-400": [{"status": 400}],
        "anthropic-529": [{"status": 529}],
    }
    for request_id, responses in scripts.items():
        script = {"request_id": request_id, "responses": responses}
        await harness.simulator_call(simulator, "POST", "/_sim/script", script)
    requests = [
        harness.request("flaky-500"),
        harness.request("limited-429"),
        harness.request("bad-400"),
        harness.request("anthropic-529", model="anthropic/claude-3-5-haiku"),
    ]
    async with harness.running_worker(settings, simulator.url, f"g-{unique}", tmp_path):
        await harness.produce_requests(settings, requests)
        metrics = await harness.read_outputs(settings, LLMMetric, 4)
    responses = {
        r.request_id: r for r in await harness.read_outputs(settings, LLMResponse, 3, timeout=10)
    }
    errors = await harness.read_outputs(settings, LLMError, 1, timeout=10)
    assert len(metrics) == 4
    assert responses["flaky-500"].attempts == 3
    assert responses["anthropic-529"].attempts == 2
    # Retry-After: 1 s was honoured: the second attempt came at least a second after the first.
    assert responses["limited-429"].attempts == 2
    assert responses["limited-429"].latency_ms >= 1000
    # (Full-jitter bounds are checked exactly in test_retry.py with an injected sleep; an upper
    # bound on wall time here would be a timing assertion on a shared CI machine.)
    [error] = errors
    assert (error.request_id, error.error_type, error.status_code, error.attempts) == (
        "bad-400",
        "invalid_request",
        400,
        1,
    )
    assert error.request is not None and error.request.request_id == "bad-400"  # replayable
    calls = await harness.provider_calls(simulator)
    assert calls == {"flaky-500": 3, "limited-429": 2, "bad-400": 1, "anthropic-529": 2}


@pytest.mark.slow
async def test_sigkill_with_hundreds_in_flight_loses_nothing_and_pays_nothing_twice(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    # Calls take 2.25-3.75 s, so a few hundred are in flight when the first worker is killed,
    # even when a loaded machine admits events slowly.
    await harness.configure_simulator(simulator, latency_ms=3000, latency_jitter=0.25)
    total = 600
    requests = [harness.request(f"k-{i}", text=f"q{i}") for i in range(total)]
    env = harness.worker_env(settings, simulator.url, f"g-{unique}")
    first = harness.WorkerProcess(env, tmp_path, name="first").start()
    await first.wait_ready()
    await harness.produce_requests(settings, requests)
    # Wait until the first worker has 200+ calls in flight, some of them already answered.
    # Polled for up to 60 s: on a busy machine the worker needs longer to get there.
    await harness.wait_for_calls(simulator, in_flight=200, completed=50, polls=1200)
    # Calls answered by now have had 300 ms to be stored; an answer still in the dying worker's
    # memory (not yet in Redis) cannot survive SIGKILL, whatever the design.
    answered_before_kill = {
        c["request_id"]
        for c in (await harness.simulator_call(simulator, "GET", "/_sim/calls"))["calls"]
        if c["finished"]
    }
    await asyncio.sleep(0.3)
    first.kill()
    killed_at = await harness.simulator_call(simulator, "GET", "/_sim/stats")
    assert killed_at["in_flight"] >= 200, killed_at

    second = harness.WorkerProcess(env, tmp_path, name="second").start()
    try:
        responses = await harness.read_answers(settings, total, timeout=120)
    finally:
        second.stop()
    # No request lost.
    assert {r.request_id for r in responses} == {r.request_id for r in requests}
    # The provider saw no second call for any request whose first call completed before the kill.
    calls = await harness.provider_calls(simulator)
    paid_twice = {rid for rid in answered_before_kill if calls[rid] > 1}
    assert paid_twice == set()
    assert len(answered_before_kill) >= 50


async def test_expired_requests_are_not_called_and_duplicates_can_be_reemitted(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    expired = harness.request("too-late", deadline_ms=1_000)  # 1970: worthless by now
    fresh = harness.request("in-time")
    group = f"g-{unique}"
    async with harness.running_worker(
        settings, simulator.url, group, tmp_path, LLMSTREAM_REEMIT_DUPLICATES="true"
    ):
        await harness.produce_requests(settings, [expired, fresh])
        await harness.read_outputs(settings, LLMMetric, 2)
        await harness.produce_requests(settings, [fresh])  # the same ID again, after it completed
        metrics = await harness.read_outputs(settings, LLMMetric, 3)
    responses = await harness.read_outputs(settings, LLMResponse, 2, timeout=10)
    errors = await harness.read_outputs(settings, LLMError, 1, timeout=10)
    assert sorted((m.request_id, m.status) for m in metrics) == [
        ("in-time", "duplicate"),
        ("in-time", "success"),
        ("too-late", "expired"),
    ]
    [error] = errors
    assert (error.request_id, error.error_type, error.attempts) == ("too-late", "expired", 0)
    # The stored response was re-emitted for the duplicate: the same answer twice.
    assert [r.request_id for r in responses] == ["in-time", "in-time"]
    assert responses[0].content == responses[1].content
    assert await harness.provider_calls(simulator) == {"in-time": 1}


async def test_an_output_too_large_for_the_broker_is_reported_not_stalled(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    # The response echoes the request's metadata (3 KB), over a 2 KB producer limit.
    big = harness.request("too-big", metadata={f"k{i}": "v" * 300 for i in range(10)})
    small = harness.request("fits")
    group = f"g-{unique}"
    async with harness.running_worker(
        settings, simulator.url, group, tmp_path, LLMSTREAM_MAX_EVENT_BYTES="2048"
    ):
        await harness.produce_requests(settings, [big, small])
        metrics = await harness.read_outputs(settings, LLMMetric, 2)
    errors = await harness.read_outputs(settings, LLMError, 1, timeout=10)
    assert sorted((m.request_id, m.status) for m in metrics) == [
        ("fits", "success"),
        ("too-big", "error"),
    ]
    [error] = errors
    assert (error.request_id, error.error_type) == ("too-big", "output_too_large")
    assert "max.message.bytes" in error.message
