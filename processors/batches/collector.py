"""Gathers batch requests per provider and model, and submits each batch durably.

A batch goes out when it holds ``LLMSTREAM_BATCH_MAX_REQUESTS`` requests (capped at the
provider's own limit, and by the provider's byte limit), when its first request has waited
``LLMSTREAM_BATCH_MAX_WAIT_S``, or at once when the worker drains. Its submission follows the five
steps of :mod:`llmstream.core.record.batches`; a request's :meth:`Collector.add` returns only
after step 5 (its record says ``batched``), so its event's offset is committed only then.

A submission the provider refuses or cannot take (a 4xx, a 5xx, an outage) is sent again with
backoff, for as long as it takes: its requests' events stay uncommitted meanwhile, so nothing is
lost. Before sending again after a failure, a provider that can be asked (OpenAI) is asked
whether the failed attempt created the batch after all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import SubmissionStore, WorkerOp
from llmstream.processors.batches.api import BatchAPI, BatchLine
from llmstream.processors.dedup import ClaimUnavailable, DedupStore
from llmstream.processors.metrics import BatchMetrics
from llmstream.processors.outcomes import Source
from llmstream.processors.providers import ProviderError
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import LLMRequest

__all__ = ["REDIS_ERRORS", "Collector", "Persist", "guarded", "source_text"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Persist(Protocol):
    """Retries an operation on Redis or Kafka until it succeeds (the pipeline's ``_until_ok``)."""

    async def __call__(self, operation: Callable[[], Awaitable[T]], what: str) -> T: ...


REDIS_ERRORS = (RedisError, RedisClusterException)


async def guarded(operation: Awaitable[T], what: str) -> T:
    """``operation``, with a Redis failure as :class:`ClaimUnavailable` (which ``Persist``
    waits out)."""
    try:
        return await operation
    except REDIS_ERRORS as exc:
        raise ClaimUnavailable(f"cannot {what}: {exc}") from exc


def source_text(source: Source) -> str:
    return f"{source.topic}:{source.partition}:{source.offset}"


@dataclass(eq=False, slots=True)
class _Entry:
    request: LLMRequest
    source: Source
    line: BatchLine
    # True once a batch holds the request; False when another worker has it (taken over).
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True)
class _Gathering:
    api: BatchAPI
    model: str
    entries: list[_Entry] = field(default_factory=list)
    bytes: int = 0
    opened: float = 0.0  # event-loop time of the first entry


