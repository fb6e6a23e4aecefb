"""Consumer lag of the workers' group on ``llm-requests``: how many requests are waiting.

Per partition: the log end offset minus the offset the group committed (or, before its first
commit, minus the partition's start, where a new group begins reading), as
``kafka-consumer-groups.sh --describe`` shows it. Requests in flight count as waiting until their
offsets are committed. Sampled every ``consumer_lag_interval_s`` into
``llmstream_consumer_lag_messages{topic,partition}``. Every worker reports every partition of the
group, owned by it or not, so aggregate with ``max by (topic, partition)``, not ``sum``.

Exact on Apache Kafka. The embedded Tansu broker answers ListOffsets "latest" with the newest
batch's base offset + 1, not the high watermark, so there the lag reads low by up to one producer
batch per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from llmstream.core.connections import kafka_client_options
from llmstream.processors.settings import WorkerSettings

log = logging.getLogger(__name__)


class ConsumerLag:
    """Samples the group's lag on the requests topic into ``gauge`` (labels topic, partition)."""

    def __init__(self, settings: WorkerSettings, gauge: Gauge) -> None:
        self._settings = settings
        self._gauge = gauge
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        options = kafka_client_options(self._settings)
        admin = AIOKafkaAdminClient(**options, client_id="llmstream-lag")
        consumer = AIOKafkaConsumer(
            **options, group_id=None, enable_auto_commit=False, client_id="llmstream-lag"
        )
        await admin.start()
        try:
            await consumer.start()
        except BaseException:
            await admin.close()
            raise
        self._admin, self._consumer = admin, consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()
        self._admin = self._consumer = None

    async def sample(self) -> dict[int, int]:
        """The lag of each partition of the requests topic, also set on the gauge."""
        assert self._admin is not None and self._consumer is not None, "start() first"
        topic = self._settings.requests_topic
        await self._consumer.topics()  # refresh metadata: partitions may have been added
        partitions = [
            TopicPartition(topic, p)
            for p in sorted(self._consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return {}
        committed = {
            tp: meta.offset
            for tp, meta in (
                await self._admin.list_consumer_group_offsets(
                    self._settings.consumer_group, partitions=partitions
                )
            ).items()
            if meta is not None and meta.offset >= 0
        }
        ends = await self._consumer.end_offsets(partitions)
        uncommitted = [tp for tp in partitions if tp not in committed]
        if uncommitted:
            # Where the group starts on a partition it never committed (auto_offset_reset=earliest).
            committed.update(await self._consumer.beginning_offsets(uncommitted))
        lags = {tp.partition: max(0, ends[tp] - committed[tp]) for tp in partitions}
        for partition, lag in lags.items():
            self._gauge.labels(topic, str(partition)).set(lag)
        return lags

    async def run(self, interval_s: float) -> None:
        """Sample every ``interval_s`` until cancelled; a failed sample keeps the last values."""
        try:
            while True:
                try:
                    if self._admin is None:
                        await self.start()
                    await self.sample()
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning("cannot sample the consumer lag: %r", exc)
                    with contextlib.suppress(KafkaError, OSError, TimeoutError):
                        await self.stop()
                await asyncio.sleep(interval_s)
        finally:
            await self.stop()
