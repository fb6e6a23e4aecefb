"""Workers through Redis outages, rebalances and restarts: nothing lost, nothing paid twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import EmbeddedServices
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.models import LLMMetric
from tests import harness
from tests.conftest import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def simulator_latency_ms() -> float:
    return 300.0


async def test_redis_outage_pauses_processing_and_loses_nothing(
    services: Services,
    settings: ServiceSettings,
    simulator: SimulatorServer,
    unique: str,
    tmp_path: Path,
) -> None:
    # This test's own Redis, so stopping it does not disturb other tests.
    own_redis = EmbeddedServices(
        kafka_bootstrap_servers=services.kafka_bootstrap_servers, log_dir=tmp_path
    )
    try:
        own_redis.start()
        own = settings.model_copy(update={"redis_url": own_redis.redis_url})
        async with harness.running_worker(own, simulator.url, f"g-{unique}", tmp_path) as worker:
            first = [harness.request(f"before-{i}") for i in range(50)]
            await harness.configure_simulator(simulator, latency_ms=2500, latency_jitter=0)
            await harness.produce_requests(own, first)
            await harness.wait_for_calls(simulator, in_flight=50)  # Redis goes away while these run
            redis_process = own_redis._processes[0]
            redis_process.stop()
            await harness.configure_simulator(simulator, latency_ms=100)

            async with httpx.AsyncClient() as client:
                for _ in range(100):
                    ready = await client.get(worker.url("/ready"))
                    if ready.status_code == 503:
                        break
                    await asyncio.sleep(0.1)
            assert ready.status_code == 503
            assert "redis" in ready.json()["checks"] and ready.json()["checks"]["redis"] != "ok"

            during = [harness.request(f"during-{i}") for i in range(50)]
            await harness.produce_requests(own, during)
            await asyncio.sleep(2)
            # Fail closed: nothing new reaches the provider without a claim.
            calls_during_outage = await harness.provider_calls(simulator)
            assert not any(rid.startswith("during-") for rid in calls_during_outage)

            redis_process.start()  # the same port, and (no persistence) empty
            # Redis lost its state: the worker waits for the operator's decision.
            recovered = subprocess.run(
                [sys.executable, "-m", "llmstream.cli", "recover-redis", "--accept-loss"],
                env=harness.worker_env(own, simulator.url, None),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert recovered.returncode == 0, recovered.stdout + recovered.stderr
            responses = await harness.read_answers(own, 100, timeout=60)
    finally:
        own_redis.stop()
    assert {r.request_id for r in responses} == {r.request_id for r in first + during}
    calls = await harness.provider_calls(simulator)
    # The calls that ran through the outage were stored and emitted once Redis came back
    # (empty): none was made again.
    assert {r.request_id: calls[r.request_id] for r in first + during} == {
        r.request_id: 1 for r in first + during
    }


async def test_a_rebalance_under_load_pays_each_request_once(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    # 100 in flight at 1 s a call: the backlog lasts several seconds, so the second worker
    # joins (and partitions move) while the first has calls in flight.
    total = 600
    requests = [harness.request(f"rb-{i}") for i in range(total)]
    env = harness.worker_env(settings, simulator.url, f"g-{unique}", LLMSTREAM_MAX_IN_FLIGHT="100")
    first = harness.WorkerProcess(env, tmp_path, name="first").start()
    second = harness.WorkerProcess(env, tmp_path, name="second")
    try:
        await first.wait_ready()
        await harness.configure_simulator(simulator, latency_ms=1000, latency_jitter=0.2)
        await harness.produce_requests(settings, requests)
        second.start()
        responses = await harness.read_answers(settings, total, timeout=120)
        metrics = await harness.read_topic(
            settings.kafka_bootstrap_servers,
            settings.metrics_topic,
            LLMMetric,
            until=lambda got: sum(m.status == "success" for m in got) >= total,
            timeout=30,
        )
    finally:
        second.stop()
        first.stop()
    assert Counter(r.request_id for r in responses) == Counter(r.request_id for r in requests)
    successes = [m for m in metrics if m.status == "success"]
    assert Counter(m.request_id for m in successes) == Counter(r.request_id for r in requests)
    # Both workers answered part of the backlog: the partitions really moved under load.
    assert len({m.worker_id for m in successes}) == 2
    calls = await harness.provider_calls(simulator)
    assert {rid: n for rid, n in calls.items() if n != 1} == {}
    assert len(calls) == total


async def test_sigterm_drains_in_flight_requests_before_exiting(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    total = 300
    requests = [harness.request(f"term-{i}") for i in range(total)]
    env = harness.worker_env(settings, simulator.url, f"g-{unique}")
    first = harness.WorkerProcess(env, tmp_path, name="first").start()
    await first.wait_ready()
    await harness.configure_simulator(simulator, latency_ms=1500, latency_jitter=0.2)
    await harness.produce_requests(settings, requests)
    await harness.wait_for_calls(simulator, in_flight=100)
    os.kill(first.pid, signal.SIGTERM)
    started = time.monotonic()
    assert first.managed and first.managed.process
    returncode = await asyncio.to_thread(first.managed.process.wait, 60)
    stopped_after = time.monotonic() - started
    await harness.configure_simulator(simulator, latency_ms=50)
    second = harness.WorkerProcess(env, tmp_path, name="second").start()
    try:
        responses = await harness.read_answers(settings, total, timeout=90)
    finally:
        second.stop()
    assert returncode == 0, first.log()[-2000:]
    assert stopped_after < 30
    assert {r.request_id for r in responses} == {r.request_id for r in requests}
    calls = await harness.provider_calls(simulator)
    assert {rid: n for rid, n in calls.items() if n != 1} == {}


async def test_prometheus_metrics_count_what_happened(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    async with harness.running_worker(settings, simulator.url, f"g-{unique}", tmp_path) as worker:
        events = harness.request_events([harness.request(f"m-{i}") for i in range(20)])
        await harness.produce(
            settings.kafka_bootstrap_servers,
            settings.requests_topic,
            events + events[:5] + [(b"junk", b"junk")],
        )
        await harness.read_outputs(settings, LLMMetric, 26)
        async with httpx.AsyncClient() as client:
            for _ in range(20):  # counters move right after the outputs are acknowledged
                text = (await client.get(worker.url("/metrics"))).text
                if 'llmstream_dedup_total{outcome="duplicate"} 5.0' in text:
                    break
                await asyncio.sleep(0.1)
    assert (
        'llmstream_requests_total{model="gpt-4o-mini",provider="openai",status="success"} 20.0'
        in text
    )
    assert 'llmstream_dedup_total{outcome="claimed"} 20.0' in text
    assert 'llmstream_dedup_total{outcome="duplicate"} 5.0' in text
    assert 'llmstream_errors_total{error_type="undecodable"} 1.0' in text
    assert 'llmstream_tokens_total{kind="prompt",model="gpt-4o-mini",provider="openai"}' in text
    assert "llmstream_provider_latency_seconds_bucket" in text
    assert "llmstream_in_flight_requests 0.0" in text
    assert "sk-test" not in text  # no key in any label