class Collector:
    """The batches being gathered in one worker, and the submissions under way."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        dedup: DedupStore,
        store: SubmissionStore,
        metrics: BatchMetrics,
        persist: Persist,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._dedup = dedup
        self._store = store
        self._metrics = metrics
        self._persist = persist
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._gathering: dict[tuple[str, str], _Gathering] = {}
        self._submitting: set[asyncio.Task[None]] = set()
        self.sending: set[str] = set()  # the submissions this worker is sending now

    async def add(
        self, request: LLMRequest, source: Source, api: BatchAPI, model: str, line: BatchLine
    ) -> bool:
        """Put a request this worker holds into the next batch for its provider and model;
        True once a batch holds it, False when another worker took it over meanwhile."""
        key = (api.name, model)
        batch = self._gathering.get(key)
        if batch is not None and batch.bytes + line.size > api.max_bytes - api.overhead:
            self._submit(key)
            batch = None
        if batch is None:
            batch = self._gathering[key] = _Gathering(api, model)
            batch.opened = asyncio.get_running_loop().time()
        entry = _Entry(request, source, line)
        batch.entries.append(entry)
        batch.bytes += line.size
        self._metrics.waiting.labels(api.name).inc()
        if len(batch.entries) >= min(self._settings.batch_max_requests, api.max_requests):
            self._submit(key)
        try:
            return await entry.done
        except asyncio.CancelledError:
            # Not yet submitted: out of the batch (the request's claim is given back).
            if entry in batch.entries:
                batch.entries.remove(entry)
                batch.bytes -= line.size
                self._metrics.waiting.labels(api.name).dec()
            raise

    async def run(self) -> None:
        """Send each batch whose first request waited ``batch_max_wait_s`` (every batch, once
        the worker drains). Runs until cancelled."""
        loop = asyncio.get_running_loop()
        tick = min(0.25, self._settings.batch_max_wait_s / 10)
        while True:
            await asyncio.sleep(tick)
            due = loop.time() - self._settings.batch_max_wait_s
            for key, batch in list(self._gathering.items()):
                if batch.entries and (batch.opened <= due or self._dedup.draining):
                    self._submit(key)

    async def close(self, grace_s: float) -> None:
        """Let submissions under way finish (up to ``grace_s``), then cancel what is left."""
        if self._submitting:
            await asyncio.wait(set(self._submitting), timeout=grace_s)
        for task in list(self._submitting):
            task.cancel()
        await asyncio.gather(*self._submitting, return_exceptions=True)

    def _submit(self, key: tuple[str, str]) -> None:
        batch = self._gathering.pop(key)
        if not batch.entries:
            return
        self._metrics.waiting.labels(batch.api.name).dec(len(batch.entries))
        task = asyncio.create_task(self._submission(batch.api, batch.model, batch.entries))
        self._submitting.add(task)
        task.add_done_callback(self._submitting.discard)

    async def _submission(self, api: BatchAPI, model: str, entries: list[_Entry]) -> None:
        in_flight = self._metrics.in_flight.labels(api.name, "submitting")
        in_flight.inc()
        try:
            await self._steps(api, model, entries)
        except asyncio.CancelledError:
            for entry in entries:
                if not entry.done.done():
                    entry.done.cancel()  # shutdown: the request stays unacked and comes again
            raise
        except Exception as exc:  # a bug: each request's task settles it as the pipeline does
            log.exception("batch submission for %s/%s failed", api.name, model)
            for entry in entries:
                if not entry.done.done():
                    entry.done.set_exception(exc)
        finally:
            in_flight.dec()

    async def _steps(self, api: BatchAPI, model: str, entries: list[_Entry]) -> None:
        submission = uuid.uuid4().hex
        self.sending.add(submission)
        try:
            await self._send(api, model, entries, submission)
        finally:
            self.sending.discard(submission)

    async def _send(
        self, api: BatchAPI, model: str, entries: list[_Entry], submission: str
    ) -> None:
        token = self._dedup.worker_token
        records = self._dedup.records
        # 1. The records say which submission each request is in, before anything is sent.
        ops = [
            WorkerOp(
                "b",
                e.request.request_id,
                (
                    submission,
                    encode(e.request, WireFormat.JSON),
                    source_text(e.source),
                    self._dedup.epoch(e.request.request_id),
                ),
            )
            for e in entries
        ]
        answers = await self._persist(
            lambda: guarded(records.run(token, ops), "mark requests for a batch"),
            "mark requests for a batch",
        )
        kept = []
        for entry, (answer, _) in zip(entries, answers, strict=True):
            if answer == "0":
                entry.done.set_result(False)  # taken over meanwhile: not ours to send
            else:
                kept.append(entry)
        if not kept:
            return
        # 2. The submission is recorded before it is sent.
        pairs = [(e.request.request_id, e.line.custom_id) for e in kept]
        intent = await self._persist(
            lambda: guarded(
                self._store.intent(
                    submission,
                    token,
                    provider=api.name,
                    model=model,
                    requests=pairs,
                    now_ms=wall_clock_ms(),
                ),
                "record a batch submission",
            ),
            "record a batch submission",
        )
        if intent.answer != "intent":  # abandoned by a taker of its requests: never to be sent
            _settle(kept, False)
            return
        # 3. Sent, as many times as it takes.
        batch = await self._create(api, model, submission, [e.line for e in kept])
        # 4. Accepted: the submission says so, unless a taker abandoned it meanwhile.
        created = await self._persist(
            lambda: guarded(
                self._store.created(submission, token, intent.epoch, batch, wall_clock_ms()),
                "record a batch",
            ),
            "record a batch",
        )
        if created.answer != "created":
            log.warning("batch %s of abandoned submission %s: cancelling it", batch, submission)
            self._metrics.submissions.labels(api.name, "cancelled").inc()
            with contextlib.suppress(ProviderError):
                await api.cancel(batch)
            _settle(kept, False)
            return
        self._metrics.submissions.labels(api.name, "created").inc()
        # 5. The records say batched: the events' offsets may be committed.
        marks = [WorkerOp("B", e.request.request_id, (submission, batch, "", "")) for e in kept]
        await self._persist(
            lambda: guarded(records.run(token, marks), "mark requests batched"),
            "mark requests batched",
        )
        log.info("%s batch %s: %d requests for %s", api.name, batch, len(kept), model)
        # A "0" means a taker marked it first, or the poller already stored its line: either
        # way a batch holds it.
        _settle(kept, True)

    async def _create(
        self, api: BatchAPI, model: str, submission: str, lines: Sequence[BatchLine]
    ) -> str:
        since_ms = wall_clock_ms()
        delay = self._settings.retry_base_delay_s
        failed = False
        while True:
            try:
                if failed and api.can_find:
                    found = await api.find(submission, since_ms)
                    if found is not None:
                        return found
                return await api.create(lines, model, submission)
            except ProviderError as exc:
                log.warning(
                    "batch of %d requests for %s/%s not submitted (%s); again in %.1f s",
                    len(lines),
                    api.name,
                    model,
                    exc,
                    delay,
                )
            self._metrics.submissions.labels(api.name, "retried").inc()
            failed = True
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, self._settings.retry_max_delay_s)


def _settle(entries: Sequence[_Entry], batched: bool) -> None:
    for entry in entries:
        if not entry.done.done():
            entry.done.set_result(batched)
