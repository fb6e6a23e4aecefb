"""Drives real worker processes against the real broker, Redis and the provider simulator."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel
from starlette.types import ASGIApp

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.processes import WorkerProcess, free_port
from llmstream.devtools.processes import worker_env as devtools_worker_env
from llmstream.devtools.simulator import SimulatorServer
from llmstream.ingress.app import connect, create_app
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import LLMError, LLMMetric, LLMRequest, LLMResponse
from tests.samples import request

__all__ = [
    "WorkerProcess",
    "configure_simulator",
    "in_process_ingress",
    "produce",
    "produce_requests",
    "provider_calls",
    "read_answers",
    "read_outputs",
    "read_raw",
    "read_topic",
    "request",
    "request_events",
    "running_worker",
    "serve_app",
    "simulator_call",
    "wait_for_calls",
    "worker_env",
]

M = TypeVar("M", bound=BaseModel)


def worker_env(
    settings: ServiceSettings, simulator_url: str, group: str, **extra: str
) -> dict[str, str]:
    """The environment of a worker process on this test's topics, prefix and simulator.

    Retries back off from 50 ms to at most 0.5 s, so tests that script provider failures finish
    quickly; ``extra`` wins.
    """
    fast_retries = {"LLMSTREAM_RETRY_BASE_DELAY_S": "0.05", "LLMSTREAM_RETRY_MAX_DELAY_S": "0.5"}
    return devtools_worker_env(settings, simulator_url, group, extra={**fast_retries, **extra})


@contextlib.asynccontextmanager
async def running_worker(
    settings: ServiceSettings, simulator_url: str, group: str, log_dir: Path, **extra: str
) -> AsyncIterator[WorkerProcess]:
    """A worker process (environment as ``worker_env``), ready; stopped when the block ends."""
    worker = WorkerProcess(worker_env(settings, simulator_url, group, **extra), log_dir).start()
    try:
        await worker.wait_ready()
        yield worker
    finally:
        worker.stop()


async def produce(bootstrap: str, topic: str, events: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    count = 0
    try:
        futures = []
        for key, value in events:
            futures.append(await producer.send(topic, value, key=key))
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


def request_events(requests: Sequence[LLMRequest]) -> list[tuple[bytes | None, bytes]]:
    return [(r.request_id.encode(), encode(r)) for r in requests]


async def produce_requests(settings: ServiceSettings, requests: Sequence[LLMRequest]) -> int:
    """Publish ``requests`` to this test's requests topic, each keyed by its ID."""
    return await produce(
        settings.kafka_bootstrap_servers, settings.requests_topic, request_events(requests)
    )


async def read_topic(
    bootstrap: str,
    topic: str,
    model: type[M],
    until: Callable[[list[M]], bool],
    timeout: float = 60,
) -> list[M]:
    """Every event on ``topic`` from the beginning, until ``until(events)`` or the timeout."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    events: list[M] = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while not until(events) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                events.extend(decode(r.value, model) for r in records)
    finally:
        await consumer.stop()
    return events


def _output_topic(settings: ServiceSettings, model: type[BaseModel]) -> str:
    topics = {
        LLMResponse: settings.responses_topic,
        LLMMetric: settings.metrics_topic,
        LLMError: settings.errors_topic,
    }
    return topics[model]


async def read_outputs(
    settings: ServiceSettings, model: type[M], count: int, timeout: float = 60
) -> list[M]:
    """The ``model`` events (responses, metrics or errors) on this test's output topic, from the
    beginning, until there are ``count`` or the timeout."""
    return await read_topic(
        settings.kafka_bootstrap_servers,
        _output_topic(settings, model),
        model,
        until=lambda got: len(got) >= count,
        timeout=timeout,
    )


async def read_answers(
    settings: ServiceSettings, count: int, timeout: float = 60
) -> list[LLMResponse]:
    """The responses on this test's topic until ``count`` distinct request IDs are answered."""
    return await read_topic(
        settings.kafka_bootstrap_servers,
        settings.responses_topic,
        LLMResponse,
        until=lambda got: len({r.request_id for r in got}) >= count,
        timeout=timeout,
    )


async def read_records(
    bootstrap: str, topic: str, expected: int, timeout: float = 30
) -> list[ConsumerRecord[bytes, bytes]]:
    """The records on ``topic`` (each partition in offset order), reading until ``expected``
    arrived or the timeout."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: list[ConsumerRecord[bytes, bytes]] = []
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(records)
    finally:
        await consumer.stop()
    return found


async def read_raw(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[bytes]:
    """The raw values on ``topic``, reading until ``expected`` arrived or the timeout."""
    return [record.value for record in await read_records(bootstrap, topic, expected, timeout)]


async def simulator_call(
    server: SimulatorServer, method: str, path: str, json: object = None
) -> Any:
    """One call to the simulator's control API (``GET /_sim/stats`` ...), over HTTP."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.request(method, path, json=json)
        response.raise_for_status()
        return response.json()


async def provider_calls(server: SimulatorServer) -> dict[str, int]:
    """How many calls the simulator received for each request ID."""
    stats = await simulator_call(server, "GET", "/_sim/stats")
    calls: dict[str, int] = stats["calls_by_request_id"]
    return calls


async def configure_simulator(server: SimulatorServer, **config: float) -> None:
    """Change the simulator's latency (``latency_ms``, ``latency_jitter`` ...) from now on."""
    await simulator_call(server, "POST", "/_sim/config", config)


async def wait_for_calls(
    server: SimulatorServer, in_flight: int, completed: int = 0, polls: int = 200
) -> dict[str, Any]:
    """Poll the simulator every 50 ms until ``in_flight`` calls run and ``completed`` have been
    answered, for ``polls`` rounds at most; its last stats, for the test to check."""
    for _ in range(polls):
        stats: dict[str, Any] = await simulator_call(server, "GET", "/_sim/stats")
        if stats["in_flight"] >= in_flight and stats["completed_total"] >= completed:
            break
        await asyncio.sleep(0.05)
    return stats


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve an ASGI app (lifespan included) with uvicorn on a free loopback port; yields its URL.

    The server runs in a thread with its own event loop, so synchronous clients in the test
    (the openai SDK's sync client, schemathesis) cannot stall it.
    """
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the app did not start; see the log above")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)


@contextlib.asynccontextmanager
async def in_process_ingress(settings: IngressSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The whole ingress app in-process (middleware, error handlers, parts), connected to the
    real broker and Redis; yields a client that calls it over ASGI."""
    app = create_app(settings)
    async with (
        # The app's own metrics: what the middleware counts and /metrics shows.
        connect(settings, app.state.metrics, app.state),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ingress") as client,
    ):
        yield client
