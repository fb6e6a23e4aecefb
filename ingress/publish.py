"""Admission of requests to ``llm-requests``: record, publish, and undo what did not make it.

For each request ID: record it as queued in Redis unless it exists (then it is a duplicate and
nothing is published), publish the new ones with acks from all in-sync replicas, keyed by request
ID, and release the records of those the broker did not acknowledge, so a retry publishes them.
A publication that timed out may still land; the worker's dedup makes that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.results import RequestLedger, Status, Stored

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """One encoded request, ready for the topic."""

    request_id: str
    value: bytes
    # Of what was asked (not when, or the ID): the same ID with other content is a conflict.
    digest: str


@dataclass(frozen=True, slots=True)
class Admission:
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
        *,
        topic: str,
        timeout_s: float,
        metrics: IngressMetrics,
    ) -> None:
        self._producer = producer
        self._ledger = ledger
        self._topic = topic
        self._timeout_s = timeout_s
        self._metrics = metrics

    async def submit(self, events: Sequence[Event], client: str | None) -> list[Admission]:
        """Admit ``events``; raises RedisError when the records cannot be made.

        Nothing is published when any ID belongs to another client (see ``conflict``).
        """
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
                Admission(r.request_id, conflict=why, existing=r.existing)
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
            Admission(
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

        async def send_all() -> list[object]:
            pending = [
                await self._producer.send(self._topic, e.value, key=e.request_id.encode())
                for e in events
            ]
            return list(await asyncio.gather(*pending, return_exceptions=True))

        try:
            results = await asyncio.wait_for(send_all(), self._timeout_s)
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
    if client is not None and existing.client is not None and existing.client != client:
        return "client"
    if existing.digest is not None and existing.digest != digest:
        return "content"
    return None
