"""Real services for the suite: one broker and one Redis per session, fresh names per test.

Services come from, in order: ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``; testcontainers' Kafka
and Redis when ``LLMSTREAM_TEST_SERVICES=docker``; else the embedded Tansu broker and redis-server.
Every test gets its own topics, consumer group and Redis key prefix, so tests cannot leak into each
other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.embedded import EmbeddedServices, create_topics
from llmstream.devtools.processes import scoped_settings, topic_names
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings


@dataclass(frozen=True)
class Services:
    kafka_bootstrap_servers: str
    redis_url: str
    # The embedded Tansu broker cannot grant producer IDs, so the idempotent producer is off
    # against it; Apache Kafka keeps it on.
    idempotent_producer: bool = False


def _docker_services() -> Iterator[Services]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with KafkaContainer().with_kraft() as kafka, RedisContainer() as redis_container:
        host = redis_container.get_container_host_ip()
        port = redis_container.get_exposed_port(6379)
        yield Services(
            kafka.get_bootstrap_server(), f"redis://{host}:{port}/0", idempotent_producer=True
        )


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """The broker and Redis every integration test talks to."""
    if os.environ.get("LLMSTREAM_TEST_SERVICES") == "docker":
        yield from _docker_services()
        return
    with EmbeddedServices.from_env() as embedded:
        assert embedded.kafka_bootstrap_servers and embedded.redis_url
        # KAFKA_BOOTSTRAP_SERVERS may name an Apache Kafka cluster: idempotence stays on there.
        yield Services(
            embedded.kafka_bootstrap_servers,
            embedded.redis_url,
            idempotent_producer=not embedded.embedded_broker,
        )


@pytest.fixture
def unique() -> str:
    """A short name unique to this test, for topics, groups and key prefixes."""
    return uuid.uuid4().hex[:10]


def scoped_test_settings(services: Services, unique: str) -> ServiceSettings:
    """Settings naming topics ``<unique>-llm-*`` and Redis keys under ``test-<unique>:``."""
    return scoped_settings(
        services.kafka_bootstrap_servers,
        services.redis_url,
        unique,
        idempotent_producer=services.idempotent_producer,
        key_prefix=f"test-{unique}:",
    )


def chunks_topic_name(unique: str) -> str:
    """The chunks topic of the test named ``unique`` (LLMSTREAM_CHUNKS_TOPIC of its worker)."""
    return f"{unique}-llm-response-chunks"


@pytest.fixture
def chunks_topic(unique: str) -> str:
    """This test's chunks topic, created with the others by ``settings``."""
    return chunks_topic_name(unique)


@pytest.fixture
async def settings(services: Services, unique: str) -> ServiceSettings:
    """Settings naming this test's own topics (created, 4 partitions, the chunks topic too) and
    Redis key prefix."""
    result = scoped_test_settings(services, unique)
    topics = [*topic_names(result), chunks_topic_name(unique)]
    await create_topics(services.kafka_bootstrap_servers, topics, partitions=4)
    return result


@pytest.fixture
async def redis_client(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def simulator_latency_ms() -> float:
    """The provider simulator's latency; a test module overrides this fixture to change it."""
    return 20.0


@pytest.fixture
async def simulator(simulator_latency_ms: float) -> AsyncIterator[SimulatorServer]:
    """The provider simulator, serving in the test's event loop on a free loopback port."""
    settings = SimulatorSettings(host="127.0.0.1", port=0, latency_ms=simulator_latency_ms)
    async with SimulatorServer(settings) as server:
        yield server
