"""The ingress's consumers in no consumer group: each replica reads the whole of a topic itself.

The response listener (:mod:`llmstream.ingress.results`) and the chunk hub
(:mod:`llmstream.ingress.chunks`) each keep one such consumer, assigned every partition from its
end and read by a task of their own; the hub's read-backs open short-lived ones. They are built,
find their partitions and stop the same way, here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from llmstream.core.connections import kafka_client_options
from llmstream.ingress.settings import IngressSettings

__all__ = ["fetches", "partitions_of", "stop_reading", "ungrouped_consumer"]

log = logging.getLogger(__name__)


def ungrouped_consumer(settings: IngressSettings, client_id: str) -> AIOKafkaConsumer:
    """A consumer in no group, committing nothing, that starts where it is assigned (or at the
    end), fetching with the listener's wait (``listener_fetch_max_wait_ms``)."""
    return AIOKafkaConsumer(
        **kafka_client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_max_wait_ms=settings.listener_fetch_max_wait_ms,
        client_id=client_id,
    )


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """``topic``'s partitions, in order; the metadata is asked for again once when it does not
    know the topic yet (a topic created after the consumer started). Empty: no such topic."""
    found = consumer.partitions_for_topic(topic)
    if not found:
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
    return sorted(found or ())


async def fetches(
    consumer: AIOKafkaConsumer, reader: str, max_records: int
) -> AsyncIterator[dict[TopicPartition, list[ConsumerRecord]]]:
    """What ``consumer`` fetches, a second's wait at a time (empty when nothing came), forever: a
    failed fetch is logged as ``reader``'s and tried again a second later."""
    while True:
        try:
            yield await consumer.getmany(timeout_ms=1000, max_records=max_records)
        except KafkaError as exc:
            log.warning("%s: %s; retrying", reader, exc)
            await asyncio.sleep(1.0)


async def stop_reading(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Cancel the reading ``task`` and wait for it, then stop its ``consumer``."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if consumer is not None:
        await consumer.stop()
