"""Polls the batches this worker holds, and stores and emits their lines' outcomes.

Every ``LLMSTREAM_BATCH_POLL_INTERVAL_S`` each worker reads the unfinished submissions: it polls
those it holds, and takes over (a lease, as a claim's) those whose holder's heartbeat is gone.
Once the provider says a batch ended, its results are read and each line settled by what its
request's record says:

- still in this submission: the answer is stored (fenced by the submission: one store wins)
  at the batch price, then emitted and marked emitted, as the pipeline does; a line that
  failed for good is an ``llm-errors`` event. A line that failed retryably (a 5xx, a 429), expired
  or was cancelled is taken out of the batch and sent in a later one, or called at once (the
  pipeline's synchronous path, through traffic control) when its deadline leaves no room for
  another batch, or fails once its calls reach ``LLMSTREAM_MAX_ATTEMPTS``;
- its outcome stored by this submission but not emitted (the last holder died between the two):
  emitted now;
- held by a worker that died taking it out of the batch: taken over and sent on;
- anything else (answered, in another batch, held by a live worker for now): left alone.

The submission is forgotten once no line is left to settle; until then a takeover starts over
from the provider's results, which each line's record makes harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable

from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record import BatchState, LineRecord, State, Submission, WorkerOp
from llmstream.processors.batches.api import BatchAPI, LineResult
from llmstream.processors.batches.tier import BatchTier
from llmstream.processors.dedup import ClaimStatus, ClaimUnavailable
from llmstream.processors.outcomes import Source
from llmstream.processors.providers import ProviderError
from llmstream.schemas.codec import WireFormat, decode, encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse

__all__ = ["Poller"]

log = logging.getLogger(__name__)

_IN_BATCH = (State.SUBMITTING, State.BATCHED)
_SETTLED = (State.COMPLETED, State.FAILED)
_LINES_AT_ONCE = 256  # lines emitted or sent on concurrently


class Poller:
    """The batches one worker polls."""

    def __init__(self, tier: BatchTier) -> None:
        self._tier = tier
        self._tending: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, tuple[str, str]] = {}  # submission -> (provider, state)
        self._shown: set[tuple[str, str]] = set()
        self._slots = asyncio.Semaphore(_LINES_AT_ONCE)

    async def run(self) -> None:
        interval = self._tier.settings.batch_poll_interval_s
        while True:
            await asyncio.sleep(interval)
            if self._tier.dedup.draining:
                continue
            try:
                await self.poll()
            except (ClaimUnavailable, RedisError, RedisClusterException, OSError) as exc:
                log.warning("batches not polled this round: %s", exc)

    async def close(self) -> None:
        for task in self._tending.values():
            task.cancel()
        await asyncio.gather(*self._tending.values(), return_exceptions=True)

    async def poll(self) -> None:
        """One round: tend every unfinished submission this worker holds or takes over."""
        tier, token = self._tier, self._tier.dedup.worker_token
        unfinished = await tier.store.unfinished()
        for gone in set(self._states) - set(unfinished):
            del self._states[gone]
        for submission_id in unfinished:
            if submission_id in self._tending:
                continue
            found = await tier.store.get(submission_id, requests=False)
            if found is None:
                await tier.store.forget(submission_id)
                continue
            if found.state == BatchState.INTENT:
                # Adopted or abandoned (tended next round) if its submitter is not sending it.
                await tier.settle_intent(found)
                continue
            if found.state == BatchState.ABANDONED:
                self._tending[submission_id] = asyncio.create_task(self._release(submission_id))
                continue
            if found.owner != token:
                if await tier.dedup.records.alive(found.owner or ""):
                    continue
                leased = await tier.store.lease(
                    submission_id, token, found.owner or "", found.epoch
                )
                if leased.answer != "leased":
                    continue
                log.info("took over polling batch %s from %s", found.batch, found.owner)
            self._tending[submission_id] = asyncio.create_task(self._tend(submission_id))
        self._gauge()

    def _gauge(self) -> None:
        counts = Counter(self._states.values())
        for labels in self._shown | set(counts):  # a state no batch is in any more shows 0
            self._tier.metrics.in_flight.labels(*labels).set(counts.get(labels, 0))
        self._shown |= set(counts)

    async def _tend(self, submission_id: str) -> None:
        try:
            found = await self._tier.store.get(submission_id)
            if found is not None and found.owner == self._tier.dedup.worker_token:
                await self._tend_one(found)
        except (ClaimUnavailable, RedisError, RedisClusterException) as exc:
            log.warning("batch submission %s not read this round: %s", submission_id, exc)
        finally:
            self._tending.pop(submission_id, None)

    async def _release(self, submission_id: str) -> None:
        """An abandoned submission: its requests still in it are taken out and sent on."""
        tier = self._tier
        try:
            found = await tier.store.get(submission_id)
            if found is None:
                await tier.store.forget(submission_id)
                return
            records = await tier.store.lines([rid for rid, _ in found.requests])
            left = [r for r in records if r.state in _IN_BATCH and r.submission == found.id]
            now = wall_clock_ms()
            ops = [WorkerOp("x", r.request_id, (found.id, now, "", "")) for r in left]
            answers = await tier.run_ops(ops, "take requests out of a batch")
            jobs = []
            for record, (epoch, _) in zip(left, answers, strict=True):
                if epoch != "0":
                    tier.dedup.hold(record.request_id, epoch)
                    request = decode(record.request or b"", LLMRequest)
                    jobs.append(self._send_on(found.provider, request, _source(record.source)))
            await asyncio.gather(*(self._bounded(job) for job in jobs))
            await tier.store.forget(submission_id)
        except (ClaimUnavailable, RedisError, RedisClusterException) as exc:
            log.warning("abandoned submission %s not released yet: %s", submission_id, exc)
        finally:
            self._tending.pop(submission_id, None)

    async def _tend_one(self, submission: Submission) -> None:
        api = self._tier.apis.get(submission.provider)
        if api is None or submission.batch is None:
            log.error("batch %s of %s: no batch API configured here", submission.batch, api)
            return
        try:
            status = await api.status(submission.batch)
            self._states[submission.id] = (api.name, status.status)
            if not status.ended:
                return
            custom_ids = [custom for _, custom in submission.requests]
            results = await api.results(submission.batch, status, submission.model, custom_ids)
            left = await self._settle(submission, api, results)
        except ProviderError as exc:
            log.warning("batch %s not read this round: %s", submission.batch, exc)
            return
        except (ClaimUnavailable, RedisError, RedisClusterException) as exc:
            log.warning("batch %s not settled this round: %s", submission.batch, exc)
            return
        except Exception:
            log.exception("batch %s not settled this round", submission.batch)
            return
        if left:
            log.info("batch %s: %d lines wait for their holders", submission.batch, left)
            return
        token = self._tier.dedup.worker_token
        if await self._tier.store.finish(submission.id, token, submission.epoch):
            self._states.pop(submission.id, None)
            if submission.submitted_at_ms is not None:
                took = (wall_clock_ms() - submission.submitted_at_ms) / 1000
                self._tier.metrics.turnaround.labels(api.name).observe(max(0.0, took))
            log.info("batch %s settled", submission.batch)

    async def _settle(
        self, submission: Submission, api: BatchAPI, results: dict[str, LineResult]
    ) -> int:
        """Settle every line; how many are left for a later round."""
        tier = self._tier
        custom = dict(submission.requests)
        records = await tier.store.lines([rid for rid, _ in submission.requests])
        ours = [r for r in records if r.state in _IN_BATCH and r.submission == submission.id]
        settled = await self._store(submission, api, ours, results, custom)
        left = 0
        jobs: list[Awaitable[bool]] = []
        for record in records:
            if record.request_id in settled:
                continue
            if record.state in _SETTLED and record.submission == submission.id:
                if not record.emitted:
                    jobs.append(self._recover(record))
            elif record.state in (State.CLAIMED, State.SUBMITTING) and record.request:
                if record.owner == tier.dedup.worker_token and record.state == State.CLAIMED:
                    left += 1  # this worker sends it on right now (below, or another task)
                else:
                    jobs.append(self._take_over(api.name, record))
        jobs.extend(settled.values())
        done = await asyncio.gather(*(self._bounded(job) for job in jobs))
        return left + done.count(False)

    async def _bounded(self, job: Awaitable[bool]) -> bool:
        async with self._slots:
            return await job

    async def _store(
        self,
        submission: Submission,
        api: BatchAPI,
        ours: list[LineRecord],
        results: dict[str, LineResult],
        custom: dict[str, str],
    ) -> dict[str, Awaitable[bool]]:
        """Store the outcome of every line still in this submission (one script run), or take
        it out to be sent again; per request ID, the work left (emit, or send on)."""
        tier = self._tier
        events, max_attempts = tier.bound.events, tier.settings.max_attempts
        stores: list[tuple[LineRecord, LLMRequest, LLMResponse | LLMError]] = []
        again: list[tuple[LineRecord, LLMRequest]] = []
        for record in ours:
            request = decode(record.request or b"", LLMRequest)
            result = results.get(custom[record.request_id]) or LineResult(unanswered="missing")
            source = _source(record.source)
            if result.completion is not None:
                response = self._response(submission, request, result, record.calls)
                stores.append((record, request, response))
                continue
            error = result.error
            if error is not None and not error.retryable:
                outcome = events.provider_error(request, error, source, record.calls)
                if result.raw is not None:
                    outcome = outcome.model_copy(update={"raw_payload": result.raw})
                stores.append((record, request, outcome))
            elif record.calls >= max_attempts:
                reason = error or ProviderError(
                    f"{api.name}: batch line {result.unanswered}, in each of {record.calls} "
                    "batches (LLMSTREAM_MAX_ATTEMPTS)",
                    provider=api.name,
                    error_type="provider_error",
                    retryable=True,
                )
                outcome = events.provider_error(request, reason, source, record.calls)
                stores.append((record, request, outcome))
            else:
                again.append((record, request))
        now = wall_clock_ms()
        ops = [
            WorkerOp(
                "r",
                record.request_id,
                (
                    "f" if isinstance(stored, LLMError) else "c",
                    encode(stored, WireFormat.JSON),
                    now,
                    submission.id,
                ),
            )
            for record, _, stored in stores
        ]
        ops += [WorkerOp("x", r.request_id, (submission.id, now, "", "")) for r, _ in again]
        answers = await tier.run_ops(ops, "store batch outcomes")
        work: dict[str, Awaitable[bool]] = {}
        for (record, request, stored), (answer, _) in zip(stores, answers, strict=False):
            if answer != "0":
                work[record.request_id] = self._emit(api, request, stored)
        for (record, request), (answer, _) in zip(again, answers[len(stores) :], strict=True):
            if answer != "0":
                tier.dedup.hold(record.request_id, answer)
                work[record.request_id] = self._send_on(api.name, request, _source(record.source))
        return work

    def _response(
        self, submission: Submission, request: LLMRequest, result: LineResult, calls: int
    ) -> LLMResponse:
        completion = result.completion
        assert completion is not None
        tier = self._tier
        cost = tier.traffic.costs.cost(request, completion, "batch")
        took = wall_clock_ms() - (submission.submitted_at_ms or submission.created_at_ms)
        return tier.bound.events.response(
            request,
            completion,
            attempts=calls,
            latency_ms=max(0, took),
            queue_ms=None,
            cost_usd=cost,
            cached=False,
            service_tier="batch",
        )

    async def _emit(
        self, api: BatchAPI, request: LLMRequest, outcome: LLMResponse | LLMError
    ) -> bool:
        tier = self._tier
        events = tier.bound.events
        if isinstance(outcome, LLMResponse):
            metric = events.success_metric(outcome)
            tier.metrics.lines.labels(api.name, "answered").inc()
            label = tier.worker_metrics.model_label(outcome.model)
            tokens = tier.worker_metrics.tokens
            tokens.labels(outcome.provider or api.name, label, "prompt").inc(outcome.prompt_tokens)
            tokens.labels(outcome.provider or api.name, label, "completion").inc(
                outcome.completion_tokens
            )
        else:
            metric = events.error_metric(outcome, status="error")
            tier.metrics.lines.labels(api.name, "failed").inc()
        await tier.bound.emit(request.request_id, outcome, metric)
        return True

    async def _send_on(self, provider: str, request: LLMRequest, source: Source) -> bool:
        """A line to send again, which this worker now holds: a later batch, or at once."""
        tier = self._tier
        if await tier.route(request, source, again=True):
            tier.dedup.forget(request.request_id)
            tier.metrics.lines.labels(provider, "resubmitted").inc()
        else:
            tier.metrics.lines.labels(provider, "standard").inc()
            await tier.bound.serve(request, source)
        return True

    async def _recover(self, record: LineRecord) -> bool:
        """An outcome this submission stored whose holder died before emitting it."""
        tier = self._tier
        claim = await tier.bound.persist(
            lambda: tier.dedup.claim(record.request_id, wall_clock_ms()), "claim a batch line"
        )
        if claim.status is ClaimStatus.BUSY:
            return False
        if claim.status is ClaimStatus.RECOVER and claim.payload is not None:
            events = tier.bound.events
            outcome: LLMResponse | LLMError
            if claim.state == State.COMPLETED:
                outcome = decode(claim.payload, LLMResponse)
                metric = events.success_metric(outcome)
            else:
                outcome = decode(claim.payload, LLMError)
                metric = events.error_metric(outcome, status="error")
            tier.worker_metrics.dedup.labels("recovered").inc()
            await tier.bound.emit(record.request_id, outcome, metric)
        return True

    async def _take_over(self, provider: str, record: LineRecord) -> bool:
        """A request taken out of this batch (or into another) by a worker that may have died
        since: once its holder is dead, this worker sends it on."""
        tier = self._tier
        claim = await tier.bound.persist(
            lambda: tier.dedup.claim(record.request_id, wall_clock_ms()), "claim a batch line"
        )
        request = decode(record.request or b"", LLMRequest)
        source = _source(record.source)
        if claim.status is ClaimStatus.BUSY:
            return False
        if claim.status is ClaimStatus.RESOLVE:
            assert claim.submission is not None
            if await tier.resolve(record.request_id, claim.submission):
                return True
        elif claim.status is not ClaimStatus.CLAIMED:
            return True  # answered, or in a batch: nothing left here
        return await self._send_on(provider, request, source)


def _source(text: str | None) -> Source:
    """Where the request's event was, as the record keeps it ("topic:partition:offset")."""
    topic, _, rest = (text or "").rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if partition.isdigit() and rest.lstrip("-").isdigit():
        return Source(topic, int(partition), int(rest))
    return Source(text or "", -1, -1)
