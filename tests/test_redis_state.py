"""Workers when Redis goes away or comes back empty, and on Redis Cluster: real broker, Redis
(a dedicated redis-server per test where it is stopped) and provider simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import EmbeddedServices
from llmstream.devtools.processes import ChildProcess
from llmstream.devtools.simulator import SimulatorServer
from llmstream.processors.redis_state import group_has_commits
from llmstream.processors.settings import WorkerSettings
from tests import harness
from tests.conftest import Services
from tests.redis_cluster import RedisClusterNodes, redis_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class OwnRedis:
    """A redis-server of this test alone, and this test's settings pointed at it."""

    process: ChildProcess
    settings: ServiceSettings


@pytest.fixture
def own_redis(services: Services, settings: ServiceSettings, tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of this test alone (no persistence), so stopping it disturbs no other;
    with this test's settings on it."""
    redis = EmbeddedServices(
        kafka_bootstrap_servers=services.kafka_bootstrap_servers, log_dir=tmp_path / "redis"
    )
    redis.start()
    try:
        (process,) = redis._processes
        yield OwnRedis(process, settings.model_copy(update={"redis_url": redis.redis_url}))
    finally:
        redis.stop()


async def _ready(worker: harness.WorkerProcess) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(worker.url("/ready"))


async def _poll_ready(
    worker: harness.WorkerProcess, status: int, polls: int = 300
) -> httpx.Response:
    """/ready until it answers ``status`` (every 0.1 s, ``polls`` times at most)."""
    for _ in range(polls):
        answer = await _ready(worker)
        if answer.status_code == status:
            break
        await asyncio.sleep(0.1)
    return answer


def _recover(settings: ServiceSettings, *flags: str) -> subprocess.CompletedProcess[str]:
    env = harness.worker_env(settings, "http://127.0.0.1:9", None)
    return subprocess.run(
        [sys.executable, "-m", "llmstream.cli", "recover-redis", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_short_redis_outage_shows_on_ready(
    own_redis: OwnRedis, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    own = own_redis.settings
    # The default lease (10 s): readiness must not wait for it to lapse.
    async with harness.running_worker(
        own, simulator.url, f"g-{unique}", tmp_path, LLMSTREAM_LEASE_MS="10000"
    ) as worker:
        # Redis hangs (SIGSTOP) and comes back with its state (SIGCONT): an outage, not a loss.
        redis_pid = own_redis.process.pid
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            during = await _poll_ready(worker, 503, polls=50)  # 5 s: half the lease
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        after = await _poll_ready(worker, 200)
    assert during.status_code == 503
    assert during.json()["checks"]["redis"].startswith("unreachable: claims are paused")
    assert after.status_code == 200, after.json()


async def test_redis_restarted_empty_under_load_pauses_until_the_operator_recovers(
    own_redis: OwnRedis, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    own = own_redis.settings
    group = f"g-{unique}"
    worker_settings = WorkerSettings(**{**own.model_dump(), "consumer_group": group})
    before = [harness.request(f"before-{i}") for i in range(20)]
    in_flight = [harness.request(f"inflight-{i}") for i in range(30)]
    after = [harness.request(f"after-{i}") for i in range(30)]
    async with harness.running_worker(own, simulator.url, group, tmp_path) as worker:
        await harness.produce_requests(own, before)
        await harness.read_answers(own, len(before))
        for _ in range(100):  # the group commits every 0.5 s
            if await group_has_commits(worker_settings):
                break
            await asyncio.sleep(0.1)
        assert await group_has_commits(worker_settings)

        await harness.configure_simulator(simulator, latency_ms=2500, latency_jitter=0)
        await harness.produce_requests(own, in_flight)
        await harness.wait_for_calls(simulator, in_flight=len(in_flight))
        own_redis.process.stop()
        own_redis.process.start()  # the same port, empty: no persistence
        await harness.configure_simulator(simulator, latency_ms=50)

        paused = await _poll_ready(worker, 503)
        await harness.produce_requests(own, after)
        # The calls in flight when Redis restarted finish and are emitted, stored into the
        # empty Redis; nothing new is called while the worker waits for the operator.
        await harness.read_answers(own, len(before) + len(in_flight))
        await asyncio.sleep(2)
        calls_while_paused = await harness.provider_calls(simulator)
        still_paused = await _ready(worker)

        refused = _recover(own)
        accepted = _recover(own, "--accept-loss")
        answers = await harness.read_answers(own, len(before) + len(in_flight) + len(after))
        resumed = await _poll_ready(worker, 200)
        log = worker.log()

    assert paused.status_code == 503
    assert paused.json()["checks"]["redis"].startswith("lost its state: claims are paused")
    assert still_paused.status_code == 503
    assert not any(rid.startswith("after-") for rid in calls_while_paused)
    assert {n for n in calls_while_paused.values()} == {1}
    assert "lost its state" in log and "llmstream recover-redis --accept-loss" in log

    assert refused.returncode == 1, refused.stderr
    assert "holds no deployment epoch" in refused.stdout
    assert accepted.returncode == 0, accepted.stderr
    assert "deployment epoch" in accepted.stdout and "written" in accepted.stdout

    everything = {r.request_id for r in before + in_flight + after}
    assert {r.request_id for r in answers} == everything
    calls = await harness.provider_calls(simulator)
    assert {rid: calls[rid] for rid in everything} == dict.fromkeys(everything, 1)
    assert resumed.status_code == 200


async def test_a_worker_on_redis_cluster_answers_each_request_once(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    redis_cluster: RedisClusterNodes,  # noqa: F811
    unique: str,
    tmp_path: Path,
) -> None:
    own = settings.model_copy(update={"redis_url": redis_cluster.url})
    requests = [harness.request(f"cluster-{i}") for i in range(60)]
    async with harness.running_worker(
        own, simulator.url, f"g-{unique}", tmp_path, LLMSTREAM_REDIS_CLUSTER="true"
    ):
        await harness.produce_requests(own, requests)
        # The same IDs again: dedup on the cluster answers them from their records.
        await harness.produce_requests(own, requests)
        answers = await harness.read_answers(own, len(requests))
    assert {r.request_id for r in answers} == {r.request_id for r in requests}
    calls = await harness.provider_calls(simulator)
    assert {r.request_id: calls.get(r.request_id) for r in requests} == {
        r.request_id: 1 for r in requests
    }
