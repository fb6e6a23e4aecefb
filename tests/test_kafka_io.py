"""The worker's producer side against the real broker: outputs coalesced into record batches land
where ``producer.send`` would put them, in the order they were handed over, and one too large is
refused before anything is sent."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from llmstream.core.settings import ServiceSettings
from llmstream.processors.kafka_io import KafkaEmitter
from llmstream.processors.pipeline import Output

pytestmark = pytest.mark.integration

KEYS = [f"req-{i}".encode() for i in range(40)]
PER_KEY = 25


async def read_by_partition(
    bootstrap: str, topic: str, expected: int
) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    try:
        await consumer._client.force_metadata_update()
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + 30
        while sum(map(len, found.values())) < expected and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                found.setdefault(tp.partition, []).extend((r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return found


async def test_coalesced_outputs_land_on_the_default_partition_in_the_order_handed_over(
    settings: ServiceSettings,
) -> None:
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.responses_topic
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    emitter = KafkaEmitter(producer, max_event_bytes=1_000_000)

    async def one_key(key: bytes) -> None:
        # Like a stream's chunks: handed over one by one, awaited at the end.
        pending = []
        for n in range(PER_KEY):
            pending.append(await emitter.send(Output(topic, key, b"%s:%03d" % (key, n))))
            if n % 7 == 0:
                await asyncio.sleep(0)  # other keys' outputs interleave with these
        for acked in pending:
            await acked

    try:
        await asyncio.gather(*(one_key(key) for key in KEYS))
        await emitter.emit([Output(topic, None, b"keyless")])
    finally:
        await emitter.close()
        await producer.stop()

    found = await read_by_partition(bootstrap, topic, len(KEYS) * PER_KEY + 1)
    partitions = sorted(found)
    assert len(partitions) > 1  # the topic has 4: the keys spread
    default = DefaultPartitioner()
    for key in KEYS:
        expected_partition = default(key, [0, 1, 2, 3], [0, 1, 2, 3])
        values = [value for k, value in found.get(expected_partition, []) if k == key]
        assert values == [b"%s:%03d" % (key, n) for n in range(PER_KEY)], key
    assert sum(map(len, found.values())) == len(KEYS) * PER_KEY + 1


async def test_an_output_over_the_limit_is_refused_and_nothing_is_sent(
    settings: ServiceSettings,
) -> None:
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.errors_topic
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    emitter = KafkaEmitter(producer, max_event_bytes=4096)
    try:
        with pytest.raises(MessageSizeTooLargeError, match="LLMSTREAM_MAX_EVENT_BYTES"):
            await emitter.emit([Output(topic, b"big", b"x" * 5000)])
        await emitter.emit([Output(topic, b"small", b"y" * 100)])
    finally:
        await emitter.close()
        await producer.stop()
    found = await read_by_partition(bootstrap, topic, 1)
    assert [value for records in found.values() for _, value in records] == [b"y" * 100]
