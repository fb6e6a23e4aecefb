"""The codecs against the real broker and Redis: produce in one format, consume and decode."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from llmstream.core.settings import ServiceSettings
from llmstream.schemas.codec import WireFormat, decode, decode_request, detect_format, encode
from llmstream.schemas.models import LLMError, LLMMetric, LLMResponse
from tests.harness import produce, read_raw, request

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", [WireFormat.JSON, WireFormat.AVRO])
async def test_every_event_survives_the_broker_in_each_format(
    settings: ServiceSettings, fmt: WireFormat
) -> None:
    original = request("wire-1", temperature=0.2, stop=["\n\n"], metadata={"team": "search"})
    response = LLMResponse(
        request_id="wire-1",
        provider="openai",
        model="gpt-4o-mini",
        content="hé ✓",
        prompt_tokens=3,
        completion_tokens=4,
        total_tokens=7,
        latency_ms=12,
        attempts=1,
        created_at_ms=1,
        metadata={"team": "search"},
    )
    metric = LLMMetric(request_id="wire-1", status="success", worker_id="w", occurred_at_ms=2)
    error = LLMError(
        request_id=None,
        error_type="undecodable",
        message="not JSON",
        raw_payload=b"\xff\x00",
        request=original,
        source_topic="llm-requests",
        source_partition=0,
        source_offset=5,
        occurred_at_ms=3,
    )
    events = [original, response, metric, error]
    await produce(
        settings.kafka_bootstrap_servers,
        settings.requests_topic,
        [(b"wire-1", encode(event, fmt)) for event in events],
    )
    # One key, so one partition: the events come back in the order they were produced.
    received = await read_raw(settings.kafka_bootstrap_servers, settings.requests_topic, 4)
    assert len(received) == 4
    assert all(detect_format(value) is fmt for value in received)
    assert [decode(value, type(event)) for value, event in zip(received, events, strict=True)] == (
        events
    )
    assert decode_request(encode(original, fmt)) == original


async def test_a_request_survives_redis(redis_client: aioredis.Redis, unique: str) -> None:
    original = request("redis-1", metadata={"k": "v"})
    for fmt in WireFormat:
        await redis_client.set(f"test-{unique}:{fmt.value}", encode(original, fmt))
        assert decode_request(await redis_client.get(f"test-{unique}:{fmt.value}")) == original
