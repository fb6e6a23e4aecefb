"""An undecodable event too large to copy whole into its error event must not stop its partition."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from llmstream.core.settings import ServiceSettings
from llmstream.devtools.simulator import SimulatorServer
from llmstream.schemas import LLMError, LLMResponse, encode
from tests import harness


async def test_an_800_kb_undecodable_event_is_reported_truncated_and_passed(
    settings: ServiceSettings, simulator: SimulatorServer, unique: str, tmp_path: Path
) -> None:
    # Not JSON and not Avro (an unfinished object): undecodable, 800 kB. Copied whole into the
    # error event, base64 would take it past the producer's 1 MB limit.
    bad = b'{"request_id": "big", "model": "' + b"x" * 800_000
    valid = [harness.request(f"after-{i}") for i in range(5)]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", max_request_size=2**20
    )
    await producer.start()
    try:
        # All on one partition, the bad event first: what follows it must still be answered.
        sent = await producer.send_and_wait(settings.requests_topic, bad, key=b"big", partition=0)
        for request in valid:
            await producer.send_and_wait(
                settings.requests_topic,
                encode(request),
                key=request.request_id.encode(),
                partition=0,
            )
    finally:
        await producer.stop()

    group = f"g-{unique}"
    async with harness.running_worker(settings, simulator.url, group, tmp_path):
        answers = await harness.read_answers(settings, len(valid), timeout=120)
        [error] = await harness.read_outputs(settings, LLMError, 1, timeout=30)
        # The worker commits every half second; give a loaded machine a minute.
        committed = -1
        for _ in range(120):
            committed = await _committed(
                settings, group, TopicPartition(settings.requests_topic, 0)
            )
            if committed > sent.offset:
                break
            await asyncio.sleep(0.5)

    assert {a.request_id for a in answers} == {r.request_id for r in valid}
    assert isinstance(answers[0], LLMResponse)
    assert error.error_type == "undecodable"
    assert error.source_offset == sent.offset
    assert error.raw_payload is not None and bad.startswith(error.raw_payload)
    assert 0 < len(error.raw_payload) < len(bad)
    assert error.raw_payload_size == len(bad)
    assert error.raw_payload_sha256 == hashlib.sha256(bad).hexdigest()
    # The group's committed offset passed the bad event: a restart does not meet it again.
    assert committed > sent.offset


async def _committed(settings: ServiceSettings, group: str, partition: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[partition])
    finally:
        await admin.close()
    found = offsets.get(partition)
    return found.offset if found is not None else -1
