"""``make run``: the whole system on one machine, with requests flowing through it.

Starts (or reuses, from ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``) the broker and Redis, the
provider simulator, a worker and the HTTP ingress (on port 8080 when it is free) as child
processes, produces sample requests, prints the outcomes as they arrive, and runs until Ctrl-C.
Every child dies with this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import DEFAULT_TOPICS, EmbeddedServices, create_topics
from llmstream.devtools.processes import ChildProcess, free_port, worker_env
from llmstream.schemas.codec import decode, encode
from llmstream.schemas.models import ChatMessage, LLMError, LLMMetric, LLMRequest, LLMResponse


def _sample_requests(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` requests keyed by request ID, one duplicate of the first, one invalid event."""
    models = ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"]
    events = []
    for i in range(count):
        request = LLMRequest(
            request_id=f"demo-{uuid.uuid4().hex[:8]}",
            model=models[i % len(models)],
            messages=[
                ChatMessage(role="system", content="You answer in one sentence."),
                ChatMessage(role="user", content=f"Say something about the number {i}."),
            ],
            metadata={"demo": "make run"},
            created_at_ms=wall_clock_ms(),
        )
        events.append((request.request_id.encode(), encode(request)))
    events.append(events[0])  # the same request ID again: deduplicated, not paid twice
    events.append((b"demo-broken", b'{"request_id": "demo-broken", "model": 42}'))  # invalid
    return events


async def _show_flow(bootstrap: str, count: int) -> None:
    consumer = AIOKafkaConsumer(
        "llm-responses",
        "llm-errors",
        "llm-metrics",
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        group_id=f"dev-{uuid.uuid4().hex}",
    )
    await consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await asyncio.sleep(1.0)  # let the consumer take its partitions before producing
        events = _sample_requests(count)
        for key, value in events:
            await producer.send_and_wait("llm-requests", value, key=key)
        print(
            f"\nproduced {len(events)} events to llm-requests "
            f"({count} requests, 1 duplicate, 1 invalid)\n",
            flush=True,
        )
        seen_metrics = 0
        deadline = time.monotonic() + 60
        while seen_metrics < len(events) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if tp.topic == "llm-responses":
                        r = decode(record.value, LLMResponse)
                        print(
                            f"  llm-responses  {r.request_id}  {r.model}: {r.content!r} "
                            f"({r.total_tokens} tokens, {r.latency_ms} ms, {r.attempts} attempt)"
                        )
                    elif tp.topic == "llm-errors":
                        e = decode(record.value, LLMError)
                        print(f"  llm-errors     {e.request_id}  {e.error_type}: {e.message}")
                    else:
                        m = decode(record.value, LLMMetric)
                        seen_metrics += 1
                        print(f"  llm-metrics    {m.request_id}  {m.status}")
        print(flush=True)
    finally:
        await producer.stop()
        await consumer.stop()


_INGRESS_PORT = 8080  # the ingress's usual port, so the README's examples work as written


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_dev(requests: int = 5, partitions: int = 4) -> int:
    """Run everything until Ctrl-C; returns the exit code."""
    python = sys.executable
    with EmbeddedServices.from_env() as services:
        assert services.kafka_bootstrap_servers and services.redis_url
        bootstrap, redis_url = services.kafka_bootstrap_servers, services.redis_url
        asyncio.run(create_topics(bootstrap, DEFAULT_TOPICS, partitions))
        log_dir = services.log_dir or Path(".")
        sim_port, worker_port = free_port(), free_port()
        ingress_port = _INGRESS_PORT if _port_is_free(_INGRESS_PORT) else free_port()
        ingress_url = f"http://127.0.0.1:{ingress_port}"
        sim_url = f"http://127.0.0.1:{sim_port}"
        settings = ServiceSettings(
            kafka_bootstrap_servers=bootstrap,
            redis_url=redis_url,
            kafka_idempotent_producer=not services.embedded_broker,
        )
        # Everything of this shell's that the worker does not set (log level, ...) still counts.
        env = {**os.environ, **worker_env(settings, sim_url, None, quick_handover=False)}
        cli = [python, "-m", "llmstream.cli"]
        ports = {"simulator": sim_port, "worker": worker_port, "ingress": ingress_port}
        children = [
            ChildProcess(
                "simulator",
                [*cli, "simulate", "--port", str(sim_port)],
                log_dir / "simulator.log",
                env,
            ),
            ChildProcess(
                "worker",
                [*cli, "worker"],
                log_dir / "worker.log",
                {**env, "LLMSTREAM_HTTP_PORT": str(worker_port)},
            ),
            ChildProcess(
                "ingress",
                [*cli, "ingress", "--host", "127.0.0.1", "--port", str(ingress_port)],
                log_dir / "ingress.log",
                env,
            ),
        ]
        try:
            for child in children:
                child.start().wait_for_port(ports[child.name], timeout=60)
            print(
                "\nllmstream is running:\n"
                f"  kafka      {bootstrap}   (topics: {', '.join(DEFAULT_TOPICS)})\n"
                f"  redis      {redis_url}\n"
                f"  simulator  {sim_url}   (OpenAI /v1/chat/completions, Anthropic /v1/messages)\n"
                f"  worker     http://127.0.0.1:{worker_port}/metrics  /health  /ready\n"
                f"  ingress    {ingress_url}   (POST /v1/requests, /v1/chat/completions; "
                f"docs at {ingress_url}/docs; no API keys: open to anyone on this host)\n"
                f"             curl -s {ingress_url}/v1/chat/completions "
                "-H 'Content-Type: application/json' "
                """-d '{"model": "openai/gpt-4o-mini", """
                """"messages": [{"role": "user", "content": "Hello"}]}'\n"""
                f"  logs       {log_dir}\n",
                flush=True,
            )
            asyncio.run(_show_flow(bootstrap, requests))
            print(
                "Produce your own requests to llm-requests (see README). Ctrl-C stops everything.",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                while not any(c.exited for c in children):
                    time.sleep(0.5)
        finally:
            for child in reversed(children):
                child.stop(grace=35)
    return 0
