"""The worker's producer side against the real broker: outputs appended to record batches land
where ``producer.send`` would put them, in the order they were handed over, and one too large is
refused before anything is sent; the partitioner's hash is Kafka's."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from llmstream.core.settings import ServiceSettings
from llmstream.processors.kafka_io import KafkaEmitter
from llmstream.processors.partitioner import murmur2
from llmstream.processors.pipeline import Output
from tests.harness import read_records

KEYS = [f"req-{i}".encode() for i in range(40)]
PER_KEY = 25


# Kafka's own (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java), signed.
JAVA_CASES = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_is_kafkas_for_every_length() -> None:
    for data, signed in JAVA_CASES.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data
    rng = random.Random(13)
    for length in range(300):
        for _ in range(10):
            data = rng.randbytes(length)
            assert murmur2(data) == aiokafka_murmur2(data), data


@contextlib.asynccontextmanager
async def emitter_on(bootstrap: str, max_event_bytes: int) -> AsyncIterator[KafkaEmitter]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    emitter = KafkaEmitter(producer, max_event_bytes=max_event_bytes)
    try:
        yield emitter
    finally:
        await emitter.close()
        await producer.stop()


@pytest.mark.integration
async def test_outputs_land_on_the_default_partition_in_the_order_handed_over(
    settings: ServiceSettings,
) -> None:
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.responses_topic
    async with emitter_on(bootstrap, 1_000_000) as emitter:

        async def one_key(key: bytes) -> None:
            # Like a stream's chunks: handed over one by one, awaited at the end.
            pending = []
            for n in range(PER_KEY):
                pending.append(await emitter.send(Output(topic, key, b"%s:%03d" % (key, n))))
                if n % 7 == 0:
                    await asyncio.sleep(0)  # other keys' outputs interleave with these
            for acked in pending:
                await acked

        await asyncio.gather(*(one_key(key) for key in KEYS))
        await emitter.emit([Output(topic, None, b"keyless")])

    records = await read_records(bootstrap, topic, len(KEYS) * PER_KEY + 1)
    assert len(records) == len(KEYS) * PER_KEY + 1
    assert len({record.partition for record in records}) > 1  # the topic has 4: keys spread
    default = DefaultPartitioner()
    for key in KEYS:
        partition = default(key, [0, 1, 2, 3], [0, 1, 2, 3])
        values = [r.value for r in records if r.key == key and r.partition == partition]
        assert values == [b"%s:%03d" % (key, n) for n in range(PER_KEY)], key


@pytest.mark.integration
async def test_an_output_over_the_limit_is_refused_and_nothing_is_sent(
    settings: ServiceSettings,
) -> None:
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.errors_topic
    async with emitter_on(bootstrap, 4096) as emitter:
        with pytest.raises(MessageSizeTooLargeError, match="LLMSTREAM_MAX_EVENT_BYTES"):
            await emitter.emit([Output(topic, b"big", b"x" * 5000)])
        await emitter.emit([Output(topic, b"small", b"y" * 100)])
    assert [record.value for record in await read_records(bootstrap, topic, 1)] == [b"y" * 100]
