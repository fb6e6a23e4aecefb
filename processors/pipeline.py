"""What happens to one event of ``llm-requests``, from raw bytes to the outcomes on the broker.

decode → its place in its session's queue (:mod:`processors.session_turns`) → claim (dedup) →
deadline → the session's history in front → the tool loop (:mod:`processors.tool_loop`), whose
every model call goes through traffic control (cache, limits, circuits, fallbacks and the retry
loop: :mod:`processors.traffic`) → the turn appended to the session → store → emit → mark
emitted. A request that streams has its chunks produced during the calls
(:mod:`processors.streaming`), all acknowledged before the outcome is stored.

:meth:`RequestProcessor.process` returns only once the event's outcomes are acknowledged by the
broker (or the event is a duplicate whose outcome already was), and never raises for bad input,
provider failures, or Redis/Kafka outages: those are classified and routed to ``llm-errors``, or
waited out (fail closed). The caller acks the event's offset when it returns: for a request of
the batch tier (:mod:`processors.batches`), as soon as a batch holds it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.loops import BoundLoop
from llmstream.core.record import State
from llmstream.core.sessions import SessionError, SessionStore, SessionTurnTooLarge
from llmstream.core.tools import ToolExecutor, UnknownTool
from llmstream.processors.batches import BatchTier
from llmstream.processors.dedup import Claim, ClaimStatus, ClaimUnavailable, DedupStore, NotOwner
from llmstream.processors.metrics import WorkerMetrics, bookkeeping, provider_label
from llmstream.processors.outcomes import Outcomes, Output, Source, carried_payload
from llmstream.processors.providers import Completion, ProviderError, ProviderRouter
from llmstream.processors.session_turns import SessionTurns
from llmstream.processors.settings import WorkerSettings
from llmstream.processors.streaming import AnswerStream, ChunkSender
from llmstream.processors.tool_loop import LoopProgress, StepJournal, ToolLoop, ToolStepsExhausted
from llmstream.processors.traffic import TrafficControl, TrafficProgress
from llmstream.schemas.codec import (
    DecodeError,
    WireFormat,
    decode,
    decode_request,
    encode,
    peek_request_id,
)
from llmstream.schemas.models import (
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    MetricStatus,
    ToolStep,
)

__all__ = ["Emitter", "Output", "RequestProcessor", "Source"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Emitter(ChunkSender, Protocol):
    """Sends outputs and returns once the broker acknowledged every one of them; ``send`` (for
    chunks) hands one over without waiting."""

    async def emit(self, outputs: Sequence[Output]) -> None: ...


class RequestProcessor:
    """Turns one request event into its outcomes. One instance serves every in-flight request."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        dedup: DedupStore,
        router: ProviderRouter,
        emitter: Emitter,
        metrics: WorkerMetrics,
        traffic: TrafficControl,
        tools: ToolExecutor | None = None,
        sessions: SessionStore | None = None,
        batches: BatchTier | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._dedup = dedup
        self._router = router
        self._emitter = emitter
        self._metrics = metrics
        # Every provider call goes through it: cache, limits, circuits, fallbacks, retries, cost.
        self._traffic = traffic
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._events = Outcomes(settings)  # what each outcome looks like on the broker
        # Request IDs in flight in this process: a second copy waits on the first locally.
        self._local: dict[str, asyncio.Future[None]] = {}
        self._running = BoundLoop()
        redis, prefix = dedup.records.redis, settings.redis_key_prefix
        journal = StepJournal(
            redis, key_prefix=prefix, worker_token=dedup.worker_token, ttl_s=settings.result_ttl_s
        )
        self._loop = ToolLoop(
            traffic=traffic,
            journal=journal,
            metrics=metrics,
            persist=self._until_ok,
            max_steps=settings.max_tool_steps,
            tools=tools,
        )
        self._turns = SessionTurns(
            sessions or SessionStore(redis, key_prefix=prefix, params=settings),
            records=dedup.records,
            metrics=metrics,
            persist=self._until_ok,
        )
        self._batches = batches  # requests of the batch tier go there after their claim
        if batches is not None:
            batches.bind(self._until_ok, self._emit_and_mark, self.process_held, self._events)

    async def process(self, raw: bytes | None, key: bytes | None, source: Source) -> None:
        """Handle one event; returns when its outcomes are on the broker."""
        picked_up_ms = wall_clock_ms()
        started = time.perf_counter()
        try:
            request = decode_request(raw or b"")
        except DecodeError as exc:
            await self._reject(exc, raw, key, source, picked_up_ms)
            return
        turn = self._turns.enter(request)  # before any wait: the session's queue in offset order
        try:
            if turn is not None:
                await self._turns.wait(turn)
            await self._process(request, source, picked_up_ms, started)
        finally:
            if turn is not None:
                self._turns.leave(turn)

    async def process_held(self, request: LLMRequest, source: Source) -> None:
        """As :meth:`process`, for a request whose claim this worker holds (the batch tier's)."""
        await self._process(request, source, wall_clock_ms(), time.perf_counter(), held=True)

    async def _process(
        self, request: LLMRequest, source: Source, picked_up: int, at: float, held: bool = False
    ) -> None:
        waiting = self._local.get(request.request_id)
        while waiting is not None and not held:  # a held claim waits for no copy: they wait
            # The same ID is already in flight here: let it finish, then decide (duplicate).
            await asyncio.shield(waiting)
            waiting = self._local.get(request.request_id)
        done: asyncio.Future[None] = self._running.get().create_future()
        mine = self._local.setdefault(request.request_id, done) is done
        try:
            await self._handle(request, source, picked_up, at, held)
        except Exception as exc:
            # A bug of ours, not bad input: settle it rather than stall the partition or lose it.
            log.exception("unexpected failure processing %s", request.request_id)
            await self._after_bug(request, exc, source)
        finally:
            self._dedup.call_over()
            try:
                if not self._dedup.draining:  # a drain resigns the whole lease once tasks stop
                    await self._give_back(request.request_id)
            finally:
                if mine:
                    del self._local[request.request_id]
                done.set_result(None)

    async def _give_back(self, request_id: str) -> None:
        """A task that ends with its claim unsettled (a bug escaping the catch-all, or cancelled
        outside a drain) gives the claim back: nobody waits for this worker's lease to end."""
        try:
            if await self._dedup.release(request_id):
                log.warning("%s ended unsettled; its claim was given back", request_id)
        except ClaimUnavailable as exc:
            log.warning("claim on %s frees when this worker's lease ends: %s", request_id, exc)

    async def _after_bug(self, request: LLMRequest, exc: Exception, source: Source) -> None:
        """Settle a request whose handling raised, by what its record holds.

        An outcome stored already stands: a provider's answer (paid for) is never replaced by
        ``internal_error``, and a replay of such an error would pay again. It is emitted if it
        was not yet, as a recovery would. Only when nothing is stored is the request failed as
        ``internal_error``, carrying the full request on ``llm-errors`` so it can be replayed.
        """
        stored = await self._until_ok(
            lambda: self._dedup.outcome(request.request_id), "read the request's record"
        )
        if stored is not None:  # completed or failed
            if stored.emitted:
                return
            try:
                await self._emit_stored(request, stored.state, stored.payload)
            except Exception:
                # Emitting failed the same way twice; storing an error over the answer would
                # lose it for good. It stays readable through the ingress.
                log.exception(
                    "stored outcome of %s not emitted; readable via the ingress", request.request_id
                )
            return
        error = self._events.error(
            request,
            "internal_error",
            f"{type(exc).__name__}: {exc}"[:500],
            source=source,
            attempts=0,
        )
        await self._finish_failed(request, error)

    async def _handle(
        self, request: LLMRequest, source: Source, picked_up_ms: int, started: float, held: bool
    ) -> None:
        claim = Claim(ClaimStatus.CLAIMED) if held else await self._claim(request.request_id)
        if claim.status is ClaimStatus.DONE:
            await self._duplicate(request, claim)
            return
        if claim.status is ClaimStatus.RECOVER:
            await self._recover(request, claim)
            return
        if claim.status is ClaimStatus.BATCHED or (
            self._batches and not held and await self._batches.admit(request, claim, source)
        ):
            return  # a batch holds it: the batch's poller stores and emits its outcome
        self._metrics.dedup.labels("takeover" if claim.takeover else "claimed").inc()
        queue_ms = None
        if request.created_at_ms is not None:
            queue_ms = max(0, picked_up_ms - request.created_at_ms)
            self._metrics.queue_time.observe(queue_ms / 1000)
        if request.deadline_ms is not None and request.deadline_ms <= picked_up_ms:
            error = self._events.error(
                request,
                "expired",
                "the request's deadline_ms passed before it was picked up",
                source=source,
                attempts=0,
            )
            await self._finish_failed(request, error, status="expired", queue_ms=queue_ms)
            return
        provider_started = time.perf_counter()
        try:
            provider, model = self._router.resolve(request)
            # What the model is sent: the session's history in front, the server tools offered.
            sent = await self._turns.prepare(self._loop.offer(request))
        except ProviderError as exc:
            await self._finish_failed(
                request,
                self._events.provider_error(request, exc, source, attempts=0),
                queue_ms=queue_ms,
            )
            return
        except (UnknownTool, SessionError) as exc:  # refused before any call
            error = self._events.error(
                request, "invalid_request", str(exc), source=source, attempts=0
            )
            await self._finish_failed(request, error, queue_ms=queue_ms)
            return

        # Time spent waiting for rate budget or an open circuit is neither the provider's
        # latency nor the worker's overhead.
        traffic = TrafficProgress()
        loop = LoopProgress()
        chunks = self._answer_stream(request, started)
        try:
            completion = await self._loop.complete(
                request, sent, provider, model, traffic, loop, gate=self._dedup, chunks=chunks
            )
            provider_s = time.perf_counter() - provider_started - traffic.waited_s
            await self._delivered(chunks)
            if request.session_id is not None:
                await self._loop.keep_final(request.request_id, loop, traffic)
                await self._turns.append(request, completion, loop.messages, cost_usd=loop.cost_usd)
        except NotOwner:  # taken over while this worker stalled: the taker emits, ack this copy
            self._metrics.dedup.labels("fenced").inc()
            return
        except (ProviderError, ToolStepsExhausted, SessionError) as exc:
            provider_s = time.perf_counter() - provider_started - traffic.waited_s
            await self._delivered(chunks)
            self._metrics.provider_latency.labels(
                provider.name, self._metrics.model_label(model)
            ).observe(provider_s)
            error = self._failure(request, exc, source, traffic.attempts, loop.steps)
            await self._finish_failed(
                request, error, queue_ms=queue_ms, latency_ms=int(provider_s * 1000)
            )
            self._observe_overhead(started, provider_s + traffic.waited_s)
            return
        await self._finish_completed(
            request,
            completion,
            traffic.attempts,
            provider_s,
            queue_ms,
            cost_usd=loop.cost_usd,
            cached=loop.cached,
            tool_steps=loop.steps,
            service_tier=traffic.service_tier,
        )
        self._observe_overhead(started, provider_s + traffic.waited_s)

    def _failure(
        self,
        request: LLMRequest,
        exc: ProviderError | ToolStepsExhausted | SessionError,
        source: Source,
        attempts: int,
        steps: list[ToolStep],
    ) -> LLMError:
        """The error event of a request that failed once calls began, with its loop's steps."""
        if isinstance(exc, ProviderError):
            return self._events.provider_error(request, exc, source, exc.attempts, steps)
        if isinstance(exc, ToolStepsExhausted):
            kind, message = exc.error_type, str(exc)
        else:  # answered, but the session cannot take the turn: said, never silently dropped
            kind = (
                "session_turn_too_large"
                if isinstance(exc, SessionTurnTooLarge)
                else "invalid_request"
            )
            message = f"answered, but the answer was not added to the session: {exc}"
        return self._events.error(
            request, kind, message, source=source, attempts=attempts, tool_steps=steps
        )

    # -- outcomes -----------------------------------------------------------------------------

    async def _finish_completed(
        self,
        request: LLMRequest,
        completion: Completion,
        attempts: int,
        provider_s: float,
        queue_ms: int | None,
        *,
        cost_usd: float | None = None,
        cached: bool = False,
        tool_steps: Sequence[ToolStep] = (),
        service_tier: str = "standard",
    ) -> None:
        response = self._events.response(
            request,
            completion,
            attempts=attempts,
            latency_ms=int(provider_s * 1000),
            queue_ms=queue_ms,
            cost_usd=cost_usd,
            cached=cached,
            tool_steps=tool_steps,
            service_tier=service_tier,
        )
        stored = await self._store(request, response)
        if stored is None:
            return
        await self._emit_and_mark(
            request.request_id, response, self._events.success_metric(response), json=stored
        )
        if cached:
            return  # no provider call: no provider latency, attempts or tokens
        with bookkeeping(request.request_id):
            label = self._metrics.model_label(completion.model)
            self._metrics.provider_latency.labels(completion.provider, label).observe(provider_s)
            self._metrics.attempts.labels(completion.provider).observe(attempts)
            self._metrics.tokens.labels(completion.provider, label, "prompt").inc(
                completion.prompt_tokens
            )
            self._metrics.tokens.labels(completion.provider, label, "completion").inc(
                completion.completion_tokens
            )

    async def _finish_failed(
        self,
        request: LLMRequest,
        error: LLMError,
        *,
        status: MetricStatus = "error",
        queue_ms: int | None = None,
        latency_ms: int | None = None,
    ) -> None:
        if await self._store(request, error) is None:
            return
        metric = self._events.error_metric(
            error, status=status, queue_ms=queue_ms, latency_ms=latency_ms
        )
        await self._emit_and_mark(request.request_id, error, metric)

    async def _duplicate(self, request: LLMRequest, claim: Claim) -> None:
        self._metrics.dedup.labels("duplicate").inc()
        metric = self._events.duplicate_metric(request)
        outputs = [self._events.output(self._settings.metrics_topic, request.request_id, metric)]
        if self._settings.reemit_duplicates and claim.state == "completed" and claim.payload:
            topic, response = self._settings.responses_topic, decode(claim.payload, LLMResponse)
            outputs.append(self._events.output(topic, request.request_id, response))
        self._count(metric)
        await self._until_ok(lambda: self._emitter.emit(outputs), "emit a duplicate's metric")

    async def _recover(self, request: LLMRequest, claim: Claim) -> None:
        """Emit an outcome a crashed worker stored but never emitted; no provider call."""
        self._metrics.dedup.labels("recovered").inc()
        assert claim.state is not None and claim.payload is not None
        await self._emit_stored(request, claim.state, claim.payload)

    async def _emit_stored(self, request: LLMRequest, state: str, payload: bytes) -> None:
        """Emit the outcome stored in the record (``completed`` or ``failed``) and mark it."""
        outcome: LLMResponse | LLMError
        if state == State.COMPLETED:
            outcome = decode(payload, LLMResponse)
            metric = self._events.success_metric(outcome)
        else:
            outcome = decode(payload, LLMError)
            status: MetricStatus = "expired" if outcome.error_type == "expired" else "error"
            metric = self._events.error_metric(outcome, status=status)
        await self._emit_and_mark(request.request_id, outcome, metric)

    async def _reject(
        self,
        exc: DecodeError,
        raw: bytes | None,
        key: bytes | None,
        source: Source,
        picked_up_ms: int,
    ) -> None:
        """An event that is not a valid request: to llm-errors with its raw bytes.

        When its request ID can be read, why it was rejected is stored first (without the raw
        bytes), so ``GET /v1/requests/{id}`` answers ``failed`` by the time the error is out.
        """
        request_id = peek_request_id(raw, key)
        payload, size, digest = carried_payload(raw, self._settings.max_event_bytes)
        error = self._events.rejection(
            request_id,
            exc.kind,
            str(exc),
            source=source,
            picked_up_ms=picked_up_ms,
            raw_payload=payload,
            raw_payload_size=size,
            raw_payload_sha256=digest,
        )
        if request_id is not None:
            stored = encode(error.model_copy(update={"raw_payload": None}), WireFormat.JSON)
            await self._until_ok(
                lambda: self._dedup.record_rejection(request_id, error=stored, field=exc.field),
                "record a rejected event",
            )
        metric = self._events.error_metric(error, status="error")
        outputs = [
            self._events.output(self._settings.errors_topic, request_id, error),
            self._events.output(self._settings.metrics_topic, request_id, metric),
        ]
        await self._until_ok(lambda: self._emitter.emit(outputs), "emit a rejected event")
        self._count(metric)

    # -- helpers ------------------------------------------------------------------------------

    def _answer_stream(self, request: LLMRequest, picked_up: float) -> AnswerStream | None:
        if not request.stream:
            return None
        return AnswerStream(
            request,
            topic=self._settings.chunks_topic,
            sender=self._emitter,
            events=self._events,
            metrics=self._traffic.stream_metrics,
            picked_up=picked_up,
        )

    async def _delivered(self, chunks: AnswerStream | None) -> None:
        """Every chunk of a streamed request on the broker, before its outcome is stored: a
        consumer that sees the outcome finds every chunk."""
        if chunks is not None:
            await self._until_ok(chunks.delivered, "write the streamed chunks")

    async def _store(self, request: LLMRequest, outcome: LLMResponse | LLMError) -> bytes | None:
        """Settle the claim with the outcome, before anything is emitted; the outcome as stored
        (JSON), or None when another worker took the claim over (it emits, not this one)."""
        request_id = request.request_id
        stored = encode(outcome, WireFormat.JSON)
        failed = isinstance(outcome, LLMError)
        settled = await self._until_ok(
            lambda: self._dedup.settle(
                request_id, failed=failed, payload=stored, now_ms=wall_clock_ms()
            ),
            "store the outcome",
        )
        self._dedup.call_over()  # stored: a drain may cancel this task now, nothing is lost
        if not settled:
            self._metrics.dedup.labels("fenced").inc()
            log.warning("claim on %s was taken over; outcome not emitted here", request_id)
        elif self._loop.journals(request):
            try:  # no longer needed; it expires anyway
                await self._loop.forget(request_id)
            except ClaimUnavailable as exc:
                log.warning("tool steps of %s left to expire: %s", request_id, exc)
        return stored if settled else None

    async def _claim(self, request_id: str) -> Claim:
        delay = 0.05
        waited = False
        while True:
            claim = await self._until_ok(
                lambda: self._dedup.claim(request_id, wall_clock_ms()), "claim the request"
            )
            if claim.status is not ClaimStatus.BUSY:
                return claim
            if not waited:
                self._metrics.dedup.labels("waited").inc()
                waited = True
            # Another live worker holds it (a rebalance, or a duplicate event): wait for it to
            # finish or for its lease to lapse; never call the provider a second time.
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, 1.0)

    async def _emit_and_mark(
        self,
        request_id: str,
        outcome: LLMResponse | LLMError,
        metric: LLMMetric,
        *,
        json: bytes | None = None,
    ) -> None:
        """Emit ``outcome`` (``json``: already encoded as JSON) and its metric, then mark the
        record emitted."""
        topic = (
            self._settings.responses_topic
            if isinstance(outcome, LLMResponse)
            else self._settings.errors_topic
        )
        outputs = [
            self._events.output(topic, request_id, outcome, json=json),
            self._events.output(self._settings.metrics_topic, request_id, metric),
        ]
        try:
            await self._until_ok(lambda: self._emitter.emit(outputs), "emit the outcome")
        except MessageSizeTooLargeError:
            # Retrying cannot help, and waiting would stall the partition: say so on
            # llm-errors instead. The full outcome stays readable in Redis (the ingress).
            error = self._events.too_large(metric, size=len(outputs[0].value))
            metric = self._events.error_metric(error, status="error")
            outputs = [
                self._events.output(self._settings.errors_topic, request_id, error),
                self._events.output(self._settings.metrics_topic, request_id, metric),
            ]
            await self._until_ok(lambda: self._emitter.emit(outputs), "emit the outcome")
        await self._until_ok(lambda: self._dedup.mark_emitted([request_id]), "mark emitted")
        self._count(metric)

    async def _until_ok(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Retry an operation on Redis or Kafka until it succeeds: fail closed, lose nothing."""
        delay = 0.1
        while True:
            try:
                result = await operation()
            except MessageSizeTooLargeError:
                raise  # permanent: retrying would stall the partition forever
            except (ClaimUnavailable, KafkaError, OSError, TimeoutError) as exc:
                failed = exc
            else:
                return result
            log.warning("cannot %s (%s); retrying in %.1f s", what, failed, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _count(self, metric: LLMMetric) -> None:
        with bookkeeping(metric.request_id):
            provider = provider_label(metric.provider, self._router.get)
            # A model of no configured provider is junk: it must not take one of the bounded
            # model label's places from the models really called.
            known = provider == metric.provider
            model = self._metrics.model_label(metric.model) if known else provider
            self._metrics.requests.labels(metric.status, provider, model).inc()
            if metric.error_type is not None:
                self._metrics.errors.labels(self._metrics.error_type_label(metric.error_type)).inc()

    def _observe_overhead(self, started: float, provider_s: float) -> None:
        with bookkeeping(None):
            self._metrics.overhead.observe(max(0.0, time.perf_counter() - started - provider_s))
