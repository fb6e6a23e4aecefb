"""One reader of ``llm-response-chunks`` per replica, fanning chunks out to the clients that stream.

:class:`ChunkHub` is a consumer in no consumer group, assigned every partition of the chunks topic
from its end at start-up (like :class:`~llmstream.ingress.results.ResponseListener`). It reads the
topic once however many clients stream: each record is handed to the :class:`Subscription` of
every client following its request ID, into a bounded backlog. The hub never waits for a client:
one that falls ``stream_client_backlog`` chunks behind is dropped (its next read raises
:class:`FellBehind`), and the hub goes on.

Late followers. The hub keeps each request's recent chunks (raw, decoded on demand), at most
``stream_buffer_bytes`` in all and a request's for ``stream_buffer_age_s`` after its last chunk,
least recently written first out. A subscription gets the kept chunks, then every chunk read after
it. When the hub cannot vouch for having kept a request from its first chunk (the replica started,
or evicted chunks, after the request was queued), the subscription reads that request's partition
back with a short-lived consumer, from the offset the broker finds for the request's queue time
(``offsets_for_times``, less ``stream_clock_skew_s``) up to where the hub had read: nothing is
missed and nothing comes twice. Concurrent read-backs of one request are made once; the result is
kept, so the followers after it read the buffer. A request whose queue time is unknown (produced
straight to Kafka) gets only what the hub kept of it.

Partitions: chunks are keyed by request ID and partitioned as every aiokafka and Java producer
does (murmur2 of the key), so the read-back reads one partition. A producer with another
partitioner (librdkafka's default, CRC32) would put chunks where the read-back does not look;
live and kept chunks are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from llmstream.core.clock import wall_clock_ms
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.settings import IngressSettings
from llmstream.ingress.tailing import (
    fetches,
    partitions_of,
    stop_reading,
    ungrouped_consumer,
)
from llmstream.schemas.codec import DecodeError, decode, key_as_id
from llmstream.schemas.models import LLMResponseChunk

__all__ = ["ChunkHub", "FellBehind", "Subscription"]

log = logging.getLogger(__name__)

# Bookkeeping per kept chunk besides its bytes.
_OVERHEAD_BYTES = 100
# Read-backs at once per replica; each is a consumer of its own.
_READ_BACKS = 4
_READ_BACK_TIMEOUT_S = 30.0
_TOPIC_RETRY_S = 2.0
_partitioner = DefaultPartitioner()


class FellBehind(Exception):
    """The subscriber fell too far behind and was dropped; the hub went on without it."""


@dataclass(slots=True)
class _Kept:
    """One chunk record as read: decoded when somebody wants it."""

    offset: int
    value: bytes
    chunk: LLMResponseChunk | None = None
    undecodable: bool = False

    def decoded(self) -> LLMResponseChunk | None:
        if self.chunk is None and not self.undecodable:
            try:
                self.chunk = decode(self.value, LLMResponseChunk)
            except DecodeError as exc:
                self.undecodable = True
                log.warning("undecodable chunk at offset %d: %s", self.offset, exc)
        return self.chunk


@dataclass(slots=True)
class _Recent:
    """The chunks kept of one request, in offset order."""

    kept: list[_Kept] = field(default_factory=list)
    size: int = 0
    touched_ms: int = 0
    whole: bool = False  # read back from the request's queue time: kept from its first chunk


class Subscription:
    """One client's view of one request's chunks: the kept ones, then every one read after."""

    def __init__(self, request_id: str, limit: int) -> None:
        self.request_id = request_id
        self._limit = limit
        self._backlog: deque[LLMResponseChunk] = deque()
        self._live: deque[LLMResponseChunk] = deque()
        self._wake = asyncio.Event()
        self.dropped = False

    def _push(self, chunk: LLMResponseChunk) -> bool:
        """Queue a chunk read live; False (and dropped) when the client is too far behind."""
        if len(self._live) >= self._limit:
            self.dropped = True
            self._wake.set()
            return False
        self._live.append(chunk)
        self._wake.set()
        return True

    def ready(self) -> LLMResponseChunk | None:
        """The next chunk if one is there, without waiting."""
        if self._backlog:
            return self._backlog.popleft()
        if self._live:
            return self._live.popleft()
        return None

    async def next(self) -> LLMResponseChunk:
        """The next chunk, in order; raises :class:`FellBehind` once dropped and drained."""
        while True:
            chunk = self.ready()
            if chunk is not None:
                return chunk
            if self.dropped:
                raise FellBehind(self.request_id)
            self._wake.clear()
            await self._wake.wait()


class ChunkHub:
    """Reads every chunk once and fans it out to the subscriptions of its request ID."""

    def __init__(self, settings: IngressSettings, metrics: IngressMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._topic = settings.chunks_topic
        self._skew_ms = int(settings.stream_clock_skew_s * 1000)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[int] = []
        self._next: dict[int, int] = {}  # per partition: the offset after the last one handled
        self._subscribers: dict[str, set[Subscription]] = {}
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._kept_bytes = 0
        self._started_ms = 0  # every chunk produced after this was read here
        self._evicted_through_ms = 0  # no request touched after this was evicted
        self._evictions = 0
        self._read_backs = asyncio.Semaphore(_READ_BACKS)
        self._read_back_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._barriers: dict[int, list[tuple[int, asyncio.Future[None]]]] = {}
        self._end_queries: dict[int, asyncio.Future[int]] = {}
        self._end_locks: dict[int, asyncio.Lock] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Reading: started, with the topic found."""
        return bool(self._partitions) and self._task is not None and not self._task.done()

    @property
    def followers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    async def start(self) -> None:
        """Assign every partition at its end; a missing topic is looked for again until found
        (streamed answers then come whole, at their end)."""
        consumer = ungrouped_consumer(self._settings, "llmstream-ingress-chunks")
        await consumer.start()
        try:
            found = await partitions_of(consumer, self._topic)
            if found:
                await self._assign(consumer, found, at_end=True)
            else:
                log.warning(
                    "topic %r does not exist: streamed answers come whole at their end until "
                    "it is created (LLMSTREAM_CHUNKS_TOPIC)",
                    self._topic,
                )
        except BaseException:
            await consumer.stop()
            raise
        self._started_ms = wall_clock_ms()
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="ingress-chunk-hub")

    async def stop(self) -> None:
        await stop_reading(self._task, self._consumer)

    async def _assign(
        self, consumer: AIOKafkaConsumer, partitions: list[int], *, at_end: bool
    ) -> None:
        tps = [TopicPartition(self._topic, p) for p in partitions]
        consumer.assign(tps)
        if at_end:
            await consumer.seek_to_end(*tps)
        else:  # a topic created after start-up: everything on it is new
            await consumer.seek_to_beginning(*tps)
        for tp in tps:
            self._next[tp.partition] = await consumer.position(tp)
            self._barriers[tp.partition] = []
        self._partitions = partitions

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while not self._partitions:
            await asyncio.sleep(_TOPIC_RETRY_S)
            try:
                found = await partitions_of(consumer, self._topic)
                if found:
                    await self._assign(consumer, found, at_end=False)
                    log.info("topic %r found: streaming chunks", self._topic)
            except KafkaError as exc:
                log.warning("chunk hub: %s; retrying", exc)
        async for batches in fetches(consumer, "chunk hub", max_records=2000):
            now = wall_clock_ms()
            for tp, records in batches.items():
                for record in records:
                    self._handle(tp.partition, record.offset, record.key, record.value, now)
                self._metrics.chunks_read.inc(len(records))
            for tp in batches:
                self._release_barriers(tp.partition)
            self._evict(now)

    # -- reading --------------------------------------------------------------------------------

    def _handle(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, now_ms: int
    ) -> None:
        self._next[partition] = offset + 1
        request_id = key_as_id(key)
        if request_id is None or not value:
            return
        kept = _Kept(offset, value)
        self._keep(request_id, kept, now_ms)
        subscribers = self._subscribers.get(request_id)
        if not subscribers:
            return
        chunk = kept.decoded()
        if chunk is None:
            return
        for subscription in list(subscribers):
            if not subscription._push(chunk):
                subscribers.discard(subscription)
                self._metrics.stream_dropped.inc()
                log.warning(
                    "a client following %s fell %d chunks behind and was dropped",
                    request_id,
                    self._settings.stream_client_backlog,
                )

    def _keep(self, request_id: str, kept: _Kept, now_ms: int) -> None:
        if self._settings.stream_buffer_bytes == 0:
            return
        recent = self._recent.get(request_id)
        if recent is None:
            recent = self._recent[request_id] = _Recent()
        else:
            self._recent.move_to_end(request_id)
        recent.kept.append(kept)
        size = len(kept.value) + _OVERHEAD_BYTES
        recent.size += size
        recent.touched_ms = now_ms
        self._kept_bytes += size

    def _evict(self, now_ms: int) -> None:
        oldest = now_ms - int(self._settings.stream_buffer_age_s * 1000)
        while self._recent:
            request_id, recent = next(iter(self._recent.items()))
            if (
                self._kept_bytes <= self._settings.stream_buffer_bytes
                and recent.touched_ms >= oldest
            ):
                break
            del self._recent[request_id]
            self._kept_bytes -= recent.size
            self._evicted_through_ms = max(self._evicted_through_ms, recent.touched_ms)
            self._evictions += 1

    def _whole(self, request_id: str, since_ms: int | None) -> bool:
        """Whether the hub holds every chunk of a request queued at ``since_ms`` read so far."""
        recent = self._recent.get(request_id)
        if recent is not None and recent.whole:
            return True
        if since_ms is None:
            return False
        return since_ms - self._skew_ms >= max(self._started_ms, self._evicted_through_ms)

    def partition_of(self, request_id: str) -> int | None:
        """The partition a producer keying by ``request_id`` writes its chunks to."""
        if not self._partitions:
            return None
        partition: int = _partitioner(request_id.encode(), self._partitions, self._partitions)
        return partition

    # -- subscriptions --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, request_id: str, since_ms: int | None = None
    ) -> AsyncIterator[Subscription]:
        """Follow ``request_id`` for the block: every chunk of it from the first, given the time
        it was queued (``since_ms``; None for a subscription made before it was published, or
        when it is unknown: then the chunks kept here)."""
        subscription = Subscription(request_id, self._settings.stream_client_backlog)
        with self._read_back_lock(request_id) as lock:
            read_back = since_ms is not None and not self._whole(request_id, since_ms)
            read_back_locked = False
            if read_back:
                await lock.acquire()  # one read-back per request; later ones find it kept
                read_back_locked = True
            try:
                read_back = read_back and not self._whole(request_id, since_ms)
                # From here to the read-back's start nothing awaits: the kept chunks and the
                # position taken belong to the moment the subscription is registered.
                self._subscribers.setdefault(request_id, set()).add(subscription)
                recent = self._recent.get(request_id)
                kept = list(recent.kept) if recent is not None else []
                partition = self.partition_of(request_id)
                if read_back and partition is not None and since_ms is not None:
                    kept = await self._read_back(request_id, partition, since_ms, kept)
            finally:
                if read_back_locked:
                    lock.release()
        subscription._backlog.extend(c for c in (k.decoded() for k in kept) if c is not None)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(request_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[request_id]

    @contextlib.contextmanager
    def _read_back_lock(self, request_id: str) -> Iterator[asyncio.Lock]:
        lock, users = self._read_back_locks.get(request_id, (asyncio.Lock(), 0))
        self._read_back_locks[request_id] = (lock, users + 1)
        try:
            yield lock
        finally:
            lock, users = self._read_back_locks[request_id]
            if users == 1:
                del self._read_back_locks[request_id]
            else:
                self._read_back_locks[request_id] = (lock, users - 1)

    async def _read_back(
        self, request_id: str, partition: int, since_ms: int, kept: list[_Kept]
    ) -> list[_Kept]:
        """``request_id``'s chunks on the topic before the hub's position, merged with ``kept``;
        remembered as whole unless the hub evicted anything meanwhile."""
        until = self._next[partition]
        evictions = self._evictions
        try:
            async with self._read_backs:
                found = await asyncio.wait_for(
                    self._read_partition(request_id, partition, since_ms, until),
                    _READ_BACK_TIMEOUT_S,
                )
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot read back the chunks of %s: %r", request_id, exc)
            return kept
        self._metrics.chunk_read_backs.inc()
        merged = {k.offset: k for k in found}
        merged.update((k.offset, k) for k in kept)
        result = [merged[offset] for offset in sorted(merged)]
        if self._evictions == evictions and self._settings.stream_buffer_bytes > 0:
            # What the hub kept since has offsets from `until` on: add the read-back before it.
            recent = self._recent.get(request_id)
            later = [k for k in recent.kept if k.offset >= until] if recent else []
            whole = _Recent(whole=True, touched_ms=recent.touched_ms if recent else wall_clock_ms())
            whole.kept = [k for k in result if k.offset < until] + later
            whole.size = sum(len(k.value) + _OVERHEAD_BYTES for k in whole.kept)
            self._kept_bytes += whole.size - (recent.size if recent else 0)
            self._recent[request_id] = whole
            self._recent.move_to_end(request_id)
        return [k for k in result if k.offset < until]

    async def _read_partition(
        self, request_id: str, partition: int, since_ms: int, until: int
    ) -> list[_Kept]:
        consumer = ungrouped_consumer(self._settings, "llmstream-ingress-read-back")
        await consumer.start()
        try:
            tp = TopicPartition(self._topic, partition)
            consumer.assign([tp])
            start = (await consumer.offsets_for_times({tp: max(0, since_ms - self._skew_ms)}))[tp]
            # None: nothing on the partition is that recent. Tansu answers that case with a
            # timestamp of -1 (and offset 0) instead.
            if start is None or start.timestamp < 0 or start.offset >= until:
                return []
            consumer.seek(tp, start.offset)
            key = request_id.encode()
            found: list[_Kept] = []
            while await consumer.position(tp) < until:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=2000)
                for record in batch.get(tp, []):
                    if record.offset >= until:
                        return found
                    if record.key == key and record.value:
                        found.append(_Kept(record.offset, record.value))
            return found
        finally:
            await consumer.stop()

    # -- knowing every chunk produced so far has been read ----------------------------------------

    async def caught_up(self, request_id: str) -> None:
        """Returns once the hub has read ``request_id``'s partition up to its end as the broker
        tells it now: every chunk produced before the call (and acknowledged) has been handed
        out. Concurrent calls share one question to the broker per partition."""
        partition = self.partition_of(request_id)
        if partition is None:
            return
        end = await asyncio.shield(self._end_offset(partition))
        if self._next[partition] >= end:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[partition].append((end, future))
        await asyncio.shield(future)

    def _release_barriers(self, partition: int) -> None:
        waiting = self._barriers.get(partition)
        if not waiting:
            return
        position = self._next[partition]
        still = []
        for end, future in waiting:
            if position >= end:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((end, future))
        self._barriers[partition] = still

    def _end_offset(self, partition: int) -> asyncio.Future[int]:
        """The partition's end offset, asked of the broker after this call."""
        pending = self._end_queries.get(partition)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            pending.add_done_callback(_retrieve)
            self._end_queries[partition] = pending
            asyncio.get_running_loop().create_task(self._ask_end(partition, pending))
        return pending

    async def _ask_end(self, partition: int, answer: asyncio.Future[int]) -> None:
        lock = self._end_locks.setdefault(partition, asyncio.Lock())
        async with lock:  # one question at a time; those who come meanwhile share the next
            if self._end_queries.get(partition) is answer:
                del self._end_queries[partition]
            assert self._consumer is not None
            tp = TopicPartition(self._topic, partition)
            try:
                ends = await self._consumer.end_offsets([tp])
            except (KafkaError, TimeoutError) as exc:
                answer.set_exception(exc)
            else:
                answer.set_result(ends[tp])


def _retrieve(future: asyncio.Future[int]) -> None:
    # A question nobody waits for any more must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
