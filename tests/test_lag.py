"""llmstream_consumer_lag_messages: the group's lag, from the broker's offsets."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from llmstream.core.settings import ServiceSettings
from llmstream.processors.lag import ConsumerLag
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.settings import WorkerSettings

pytestmark = pytest.mark.integration


async def test_lag_is_the_end_offset_minus_the_committed_offset(
    settings: ServiceSettings, unique: str
) -> None:
    bootstrap, topic, group = (
        settings.kafka_bootstrap_servers,
        settings.requests_topic,
        f"g-{unique}",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        # One record per batch: Tansu's end offset is exact then (see processors/lag.py).
        for partition, count in ((0, 5), (1, 2)):
            for _ in range(count):
                await producer.send_and_wait(topic, b"request", partition=partition)
    finally:
        await producer.stop()
    # The group committed offset 2 on partition 0, and never committed on the others.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 2})
    finally:
        await consumer.stop()

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    worker_settings = WorkerSettings(**{**settings.model_dump(), "consumer_group": group})
    lag = ConsumerLag(worker_settings, metrics.consumer_lag)
    await lag.start()
    try:
        assert await lag.sample() == {0: 3, 1: 2, 2: 0, 3: 0}
    finally:
        await lag.stop()
    exported = registry.get_sample_value(
        "llmstream_consumer_lag_messages", {"topic": topic, "partition": "0"}
    )
    assert exported == 3
