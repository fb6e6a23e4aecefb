"""A streamed request's chunks on ``llm-response-chunks``: produced as the provider sends them,
acknowledged before the request's outcome is stored.

For a request with ``stream: true``, traffic control asks :meth:`AnswerStream.attempt` for the
``on_delta`` of each provider call; every call of it becomes one :class:`LLMResponseChunk`, keyed
by the request ID, numbered ``index`` 0, 1, 2 … within its ``attempt`` (the call's number, as the
final response's ``attempts`` counts calls). A cache hit is one chunk of attempt 0 holding the whole
answer (:meth:`AnswerStream.whole`).

Chunks are handed to the producer without waiting for the broker: a stream must not slow down by
a round trip per chunk. :meth:`AnswerStream.delivered` waits for every acknowledgement, sending
again what failed; the pipeline calls it before storing the outcome, so a consumer that saw the
final response finds every chunk of its attempt on the topic. Chunks of an attempt that broke off
stay on the topic; the contract (``schemas/llm_response_chunk.avsc``) tells consumers to discard
them.

How many chunks: one per ``on_delta`` call, which the adapters make once per socket read
(:meth:`processors.providers.http.HTTPAdapter.stream`): a delta is produced the moment it arrives,
and deltas that arrive together, or while the worker was busy, go out as one chunk. Nothing is
held back to be batched, so batching never delays a chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Protocol

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from prometheus_client import CollectorRegistry, Counter, Histogram

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.outcomes import Outcomes, Output
from llmstream.processors.providers import DEFAULT_FINISH_REASON, Completion, OnDelta
from llmstream.schemas.models import LLMRequest, LLMResponseChunk

__all__ = ["AnswerStream", "ChunkSender", "StreamMetrics"]

log = logging.getLogger(__name__)

_FIRST_CHUNK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120)


class ChunkSender(Protocol):
    """Hands one output to the producer; the awaitable it returns resolves once the broker
    acknowledged it (and raises the producer's error if it could not be written)."""

    async def send(self, output: Output) -> Awaitable[object]: ...


class StreamMetrics:
    """Metrics of streamed answers, on the worker's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.first_chunk = Histogram(
            "llmstream_worker_first_chunk_seconds",
            "From a streamed request's pick-up by the worker to its first chunk handed to the "
            "producer: waits, retries and the provider's time to first token included (cache "
            "hits are not counted).",
            ["provider"],
            buckets=_FIRST_CHUNK_BUCKETS,
            registry=registry,
        )
        self.chunks = Counter(
            "llmstream_worker_stream_chunks_total",
            "Chunks of streamed answers produced to llm-response-chunks.",
            ["provider"],
            registry=registry,
        )


class AnswerStream:
    """The chunks of one streamed request, over all its attempts.

    ``picked_up`` is the request's pick-up time on ``time.perf_counter``'s clock.
    """

    def __init__(
        self,
        request: LLMRequest,
        *,
        topic: str,
        sender: ChunkSender,
        events: Outcomes,
        metrics: StreamMetrics,
        picked_up: float,
    ) -> None:
        self._request = request
        self._topic = topic
        self._sender = sender
        self._events = events
        self._metrics = metrics
        self._picked_up = picked_up
        self._first_seen = False
        # Handed to the producer, acknowledgement not yet seen.
        self._in_flight: list[tuple[Output, Awaitable[object]]] = []
        # Not written (the producer refused it, or the broker failed it): sent again.
        self._unsent: list[Output] = []

    def attempt(self, number: int, provider: str, model: str) -> OnDelta:
        """The ``on_delta`` of provider call number ``number``: each call is the next chunk."""
        index = 0

        async def on_delta(text: str, finish_reason: str | None) -> None:
            nonlocal index
            if not self._first_seen:
                self._first_seen = True
                self._metrics.first_chunk.labels(provider).observe(
                    time.perf_counter() - self._picked_up
                )
            await self._send(number, index, text, finish_reason, provider, model)
            index += 1
            self._metrics.chunks.labels(provider).inc()

        return on_delta

    async def whole(self, completion: Completion) -> None:
        """A cached answer: one chunk of attempt 0 with all of it."""
        await self._send(
            0,
            0,
            completion.content,
            completion.finish_reason or DEFAULT_FINISH_REASON,
            completion.provider,
            completion.model,
        )
        self._metrics.chunks.labels(completion.provider).inc()

    async def delivered(self) -> None:
        """Return once the broker acknowledged every chunk handed over so far.

        A chunk the broker failed is sent again (and waited for); a ``KafkaError`` that
        sending again raises is raised, with the chunk kept for the next call, so the caller
        retries this as it retries any emit. A chunk too large for the broker is dropped
        with a warning: retrying cannot help (the outcome it belongs to is as large).
        """
        while self._in_flight or self._unsent:
            in_flight, self._in_flight = self._in_flight, []
            for output, acked in in_flight:
                try:
                    await acked
                except MessageSizeTooLargeError:
                    self._too_large(output)
                except KafkaError as exc:
                    log.warning(
                        "a chunk of %s was not written (%s); sending it again",
                        self._request.request_id,
                        exc,
                    )
                    self._unsent.append(output)
            while self._unsent:
                output = self._unsent[0]
                try:
                    acked = await self._sender.send(output)
                except MessageSizeTooLargeError:
                    self._too_large(output)
                else:
                    self._in_flight.append((output, acked))
                del self._unsent[0]

    async def _send(
        self,
        attempt: int,
        index: int,
        delta: str,
        finish_reason: str | None,
        provider: str,
        model: str,
    ) -> None:
        chunk = LLMResponseChunk(
            request_id=self._request.request_id,
            attempt=attempt,
            index=index,
            delta=delta,
            finish_reason=finish_reason,
            provider=provider,
            model=model,
            client_id=self._request.client_id,
            created_at_ms=wall_clock_ms(),
        )
        output = self._events.output(self._topic, self._request.request_id, chunk)
        try:
            acked = await self._sender.send(output)
        except KafkaError:
            # The producer refused it (the broker unreachable for too long): the stream goes on,
            # and delivered() sends it again before the outcome is stored.
            self._unsent.append(output)
        else:
            self._in_flight.append((output, acked))

    def _too_large(self, output: Output) -> None:
        log.warning(
            "a chunk of %s (%d bytes) is larger than the broker accepts; not written",
            self._request.request_id,
            len(output.value),
        )
