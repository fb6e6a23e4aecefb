"""Drives real worker processes against the real broker, Redis and the provider simulator."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel
from starlette.types import ASGIApp

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.processes import WorkerProcess, free_port
from llmstream.devtools.processes import worker_env as devtools_worker_env
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import ChatMessage, LLMRequest

__all__ = [
    "WorkerProcess",
    "produce",
    "read_raw",
    "read_topic",
    "request",
    "request_events",
    "serve_app",
    "simulator_call",
    "worker_env",
]

M = TypeVar("M", bound=BaseModel)


def request(
    request_id: str, model: str = "openai/gpt-4o-mini", text: str = "hello", **kw: object
) -> LLMRequest:
    return LLMRequest(
        request_id=request_id,
        model=model,
        messages=[ChatMessage(role="user", content=text)],
        created_at_ms=wall_clock_ms(),
        **kw,  # type: ignore[arg-type]
    )


def worker_env(
    settings: ServiceSettings, simulator_url: str, group: str, **extra: str
) -> dict[str, str]:
    """The environment of a worker process on this test's topics, prefix and simulator.

    Retries back off from 50 ms to at most 0.5 s, so tests that script provider failures finish
    quickly; ``extra`` wins.
    """
    fast_retries = {"LLMSTREAM_RETRY_BASE_DELAY_S": "0.05", "LLMSTREAM_RETRY_MAX_DELAY_S": "0.5"}
    return devtools_worker_env(settings, simulator_url, group, extra={**fast_retries, **extra})


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


async def read_raw(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[bytes]:
    """The raw values on ``topic``, reading until ``expected`` arrived or the timeout."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(values) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return values


async def simulator_call(
    server: SimulatorServer, method: str, path: str, json: object = None
) -> Any:
    """One call to the simulator's control API (``GET /_sim/stats`` ...), over HTTP."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.request(method, path, json=json)
        response.raise_for_status()
        return response.json()


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
