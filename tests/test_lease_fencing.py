"""Nothing paid twice while both workers live: a stalled worker starts no attempt after its
requests were taken over, and a SIGTERM never cuts a call short for the next owner to repeat."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from tests import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 4  # one per partition, more or less: both workers' partitions are exercised


async def _metric(worker: harness.WorkerProcess, line: str, polls: int = 600) -> str:
    """/metrics once it shows ``line`` (or after ``polls`` tries, for the assertion to tell)."""
    async with httpx.AsyncClient() as client:
        for _ in range(polls):
            text = (await client.get(worker.url("/metrics"))).text
            if line in text:
                break
            await asyncio.sleep(0.1)
    return text


async def test_a_worker_stalled_past_its_lease_calls_nothing_after_the_takeover(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    requests = [harness.request(f"stall-{i}") for i in range(REQUESTS)]
    for r in requests:
        # The stalled worker's first call fails and tells it to come back in 5 s: it is stopped
        # while it waits. Every later call (the taker's) answers.
        await harness.simulator_call(
            simulator,
            "POST",
            "/_sim/script",
            {"request_id": r.request_id, "responses": [{"status": 503, "retry_after": 5}]},
        )
    env = harness.worker_env(
        settings,
        simulator.url,
        f"g-{unique}",
        LLMSTREAM_LEASE_MS="2000",
        # 503s must not open the circuit: the taker's calls would wait for it.
        LLMSTREAM_CIRCUIT_BREAKER="false",
    )
    stalled = harness.WorkerProcess(env, tmp_path, name="stalled").start()
    taker = harness.WorkerProcess(env, tmp_path, name="taker")
    try:
        await stalled.wait_ready()
        await harness.produce_requests(settings, requests)
        for _ in range(600):
            calls = await harness.provider_calls(simulator)
            if all(calls.get(r.request_id) == 1 for r in requests):
                break
            await asyncio.sleep(0.05)
        assert all(calls.get(r.request_id) == 1 for r in requests), calls
        # Stopped longer than its lease and its retry's wait: its heartbeat lapses, its
        # partitions move to the taker (session timeout), which takes the claims over.
        os.kill(stalled.pid, signal.SIGSTOP)
        taker.start()
        responses = await harness.read_answers(settings, REQUESTS, timeout=90)
        assert {r.request_id for r in responses} == {r.request_id for r in requests}
        os.kill(stalled.pid, signal.SIGCONT)
        # Its retries come due at once; each one finds the claim gone (before the fix, it
        # called, and its outcome was then fenced when storing: counted the same way).
        text = await _metric(stalled, f'llmstream_dedup_total{{outcome="fenced"}} {REQUESTS}.0')
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(stalled.pid, signal.SIGCONT)
        taker.stop()
        stalled.stop()
    assert f'llmstream_dedup_total{{outcome="fenced"}} {REQUESTS}.0' in text, stalled.log()[-3000:]
    calls = await harness.provider_calls(simulator)
    # The stalled worker's failed call, then the taker's: none after the takeover.
    assert {r.request_id: calls[r.request_id] for r in requests} == {
        r.request_id: 2 for r in requests
    }


async def test_sigterm_while_calls_outlast_the_grace_makes_no_second_call(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    total = 20
    requests = [harness.request(f"slow-{i}") for i in range(total)]
    env = harness.worker_env(settings, simulator.url, f"g-{unique}", LLMSTREAM_SHUTDOWN_GRACE_S="1")
    first = harness.WorkerProcess(env, tmp_path, name="first").start()
    await first.wait_ready()
    await harness.configure_simulator(simulator, latency_ms=5000, latency_jitter=0)
    await harness.produce_requests(settings, requests)
    stats = await harness.wait_for_calls(simulator, in_flight=total)
    assert stats["in_flight"] == total
    os.kill(first.pid, signal.SIGTERM)  # the calls have about 5 s left; the grace is 1 s
    assert first.managed and first.managed.process
    returncode = await asyncio.to_thread(first.managed.process.wait, 60)
    await harness.configure_simulator(simulator, latency_ms=20)
    second = harness.WorkerProcess(env, tmp_path, name="second").start()
    try:
        await second.wait_ready()
        responses = await harness.read_answers(settings, total, timeout=60)
    finally:
        second.stop()
    assert returncode == 0, first.log()[-2000:]
    assert {r.request_id for r in responses} == {r.request_id for r in requests}
    calls = await harness.provider_calls(simulator)
    assert {r.request_id: calls[r.request_id] for r in requests} == {
        r.request_id: 1 for r in requests
    }
