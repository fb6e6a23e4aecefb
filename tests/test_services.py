"""The embedded services are real and start and stop cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from llmstream.devtools.embedded import EmbeddedServices, create_topics
from tests.conftest import Services


async def test_broker_and_redis_answer(services: Services, unique: str) -> None:
    topic = f"{unique}-ping"
    await create_topics(services.kafka_bootstrap_servers, [topic], partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([meta.topic_partition])
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k", b"hello")

    client = aioredis.Redis.from_url(services.redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.skipif(
    bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("REDIS_URL")),
    reason="services are configured from the environment; nothing embedded to start",
)
def test_stop_leaves_no_process_behind() -> None:
    services = EmbeddedServices().start()
    pids = services.pids
    assert len(pids) == 2
    services.stop()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def test_children_die_when_the_parent_is_killed(tmp_path: Path) -> None:
    # A parent that starts the services, prints their pids and is then SIGKILLed.
    script = (
        "import os, sys, time\n"
        "from llmstream.devtools.embedded import EmbeddedServices\n"
        "s = EmbeddedServices(log_dir=__import__('pathlib').Path(sys.argv[1])).start()\n"
        "print(' '.join(str(pid) for pid in s.pids), flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_production_code_never_imports_development_tooling() -> None:
    # A fresh interpreter: this test process has long imported llmstream.devtools itself.
    script = (
        "import sys\n"
        "import llmstream.cli, llmstream.ingress.app, llmstream.processors.worker\n"
        "print(' '.join(m for m in sys.modules if m.startswith('llmstream.devtools')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
