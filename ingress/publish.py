"""Publishing requests to ``llm-requests`` once per request ID: record, publish, and undo what
did not make it.

For each request ID: record it as queued in Redis unless it exists (then it is a duplicate and
nothing is published), publish the new ones with acks from all in-sync replicas, and release the
records of those the broker did not acknowledge, so a retry publishes them. A publication that
timed out may still land; the worker's dedup makes that harmless.

The message key is the request's ``session_id`` when it has one, else its request ID: a
session's requests share a partition, so the worker reads them in the order they were published
and answers them one at a time. The request ID stays the idempotency key either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from llmstream.ingress.errors import ApiError, unavailable
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.results import RequestLedger, Status, Stored, owner
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import WireFormat, encode, message_key
from llmstream.schemas.models import LLMRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """One encoded request, ready for the topic."""

    request_id: str
    value: bytes
    # The message key (schemas.codec.message_key): the session's ID in a session, else the ID.
    key: bytes
    # Of what was asked (not when, or the ID): the same ID with other content is a conflict.
    digest: str


@dataclass(frozen=True, slots=True)
class Receipt:
    """What became of one request of a submission."""

    request_id: str
    published: bool = False  # acknowledged by the broker in this submission
    failed: bool = False  # new, but the broker did not acknowledge it: not recorded
    conflict: str | None = None  # why the ID cannot be this request: "client" or "content"
    existing: Stored | None = None  # the record found, for a duplicate

    @property
    def status(self) -> Status:
        return self.existing.status if self.existing is not None else "pending"


class Publisher:
    """Publishes requests once per request ID."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        ledger: RequestLedger,
        settings: IngressSettings,
        metrics: IngressMetrics,
    ) -> None:
        self._producer = producer
        self._ledger = ledger
        self._settings = settings
        self._metrics = metrics

    def event(self, request: LLMRequest, field: str = "") -> Event:
        """``request`` encoded for the topic; 413 (naming ``field``) when it would not fit."""
        value = encode(request, self._settings.output_format)
        limit = self._settings.max_event_bytes
        if len(value) > limit:
            name = field or "body"
            raise ApiError(
                413,
                f"{name}: the request is {len(value)} bytes as an event; at most "
                f"{limit} bytes fit on the topic",
                param=name,
                code="event_too_large",
            )
        # What was asked, without when: a resubmission with a later created_at_ms is the same.
        content = encode(request.model_copy(update={"created_at_ms": None}), WireFormat.JSON)
        digest = hashlib.sha256(content).hexdigest()
        return Event(request.request_id, value, message_key(request), digest)

    async def submit(
        self, events: Sequence[Event], client: str | None, id_fields: Sequence[str]
    ) -> list[Receipt]:
        """Publish the events whose IDs are new; one receipt per event, in order.

        Raises ApiError: 409 (naming the ID's field in ``id_fields``) when an ID belongs to
        another client or to other content, and then nothing is published; 503 when Redis is
        unavailable. A publication the broker did not acknowledge is a receipt with ``failed``.
        """
        try:
            receipts = await self._record_and_publish(events, client)
        except RedisError:
            raise unavailable("Redis") from None
        for receipt, field in zip(receipts, id_fields, strict=True):
            if receipt.conflict == "client":
                raise ApiError(
                    409,
                    f"{field}: this request ID is used by another client",
                    param=field,
                    code="request_id_taken",
                )
            if receipt.conflict == "content":
                raise ApiError(
                    409,
                    f"{field}: this request ID was used for a different request; "
                    "use a new ID for new content",
                    param=field,
                    code="request_id_reused",
                )
        return receipts

    async def submit_chat(self, event: Event, client: str | None) -> Receipt:
        """One chat completion, its ID from the ``Idempotency-Key`` header: as :meth:`submit`,
        and 503 (retry) when the broker did not acknowledge it."""
        [receipt] = await self.submit([event], client, ["Idempotency-Key"])
        if receipt.failed:
            raise ApiError(
                503,
                "the request could not be published; retry",
                code="publish_failed",
                headers={"x-request-id": event.request_id, "Retry-After": "1"},
            )
        return receipt

    async def _record_and_publish(
        self, events: Sequence[Event], client: str | None
    ) -> list[Receipt]:
        """Nothing is published when any ID is in conflict (see ``Receipt.conflict``)."""
        token, reservations = await self._ledger.reserve(
            [(e.request_id, e.digest) for e in events], client
        )
        new = [e for e, r in zip(events, reservations, strict=True) if r.publish]
        conflicts = [
            _conflict(r.existing, e.digest, client)
            for e, r in zip(events, reservations, strict=True)
        ]
        if any(conflicts):
            await self._release(token, [e.request_id for e in new])
            return [
                Receipt(r.request_id, conflict=why, existing=r.existing)
                for r, why in zip(reservations, conflicts, strict=True)
            ]
        try:
            failed = await self._publish(new)
        except BaseException:
            # Cancelled mid-way (shutdown): what the broker did not confirm is released, so a
            # retry publishes it rather than being told it is pending forever.
            await asyncio.shield(self._release(token, [e.request_id for e in new]))
            raise
        if failed:
            await self._release(token, sorted(failed))
        self._metrics.duplicates.inc(len(events) - len(new))
        return [
            Receipt(
                r.request_id,
                published=r.publish and r.request_id not in failed,
                failed=r.request_id in failed,
                existing=r.existing,
            )
            for r in reservations
        ]

    async def _publish(self, events: Sequence[Event]) -> set[str]:
        """Publish and wait for the broker's acks; returns the IDs that were not acknowledged."""
        if not events:
            return set()
        started = time.perf_counter()
        topic = self._settings.requests_topic

        async def send_all() -> list[object]:
            pending = [await self._producer.send(topic, e.value, key=e.key) for e in events]
            return list(await asyncio.gather(*pending, return_exceptions=True))

        try:
            results = await asyncio.wait_for(send_all(), self._settings.publish_timeout_s)
        except (KafkaError, TimeoutError) as exc:
            log.warning("cannot publish %d requests: %r", len(events), exc)
            self._metrics.publish_failures.inc(len(events))
            return {e.request_id for e in events}
        failed = {
            e.request_id
            for e, result in zip(events, results, strict=True)
            if isinstance(result, BaseException)
        }
        if failed:
            log.warning(
                "the broker did not acknowledge %d of %d requests", len(failed), len(events)
            )
            self._metrics.publish_failures.inc(len(failed))
        self._metrics.published.inc(len(events) - len(failed))
        self._metrics.publish_time.observe(time.perf_counter() - started)
        return failed

    async def _release(self, token: str, request_ids: Sequence[str]) -> None:
        # Best effort: a record left behind is published again when resubmitted after
        # `requeue_after_s`, so a Redis outage here costs a delay, not the request.
        with contextlib.suppress(RedisError):
            await self._ledger.release(token, request_ids)


def _conflict(existing: Stored | None, digest: str, client: str | None) -> str | None:
    if existing is None:
        return None
    # With keys on, an ID that is not positively this client's is taken, whatever its state:
    # one that belongs to nobody (produced straight to Kafka, submitted while authentication
    # was off) is not anybody's to read either.
    if client is not None and owner(existing) != client:
        return "client"
    if existing.digest is not None and existing.digest != digest:
        return "content"
    return None
