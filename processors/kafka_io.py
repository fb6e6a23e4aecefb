"""The worker's Kafka side, on aiokafka directly: group membership, fetching, ordered commits,
pausing, and the producer its outcomes leave by.

Why not faust's stream machinery: measured on one core of this project's 2-CPU machines, consuming
a request, producing its response and metric and committing cost 0.377 ms of CPU per request
through a faust agent (its consumer thread, per-event stream objects, sensors and service loop)
and 0.036 ms through aiokafka alone; the hot path's whole budget is 0.5 ms.

Commits follow :class:`~processors.acks.OrderedAcks`: an offset is committed only once every
earlier event of its partition has its outcome on the broker, so a crash re-reads (and dedup
answers) rather than loses. Committed every ``LLMSTREAM_COMMIT_INTERVAL_S``, for partitions being
revoked (inside the rebalance, before another member reads them) and at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from llmstream.core.connections import kafka_client_options, kafka_producer_options
from llmstream.core.loops import BoundLoop
from llmstream.processors.acks import OrderedAcks, Ticket
from llmstream.processors.metrics import WorkerMetrics
from llmstream.processors.partitioner import murmur2
from llmstream.processors.pipeline import Output
from llmstream.processors.settings import WorkerSettings

log = logging.getLogger(__name__)

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# How long a worker may go without asking for records before the group counts it as stuck and
# takes its partitions away. The worker stops asking while all its in-flight slots are taken
# (calls of a slow provider), which is not stuck: a stuck event loop misses its heartbeats anyway.
_MAX_POLL_INTERVAL_MS = 1_000_000


def create_producer(settings: WorkerSettings) -> AIOKafkaProducer:
    """The worker's producer: acks from all in-sync replicas, idempotence and compression as
    configured; an output larger than ``LLMSTREAM_MAX_EVENT_BYTES`` is refused (and reported on
    llm-errors as output_too_large by the pipeline)."""
    return AIOKafkaProducer(
        **kafka_producer_options(settings), max_request_size=settings.max_event_bytes
    )


def consumer_options(settings: WorkerSettings) -> dict[str, Any]:
    """The request consumer's arguments: the group, its membership timing, manual commits."""
    options: dict[str, Any] = {
        **kafka_client_options(settings),
        "group_id": settings.consumer_group,
        "client_id": f"llmstream-{settings.worker_id}",
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "session_timeout_ms": int(settings.session_timeout_s * 1000),
        "rebalance_timeout_ms": int(settings.rebalance_timeout_s * 1000),
        "heartbeat_interval_ms": int(settings.heartbeat_interval_s * 1000),
        "max_poll_interval_ms": _MAX_POLL_INTERVAL_MS,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
    }
    if settings.group_instance_id is not None:
        options["group_instance_id"] = settings.group_instance_id
    return options


