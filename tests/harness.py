"""Drives real worker processes against the real broker, Redis and the provider simulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel
from starlette.types import ASGIApp

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import ManagedProcess, free_port
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import ChatMessage, LLMRequest

M = TypeVar("M", bound=BaseModel)


def request(
    request_id: str, model: str = "openai/gpt-4o-mini", text: str = "hello", **kw: object
) -> LLMRequest:
    return LLMRequest(
        request_id=request_id,
        model=model,
        messages=[ChatMessage(role="user", content=text)],
        created_at_ms=time.time_ns() // 1_000_000,
        **kw,  # type: ignore[arg-type]
    )


def worker_env(
    settings: ServiceSettings, simulator_url: str, group: str, **extra: str
) -> dict[str, str]:
    """The environment of a worker process on this test's topics, prefix and simulator."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLMSTREAM_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        REDIS_URL=settings.redis_url,
        LLMSTREAM_REDIS_KEY_PREFIX=settings.redis_key_prefix,
        LLMSTREAM_REQUESTS_TOPIC=settings.requests_topic,
        LLMSTREAM_RESPONSES_TOPIC=settings.responses_topic,
        LLMSTREAM_METRICS_TOPIC=settings.metrics_topic,
        LLMSTREAM_ERRORS_TOPIC=settings.errors_topic,
        LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER=str(settings.kafka_idempotent_producer).lower(),
        LLMSTREAM_CONSUMER_GROUP=group,
        LLMSTREAM_SESSION_TIMEOUT_S="6",
        LLMSTREAM_HEARTBEAT_INTERVAL_S="1",
        LLMSTREAM_COMMIT_INTERVAL_S="0.5",
        LLMSTREAM_LEASE_MS="3000",
        LLMSTREAM_RETRY_BASE_DELAY_S="0.05",
        LLMSTREAM_RETRY_MAX_DELAY_S="0.5",
        OPENAI_BASE_URL=f"{simulator_url}/v1",
        OPENAI_API_KEY="sk-test-not-a-real-key",
        ANTHROPIC_BASE_URL=simulator_url,
        ANTHROPIC_API_KEY="sk-ant-test-not-a-real-key",
    )
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """``llmstream worker`` as a child process, ready once its consumer joined the group."""

    env: dict[str, str]
    log_dir: Path
    name: str = "worker"
    port: int = field(default_factory=free_port)
    managed: ManagedProcess | None = None

    def start(self) -> WorkerProcess:
        env = {
            **self.env,
            "LLMSTREAM_HTTP_PORT": str(self.port),
            "LLMSTREAM_HTTP_HOST": "127.0.0.1",
        }
        self.managed = ManagedProcess(
            self.name,
            [sys.executable, "-m", "llmstream.cli", "worker"],
            self.port,
            self.log_dir / f"{self.name}-{self.port}.log",
            env,
        )
        self.managed.start(timeout=60)
        return self

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(self.url("/ready"))).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in {timeout} s; log: {self.log()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        assert self.managed is not None
        return self.managed.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.managed and self.managed.process
        return self.managed.process.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no commit, no goodbye; as a crash or an OOM kill."""
        os.kill(self.pid, signal.SIGKILL)
        assert self.managed and self.managed.process
        self.managed.process.wait(10)

    def stop(self) -> None:
        if self.managed:
            self.managed.stop(timeout=40)


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
