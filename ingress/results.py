"""Where requests stand: the Redis record the worker keeps, and the responses as they come.

:class:`RequestLedger` works on the hash the worker's dedup keeps per request ID
(``{prefix}req:{id}``, see :mod:`processors.dedup`). The ingress creates it with ``state=queued``
before it publishes, atomically and only if absent, which is what makes a resubmitted ID answer
with its status instead of being published again. The worker's claim takes a ``queued`` hash like
a new one. The ingress adds ``client`` (who submitted it, when API keys are on), ``queued_at_ms``
and ``queued_by`` (the reservation, so only its maker releases it). An event the worker rejected
as invalid leaves ``{prefix}rejected:{id}`` instead (``error``, ``field``; see
:mod:`processors.dedup`), read by :meth:`RequestLedger.rejection` only when there is no record.

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

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.connections import kafka_client_options
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import DecodeError, decode
from llmstream.schemas.models import LLMError, LLMResponse

log = logging.getLogger(__name__)

Outcome = LLMResponse | LLMError
Status = Literal["pending", "completed", "failed"]

# KEYS: request hashes. ARGV: now_ms, ttl_s, client ('' for none), requeue_after_ms, token,
# then one digest of the request's content per key.
# Per key: {'new'} (recorded as queued: publish it), {'stale'} (queued long ago and never claimed:
# publish it again), or {'exists', state, client, payload, digest}.
_RESERVE = """
local out = {}
for i, key in ipairs(KEYS) do
  local digest = ARGV[5 + i]
  local h = redis.call('HMGET', key, 'state', 'client', 'queued_at_ms', 'response', 'error',
                       'digest')
  local state, client, known = h[1], h[2], h[6]
  local same = (ARGV[3] == '' or not client or client == ARGV[3])
               and (not known or known == digest)
  if not state then
    redis.call('HSET', key, 'state', 'queued', 'queued_at_ms', ARGV[1], 'queued_by', ARGV[5],
               'digest', digest)
    if ARGV[3] ~= '' then redis.call('HSET', key, 'client', ARGV[3]) end
    redis.call('EXPIRE', key, ARGV[2])
    out[i] = {'new'}
  elseif state == 'queued' and same
      and tonumber(h[3] or '0') + tonumber(ARGV[4]) <= tonumber(ARGV[1]) then
    redis.call('HSET', key, 'queued_at_ms', ARGV[1], 'queued_by', ARGV[5])
    out[i] = {'stale'}
  else
    local payload = (state == 'completed' and h[4]) or (state == 'failed' and h[5]) or ''
    out[i] = {'exists', state, client or '', payload, known or ''}
  end
end
return out
"""

# KEYS: request hashes; ARGV[1]: the reservation token. Drops reservations that were not
# published, unless a worker has the request already or another reservation replaced ours.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'state', 'queued_by')
  if h[1] == 'queued' and h[2] == ARGV[1] then redis.call('DEL', key) n = n + 1 end
end
return n
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """The record of one request ID."""

    state: str  # queued | claimed | completed | failed
    client: str | None  # who submitted it through the ingress, when API keys are on
    payload: bytes | None  # the LLMResponse (completed) or LLMError (failed) JSON
    digest: str | None = None  # of the request's content, when the ingress published it
    field: str | None = None  # the first invalid field of an event the worker rejected

    @property
    def status(self) -> Status:
        if self.state == "completed":
            return "completed"
        return "failed" if self.state == "failed" else "pending"

    def outcome(self) -> Outcome | None:
        """The decoded outcome, when there is one."""
        if not self.payload:
            return None
        if self.state == "completed":
            return decode(self.payload, LLMResponse)
        if self.state == "failed":
            return decode(self.payload, LLMError)
        return None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`RequestLedger.reserve` found for one request ID."""

    request_id: str
    publish: bool  # recorded as queued by this call: publish it (and release it on failure)
    existing: Stored | None = None


class RequestLedger:
    """The ingress's reads and writes on the per-request hashes."""

    def __init__(
        self, redis: aioredis.Redis, *, key_prefix: str, ttl_s: int, requeue_after_s: float
    ) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}req:"
        self._rejected_prefix = f"{key_prefix}rejected:"
        self._ttl = ttl_s
        self._requeue_ms = int(requeue_after_s * 1000)
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)

    def key(self, request_id: str) -> str:
        return self._prefix + request_id

    async def reserve(
        self, requests: Sequence[tuple[str, str]], client: str | None
    ) -> tuple[str, list[Reservation]]:
        """Record each ``(request ID, content digest)`` as queued unless the ID exists; returns
        the reservation token with what was found."""
        token = uuid.uuid4().hex
        now_ms = wall_clock_ms()
        replies = await self._reserve(
            keys=[self.key(request_id) for request_id, _ in requests],
            args=[
                now_ms,
                self._ttl,
                client or "",
                self._requeue_ms,
                token,
                *(digest for _, digest in requests),
            ],
        )
        reservations = []
        for (request_id, _), reply in zip(requests, replies, strict=True):
            kind = reply[0].decode()
            if kind in ("new", "stale"):
                reservations.append(Reservation(request_id, publish=True))
            else:
                state, owner, payload, digest = (part.decode() for part in reply[1:])
                stored = Stored(
                    state, owner or None, payload.encode() if payload else None, digest or None
                )
                reservations.append(Reservation(request_id, publish=False, existing=stored))
        return token, reservations

    async def release(self, token: str, request_ids: Sequence[str]) -> None:
        """Forget reservations whose publication failed, so a retry publishes them."""
        if request_ids:
            await self._release(keys=[self.key(r) for r in request_ids], args=[token])

    async def get(self, request_id: str) -> Stored | None:
        state, client, response, error = await self._redis.hmget(
            self.key(request_id), ["state", "client", "response", "error"]
        )
        if state is None:
            return None
        text = _text(state)
        payload = response if text == "completed" else error if text == "failed" else None
        return Stored(text, _text(client) if client else None, _bytes(payload))

    async def rejection(self, request_id: str) -> Stored | None:
        """Why the worker rejected an event with this ID (failed, no client), if it did."""
        error, field = await self._redis.hmget(
            self._rejected_prefix + request_id, ["error", "field"]
        )
        if error is None:
            return None
        return Stored("failed", None, _bytes(error), field=_text(field) if field else None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else value


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
        consumer = AIOKafkaConsumer(
            **kafka_client_options(self._settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=self._settings.listener_fetch_max_wait_ms,
        )
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
            found = consumer.partitions_for_topic(topic)
            if not found:
                await consumer._client.force_metadata_update()
                found = consumer.partitions_for_topic(topic)
            if not found:
                raise KafkaError(f"topic {topic!r} does not exist (create it first)")
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        return partitions

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

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
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
            except KafkaError as exc:
                log.warning("response listener: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                model = self._topics[tp.topic]
                for record in records:
                    self._deliver(record.key, record.value, model)

    def _deliver(
        self, key: bytes | None, value: bytes | None, model: type[LLMResponse] | type[LLMError]
    ) -> None:
        # The worker keys outcomes by request ID: most belong to nobody waiting here, and are
        # skipped without being decoded.
        if not key or not value:
            return
        try:
            request_id = key.decode()
        except UnicodeDecodeError:
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
