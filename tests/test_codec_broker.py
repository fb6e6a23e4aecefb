"""The codecs against the real broker and Redis: produce in one format, consume and decode."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from llmstream.core.settings import ServiceSettings
from llmstream.schemas.codec import WireFormat, decode, decode_request, detect_format, encode
from tests.harness import produce, read_raw
from tests.samples import EVENTS, REQUEST

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", [WireFormat.JSON, WireFormat.AVRO])
async def test_every_event_survives_the_broker_in_each_format(
    settings: ServiceSettings, fmt: WireFormat
) -> None:
    events = list(EVENTS.values())  # each kind, with every field set and with only the required
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.requests_topic
    await produce(bootstrap, topic, [(b"wire-1", encode(event, fmt)) for event in events])
    # One key, so one partition: the events come back in the order they were produced.
    received = await read_raw(bootstrap, topic, len(events))
    assert len(received) == len(events)
    assert all(detect_format(value) is fmt for value in received)
    assert [decode(value, type(event)) for value, event in zip(received, events, strict=True)] == (
        events
    )
    assert decode_request(encode(REQUEST, fmt)) == REQUEST


async def test_a_request_survives_redis(redis_client: aioredis.Redis, unique: str) -> None:
    for fmt in WireFormat:
        await redis_client.set(f"test-{unique}:{fmt.value}", encode(REQUEST, fmt))
        assert decode_request(await redis_client.get(f"test-{unique}:{fmt.value}")) == REQUEST
