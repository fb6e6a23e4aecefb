"""Where requests stand: the Redis record the worker keeps, and the responses as they come.

:class:`RequestLedger` works on the request record (``{prefix}req:{<id>}``, see
:mod:`llmstream.core.record`), which the worker's dedup keeps too. The ingress creates it with
``state=queued`` before it publishes, atomically and only if absent, which is what makes a
resubmitted ID answer with its status instead of being published again. The worker's claim takes
a ``queued`` record like a new one. The ingress adds ``client`` (who submitted it, when API keys
are on), ``queued_at_ms`` and ``queued_by`` (the reservation, so only its maker releases it). An
event the worker rejected as invalid leaves ``{prefix}rejected:{<id>}`` instead (``error``,
``field``), read by :meth:`RequestLedger.rejection` only when there is no record.

:class:`ResponseListener` is one consumer per replica, in no consumer group, assigned every
partition of ``llm-responses`` and ``llm-errors`` from their ends: each replica sees every
outcome and resolves the waiters it holds. A waiter also reads Redis (the worker stores an outcome
before it emits it), so an outcome that landed before the waiter was there, or while the listener
was behind, is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import AnyRedis, Field, Outcome, RecordStore, Reservation, Status, Stored
from llmstream.ingress.settings import IngressSettings
from llmstream.ingress.tailing import (
    fetches,
    partitions_of,
    stop_reading,
    ungrouped_consumer,
)
from llmstream.schemas.codec import DecodeError, decode, key_as_id
from llmstream.schemas.models import LLMError, LLMResponse

__all__ = [
    "Outcome",
    "RequestLedger",
    "Reservation",
    "ResponseListener",
    "Status",
    "Stored",
    "Waiter",
    "owner",
]

log = logging.getLogger(__name__)


class RequestLedger:
    """The ingress's reads and writes on the request records (see :mod:`llmstream.core.record`)."""

    def __init__(
        self, redis: AnyRedis, *, key_prefix: str, ttl_s: int, requeue_after_s: float
    ) -> None:
        self.records = RecordStore(redis, key_prefix=key_prefix, ttl_s=ttl_s)
        self._requeue_ms = int(requeue_after_s * 1000)

    async def reserve(
        self, requests: Sequence[tuple[str, str]], client: str | None
    ) -> tuple[str, list[Reservation]]:
        """Record each ``(request ID, content digest)`` as queued unless the ID exists; returns
        the reservation token with what was found."""
        token = uuid.uuid4().hex
        reservations = await self.records.reserve(
            requests,
            client=client,
            token=token,
            now_ms=wall_clock_ms(),
            requeue_after_ms=self._requeue_ms,
        )
        return token, reservations

    async def release(self, token: str, request_ids: Sequence[str]) -> None:
        """Forget reservations whose publication failed, so a retry publishes them."""
        if request_ids:
            await self.records.release(token, request_ids)

    async def get(self, request_id: str) -> Stored | None:
        return await self.records.get(request_id)

    async def queued_at_ms(self, request_id: str) -> int | None:
        """When the ingress recorded the request as queued (its last publication), if it did."""
        # The record's own field, by the record module's names (RecordStore.get does not
        # return it).
        raw = await self.records.redis.hget(
            self.records.keys.record(request_id), Field.QUEUED_AT_MS
        )
        try:
            return int(raw) if raw else None
        except ValueError:
            return None

    async def rejection(self, request_id: str) -> Stored | None:
        """Why the worker rejected an event with this ID (failed, no client), if it did."""
        return await self.records.rejection(request_id)


def owner(stored: Stored) -> str | None:
    """The client a request positively belongs to: the one the ingress recorded, else the
    ``client_id`` of its stored outcome; None for a request that is nobody's (produced straight
    to Kafka without one, or its record lost and re-created without the ingress)."""
    if stored.client is not None:
        return stored.client
    outcome = stored.outcome()
    return outcome.client_id if outcome is not None else None


@dataclass(slots=True)
class Waiter:
    """One client waiting for one request's outcome; see :meth:`ResponseListener.waiter`."""

    request_id: str
    _future: asyncio.Future[Outcome]
    _ledger: RequestLedger
    _poll_s: float
    source: Literal["topic", "redis"] | None = field(default=None, init=False)  # where found

    async def result(self, timeout_s: float) -> Outcome | None:
        """The outcome, or None when ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Redis is the safety net under the listener: read at once (the outcome may be there
        # already), then now and then, more rarely as the wait grows.
        poll_s = self._poll_s
        while True:
            try:
                stored = await self._ledger.get(self.request_id)
            except RedisError as exc:
                log.warning("cannot read %s from Redis while waiting: %s", self.request_id, exc)
            else:
                outcome = stored.outcome() if stored else None
                if outcome is not None:
                    self.source = "redis"
                    return outcome
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                outcome = await asyncio.wait_for(
                    asyncio.shield(self._future), min(poll_s, remaining)
                )
            except TimeoutError:
                poll_s = max(self._poll_s, min(poll_s * 2, 5.0))
            else:
                self.source = "topic"
                return outcome


class ResponseListener:
    """Reads every outcome from ``llm-responses`` and ``llm-errors`` and wakes local waiters."""

    def __init__(self, settings: IngressSettings, ledger: RequestLedger) -> None:
        self._settings = settings
        self._ledger = ledger
        self._topics: dict[str, type[LLMResponse] | type[LLMError]] = {
            settings.responses_topic: LLMResponse,
            settings.errors_topic: LLMError,
        }
        self._waiters: dict[str, set[asyncio.Future[Outcome]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Request IDs with a client waiting here."""
        return len(self._waiters)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Assign every partition at its end; returns once the positions are known."""
        consumer = ungrouped_consumer(self._settings, "llmstream-ingress-responses")
        await consumer.start()
        try:
            partitions = await self._partitions(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="ingress-response-listener")

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        partitions = []
        for topic in self._topics:
            found = await partitions_of(consumer, topic)
            if not found:
                raise KafkaError(f"topic {topic!r} does not exist (create it first)")
            partitions += [TopicPartition(topic, p) for p in found]
        return partitions

    async def stop(self) -> None:
        await stop_reading(self._task, self._consumer)

    @contextlib.asynccontextmanager
    async def waiter(self, request_id: str) -> AsyncIterator[Waiter]:
        """Register interest in ``request_id`` now (before publishing), for the block's length."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, set()).add(future)
        try:
            yield Waiter(request_id, future, self._ledger, self._settings.result_poll_s)
        finally:
            futures = self._waiters.get(request_id)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._waiters[request_id]

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        async for batches in fetches(consumer, "response listener", max_records=1000):
            for tp, records in batches.items():
                model = self._topics[tp.topic]
                for record in records:
                    self._deliver(record.key, record.value, model)

    def _deliver(
        self, key: bytes | None, value: bytes | None, model: type[LLMResponse] | type[LLMError]
    ) -> None:
        # The worker keys outcomes by request ID: most belong to nobody waiting here, and are
        # skipped without being decoded.
        request_id = key_as_id(key)
        if request_id is None or not value:
            return
        futures = self._waiters.get(request_id)
        if not futures:
            return
        try:
            outcome = decode(value, model)
        except DecodeError as exc:
            log.warning("undecodable outcome for %s: %s", request_id, exc)
            return
        for future in futures:
            if not future.done():
                future.set_result(outcome)
