"""``make run``: the whole system on one machine, with requests flowing through it.

Starts (or reuses, from ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``) the broker and Redis, the
provider simulator, a worker and the HTTP ingress as child processes, produces sample requests,
prints the outcomes as they arrive, and runs until Ctrl-C or SIGTERM, then stops the worker first
(it drains), the ingress, the simulator, Redis and the broker, saying so. Every child dies with
this process however it ends.

Services take their conventional ports when free (Kafka 9092, Redis 6379, ingress 8080, simulator
8090), so the README's examples work as written; a busy one moves to a free port with a notice.
The worker's metrics port is a free one: 9100 stays free for a worker started by hand. Once
everything is up, the addresses go to ``.llmstream/stack.env`` (``export`` lines, also printed),
which ``llmstream worker`` / ``ingress`` / ``replay`` in this directory read and a shell can
``source``; it is removed at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from llmstream.core.clock import wall_clock_ms
from llmstream.core.settings import STACK_FILE, ServiceSettings, stack_file_pid
from llmstream.devtools.embedded import DEFAULT_TOPICS, EmbeddedServices, create_topics
from llmstream.devtools.processes import (
    ChildProcess,
    ServiceStartError,
    free_port,
    port_is_free,
    worker_env,
)
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


_INGRESS_PORT, _SIMULATOR_PORT = 8080, 8090  # the ports the README's examples use
# How long each child may take to stop on SIGTERM before it is killed. The worker drains its
# in-flight calls (well under a second at the simulator's latency); the others stop at once.
_GRACE_S = {"worker": 5.0, "ingress": 3.0, "simulator": 2.0}
_STOP_ORDER = ("worker", "ingress", "simulator")
_LOG_DIR = STACK_FILE.parent / "logs"


def _port(name: str, conventional: int, moved: list[str]) -> int:
    if port_is_free(conventional):
        return conventional
    port = free_port()
    moved.append(f"{name}: port {conventional} is busy, listening on {port} instead")
    return port


def _stack_file_text(variables: dict[str, str]) -> str:
    lines = [
        f"# llmstream dev pid {os.getpid()}: the stack `make run` started in this directory.",
        "# llmstream worker / ingress / replay here read it; a shell: source .llmstream/stack.env",
        *(f"export {key}={value}" for key, value in variables.items()),
    ]
    return "\n".join(lines) + "\n"


def _say(text: str) -> None:
    print(text, flush=True)


def run_dev(requests: int = 5, partitions: int = 4) -> int:
    """Run everything until Ctrl-C (or SIGTERM); returns the exit code."""
    running = stack_file_pid(STACK_FILE)
    if running is not None:
        raise ServiceStartError(
            f"llmstream dev (pid {running}) already runs from this directory ({STACK_FILE}); "
            "stop it first, or start this one in another directory"
        )
    # Logs stay after the run, for a look at what happened; each run starts them afresh.
    for old_log in _LOG_DIR.glob("*.log"):
        old_log.unlink()
    services = EmbeddedServices.from_env(conventional_ports=True)
    services.log_dir = _LOG_DIR
    children: list[ChildProcess] = []
    # Ctrl-C, and SIGTERM as Ctrl-C, stop the stack: also when started in the background by a
    # shell without job control, which leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # The sample flow's consumer would log its group join line by line.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    code = 0  # Ctrl-C: a normal end
    try:
        with contextlib.suppress(KeyboardInterrupt):
            code = _run(services, children, requests, partitions)
    finally:
        # A second Ctrl-C must not cut the stop short and leave children to PR_SET_PDEATHSIG.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(services, children)
    return code


def _stop(services: EmbeddedServices, children: list[ChildProcess]) -> None:
    began = time.monotonic()
    if children or services.started:
        _say("\nstopping:")
    # The worker first: it stops taking requests and finishes those in flight.
    for child in sorted(children, key=lambda c: _STOP_ORDER.index(c.name)):
        if child.exited:
            continue
        doing = " (draining in-flight requests)" if child.name == "worker" else ""
        _say(f"  {child.name}{doing}")
        if not child.stop(grace=_GRACE_S.get(child.name, 3.0)):
            _say(f"  {child.name} did not stop within {_GRACE_S[child.name]:.0f} s: killed")
    services.stop(on_stop=lambda name: _say(f"  {name}"))
    STACK_FILE.unlink(missing_ok=True)
    if children or services.started:
        _say(f"stopped in {time.monotonic() - began:.1f} s")


def _run(
    services: EmbeddedServices, children: list[ChildProcess], requests: int, partitions: int
) -> int:
    python = sys.executable
    services.start()
    assert services.kafka_bootstrap_servers and services.redis_url
    bootstrap, redis_url = services.kafka_bootstrap_servers, services.redis_url
    asyncio.run(create_topics(bootstrap, DEFAULT_TOPICS, partitions))
    log_dir = _LOG_DIR
    moved = list(services.moved)
    sim_port = _port("simulator", _SIMULATOR_PORT, moved)
    ingress_port = _port("ingress", _INGRESS_PORT, moved)
    worker_port = free_port()
    ingress_url = f"http://127.0.0.1:{ingress_port}"
    sim_url = f"http://127.0.0.1:{sim_port}"
    settings = ServiceSettings(
        kafka_bootstrap_servers=bootstrap,
        redis_url=redis_url,
        kafka_idempotent_producer=not services.embedded_broker,
    )
    worker = worker_env(settings, sim_url, None, quick_handover=False)
    # Everything of this shell's that the worker does not set (log level, ...) still counts.
    env = {**os.environ, **worker}
    cli = [python, "-m", "llmstream.cli"]
    ports = {"simulator": sim_port, "worker": worker_port, "ingress": ingress_port}
    children += [
        ChildProcess(
            "simulator", [*cli, "simulate", "--port", str(sim_port)], log_dir / "simulator.log", env
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
    for child in children:
        child.start().wait_for_port(ports[child.name], timeout=60)
    stack = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REDIS_URL": redis_url,
        **{k: worker[k] for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")},
        **{k: worker[k] for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")},
        "LLMSTREAM_INGRESS_URL": ingress_url,
    }
    STACK_FILE.parent.mkdir(exist_ok=True)
    STACK_FILE.write_text(_stack_file_text(stack), encoding="utf-8")
    _say(
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
        f"  logs       {log_dir}\n"
    )
    _say(
        f"These addresses are in {STACK_FILE}: llmstream worker, ingress and replay started in "
        "this directory use them;\nin another shell here, `source "
        f"{STACK_FILE}` sets them:\n"
        + "".join(f"  export {key}={value}\n" for key, value in stack.items())
    )
    for notice in moved:
        _say(
            f"NOTICE {notice}: the README's examples need `source {STACK_FILE}` "
            "(and this address) first"
        )
    asyncio.run(_show_flow(bootstrap, requests))
    _say("Produce your own requests to llm-requests (see README). Ctrl-C stops everything.")
    while not any(c.exited for c in children):
        time.sleep(0.5)
    crashed = next(c for c in children if c.exited)
    _say(f"{crashed.name} exited; its log {crashed.log_path}:\n{crashed.log_tail()}")
    return 1