class KafkaEmitter:
    """Sends outputs with an aiokafka producer and waits for the broker's acks.

    Outputs are appended to a record batch per partition as they are handed over, and a batch
    leaves (``send_batch``) as soon as the previous batch of its partition left for the broker;
    meanwhile the next one fills. That is what the producer's own accumulator does, without the
    per-message work of ``producer.send`` (its metadata wait, partitioning and bookkeeping cost
    several times an append). Each partition's batches leave in order, so the outputs of one key
    (a stream's chunks) keep their order; partitions are chosen as the producer's default
    partitioner does (murmur2 of the key), so an output lands where ``producer.send`` puts it.
    """

    def __init__(self, producer: AIOKafkaProducer, max_event_bytes: int) -> None:
        self._producer = producer
        self._max_event_bytes = max_event_bytes
        # Per partition, the batches not yet handed to the producer, the last one open.
        self._batches: dict[tuple[str, int], deque[_Batch]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._topics: dict[str, tuple[float, list[int]]] = {}  # topic: (good until, partitions)
        self._hashed: tuple[bytes | None, int] = (None, 0)  # the last key, and its hash
        self._loop = BoundLoop()

    async def emit(self, outputs: Sequence[Output]) -> None:
        pending = [await self.send(o) for o in outputs]
        for acked in pending:  # all are in flight already: in turn costs less than a gather
            await acked

    async def send(self, output: Output) -> Awaitable[object]:
        """Hand ``output`` over; the result resolves once the broker acked it."""
        key, value = output.key, output.value
        limit = self._max_event_bytes
        # The exact size (the producer's estimate) only when key and value alone come near.
        if len(value) + len(key or b"") + _RECORD_OVERHEAD > limit:
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
            if size > limit:
                raise MessageSizeTooLargeError(
                    f"{size} bytes, over LLMSTREAM_MAX_EVENT_BYTES ({limit})"
                )
        partitions = await self._partitions(output.topic)
        if key is None:
            partition = random.choice(partitions)  # noqa: S311 - as the default partitioner
        else:
            if key != self._hashed[0]:  # a request's outputs come in a row: hashed once
                self._hashed = (key, murmur2(key) & 0x7FFFFFFF)
            partition = partitions[self._hashed[1] % len(partitions)]
        tp = (output.topic, partition)
        future: asyncio.Future[object] = self._loop.get().create_future()
        batches = self._batches.get(tp)
        if batches is None:
            batches = self._batches[tp] = deque()
        if not batches or batches[-1].builder.append(key=key, value=value, timestamp=None) is None:
            batch = _Batch(self._producer.create_batch())  # none open, or the open one is full
            if batch.builder.append(key=key, value=value, timestamp=None) is None:
                # An empty batch takes any record today; never let one go missing if not.
                raise MessageSizeTooLargeError(f"{len(value)} bytes do not fit a record batch")
            batches.append(batch)
        batches[-1].futures.append(future)
        if tp not in self._senders:
            self._senders[tp] = self._loop.get().create_task(self._send(tp, batches))
        return future

    async def close(self) -> None:
        senders = list(self._senders.values())
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        closed = KafkaConnectionError("the producer was closed")
        for batches in self._batches.values():
            for batch in batches:
                _fail_futures(batch.futures, closed)
        self._batches.clear()

    async def _send(self, tp: tuple[str, int], batches: deque[_Batch]) -> None:
        """Hand the partition's batches to the producer, oldest first, until none is left; a
        batch waits there until the partition's previous one left for the broker."""
        topic, partition = tp
        send_batch = self._producer.send_batch
        try:
            while batches:
                batch = batches.popleft()  # from here on nothing is appended to it
                try:
                    sent = await send_batch(batch.builder, topic, partition=partition)
                except Exception as exc:  # the producer closed, a timeout: told to each sender
                    _fail_futures(batch.futures, exc)
                    continue
                except BaseException:
                    _fail_futures(batch.futures, KafkaConnectionError("the producer was closed"))
                    raise
                sent.add_done_callback(functools.partial(_settle, batch.futures))
        finally:
            del self._senders[tp]

    async def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions, sorted, from metadata at most ``_PARTITIONS_TTL_S`` old."""
        known = self._topics.get(topic)
        now = self._loop.get().time()
        if known is not None and known[0] > now:
            return known[1]
        cluster = self._producer.client.cluster
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            await self._producer.client._wait_on_metadata(topic)  # what producer.send() awaits
            partitions = cluster.partitions_for_topic(topic)
        ordered = sorted(partitions)
        self._topics[topic] = (now + _PARTITIONS_TTL_S, ordered)
        return ordered


class _Batch:
    """A record batch being filled for one partition, and the futures of its outputs."""

    __slots__ = ("builder", "futures")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.futures: list[asyncio.Future[object]] = []


# More than a record's framing (with a record batch's header) adds to its key and value.
_RECORD_OVERHEAD = 128

# A topic's partitions are read again this often: partitions added to a topic are used within it.
_PARTITIONS_TTL_S = 10.0


def _settle(futures: list[asyncio.Future[object]], done: asyncio.Future[object]) -> None:
    if done.cancelled():
        _fail_futures(futures, KafkaConnectionError("the send was cancelled"))
        return
    error = done.exception()
    if error is not None:
        _fail_futures(futures, error)
        return
    result = done.result()
    for future in futures:
        if not future.done():
            future.set_result(result)


def _fail_futures(futures: list[asyncio.Future[object]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


class RequestReader(ConsumerRebalanceListener):  # type: ignore[misc]
    """Reads the requests topic for the worker and commits what :attr:`acks` releases."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.consumer = AIOKafkaConsumer(**consumer_options(settings))
        self.acks: OrderedAcks[TopicPartition] = OrderedAcks(
            self._released,
            max_held=settings.max_pending_acks_per_partition,
            pause=self._pause,
            resume=self._resume,
        )
        # Per partition, the offset to commit next (the one after its last released event), and
        # the last one committed.
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        # Counts rebalances: records fetched before one are not admitted after it (their
        # partition may have been handed over, or re-read from the committed offset).
        self._generation = 0
        self._fetched_in = 0
        self.assigned = False

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self._settings.requests_topic], listener=self)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def fetch(self, max_records: int) -> Records:
        """The next records, at most ``max_records``, by partition in offset order."""
        records: Records = await self.consumer.getmany(timeout_ms=1000, max_records=max_records)
        self._fetched_in = self._generation
        return records

    def admit(self, tp: TopicPartition, offset: int) -> Ticket[TopicPartition] | None:
        """A ticket for a fetched record, or None when a rebalance came since its fetch: it is
        left to whoever owns its partition now."""
        if self._fetched_in != self._generation:
            return None
        return self.acks.admit(tp, offset)

    async def commit(self, partitions: Collection[TopicPartition] | None = None) -> None:
        """Commit the finished prefix of each partition this worker owns (of ``partitions``)."""
        assigned = self.consumer.assignment()
        offsets = {
            tp: offset
            for tp, offset in self._done.items()
            if self._committed.get(tp) != offset
            and tp in assigned
            and (partitions is None or tp in partitions)
        }
        if not offsets:
            return
        await self.consumer.commit(offsets)
        self._committed.update(offsets)

    async def commit_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.commit()
            except KafkaError as exc:  # a rebalance in progress, the broker away: next time
                log.warning("offset commit failed (retried in %.1f s): %r", interval_s, exc)

    def _released(self, tp: TopicPartition, offset: int) -> None:
        self._done[tp] = offset + 1

    def _pause(self, tp: TopicPartition) -> None:
        if tp not in self.consumer.assignment():
            return
        log.warning(
            "%s holds more than %d finished events behind an unfinished one: not read until it "
            "finishes (LLMSTREAM_MAX_PENDING_ACKS_PER_PARTITION)",
            tp,
            self._settings.max_pending_acks_per_partition,
        )
        self.consumer.pause(tp)
        self._metrics.paused_partitions.set(len(self.acks.paused()))

    def _resume(self, tp: TopicPartition) -> None:
        log.info("%s read again: its held events were committed or handed over", tp)
        if tp in self.consumer.assignment():
            self.consumer.resume(tp)
        self._metrics.paused_partitions.set(len(self.acks.paused()))

    # -- ConsumerRebalanceListener ------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._generation += 1
        try:
            await self.commit(revoked)  # what is done here is not read again by the next owner
        except KafkaError as exc:
            log.warning("offsets of revoked partitions not committed: %r", exc)
        dropped = self.acks.revoke(revoked)
        for tp in revoked:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)
        self._metrics.paused_partitions.set(len(self.acks.paused()))
        if dropped:
            log.info("partitions revoked; %d unfinished events left to their next owner", dropped)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._generation += 1
        self.assigned = True
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))
