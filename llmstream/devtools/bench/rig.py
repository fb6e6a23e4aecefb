"""The services every scenario shares, started once: broker, Redis, the provider simulator.

The worker (and the bare loop) run pinned to the first CPU where the OS allows, everything else
to the others, so "one core" means one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.bench.cpu import Placement, total_cpu_seconds
from llmstream.devtools.bench.measure import CallCount
from llmstream.devtools.bench.options import BenchOptions
from llmstream.devtools.embedded import EmbeddedServices, create_topics
from llmstream.devtools.processes import (
    ChildProcess,
    WorkerProcess,
    free_port,
    pin_process,
    scoped_settings,
    topic_names,
    worker_env,
)
from llmstream.schemas.codec import encode
from llmstream.schemas.models import ChatMessage, LLMRequest

MODEL = "openai/gpt-4o-mini"


def say(message: str) -> None:
    """Progress, on stderr: the table alone goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def request_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


@dataclass
class Rig:
    """The services every scenario shares: broker, Redis, simulator, and where logs go."""

    options: BenchOptions
    placement: Placement
    services: EmbeddedServices
    simulator_url: str
    workdir: Path
    run_id: str
    service_pids: list[int]

    @property
    def bootstrap(self) -> str:
        assert self.services.kafka_bootstrap_servers is not None
        return self.services.kafka_bootstrap_servers

    @property
    def redis_url(self) -> str:
        assert self.services.redis_url is not None
        return self.services.redis_url

    def others_cpu_seconds(self) -> float:
        """CPU spent by the broker, Redis and the simulator so far."""
        return total_cpu_seconds(self.service_pids)

    async def new_topics(self, scenario: str) -> ServiceSettings:
        """Settings naming the scenario's own topics (created) and Redis key prefix."""
        settings = scoped_settings(
            self.bootstrap,
            self.redis_url,
            f"bench-{self.run_id}-{scenario}",
            idempotent_producer=not self.services.embedded_broker,
            key_prefix=f"bench:{self.run_id}:{scenario}:",
        )
        await create_topics(self.bootstrap, topic_names(settings), self.options.partitions)
        return settings

    async def simulator(self, method: str, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.simulator_url}{path}") as response,
        ):
            response.raise_for_status()
            return orjson.loads(await response.read())

    async def count_calls(self, ids: set[str]) -> CallCount:
        return CallCount.of(await self.simulator("GET", "/_sim/stats"), ids)

    async def start_worker(
        self, name: str, settings: ServiceSettings, group: str, cpus: frozenset[int] | None
    ) -> WorkerProcess:
        """A worker, listening (not yet ready), with the worker's own defaults but
        ``in_flight`` requests in flight."""
        extra = {
            "LLMSTREAM_MAX_IN_FLIGHT": str(self.options.in_flight),
        }
        env = worker_env(settings, self.simulator_url, group, quick_handover=False, extra=extra)
        worker = WorkerProcess(env, self.workdir / name, name, cpus=cpus)
        return await asyncio.to_thread(worker.start)


@contextlib.contextmanager
def open_rig(options: BenchOptions) -> Iterator[Rig]:
    """Broker and Redis (embedded, or from ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``) and the
    simulator, placed on the CPUs the worker does not get."""
    placement = Placement.detect()
    if placement.others is not None:
        # The driver itself stays off the measured CPU.
        os.sched_setaffinity(0, placement.others)
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"llmstream-bench-{run_id}-"))
    with EmbeddedServices.from_env() as services:
        for pid in services.pids:
            pin_process(pid, placement.others)
        port = free_port()
        args = [sys.executable, "-m", "llmstream.cli", "simulate", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--latency-ms", str(options.latency_ms)]
        env = {
            **os.environ,
            "LLMSTREAM_SIM_LATENCY_JITTER": str(options.latency_jitter),
            "LLMSTREAM_SIM_SEED": "5",
        }
        log = workdir / "simulator" / "simulator.log"
        simulator = ChildProcess("simulator", args, log, env, placement.others).start()
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(simulator.wait_http(f"{url}/_sim/stats", 30))
            pids = [*services.pids, simulator.pid]
            yield Rig(options, placement, services, url, workdir, run_id, pids)
        finally:
            simulator.stop()


def request_event(request_id: str, text: str) -> tuple[bytes, bytes]:
    """One request as a producer would write it (JSON, the worker's default format)."""
    request = LLMRequest(
        request_id=request_id,
        model=MODEL,
        messages=[
            ChatMessage(role="system", content="You answer in one short sentence."),
            ChatMessage(role="user", content=text),
        ],
        metadata={"source": "bench"},
        created_at_ms=wall_clock_ms(),
    )
    return request_id.encode(), encode(request)


def producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )


async def fill_backlog(bootstrap: str, topic: str, ids: Sequence[str]) -> float:
    """Produce one request per ID and wait for the broker's acks; returns the seconds taken."""
    started = time.perf_counter()
    kafka = producer(bootstrap)
    await kafka.start()
    try:
        pending = []
        for i, request_id in enumerate(ids):
            key, value = request_event(request_id, f"Tell me one fact about the number {i}.")
            pending.append(await kafka.send(topic, value, key=key))
        await asyncio.gather(*pending)
    finally:
        await kafka.stop()
    return time.perf_counter() - started
