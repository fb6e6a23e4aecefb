"""The events a request's outcome becomes: the response or error, its metric, and the encoded
outputs that carry them to the broker.

Pure construction, no I/O: :class:`processors.pipeline.RequestProcessor` decides which outcome a
request has, this module says what that outcome looks like on ``llm-responses``,
``llm-errors`` and ``llm-metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.providers import ProviderError
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import LLMError, LLMMetric, LLMRequest, LLMResponse, MetricStatus

__all__ = ["Outcomes", "Output", "Source"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an event came from, for ``llm-errors`` and logs."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


class Outcomes:
    """Builds the events of outcomes for one worker (its ID and output wire format)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._worker_id = settings.worker_id
        self._format: WireFormat = settings.output_format

    def output(
        self, topic: str, request_id: str | None, event: LLMResponse | LLMError | LLMMetric
    ) -> Output:
        """``event`` encoded for ``topic``, keyed by its request ID."""
        key = request_id.encode() if request_id is not None else None
        return Output(topic, key, encode(event, self._format))

    def error(
        self,
        request: LLMRequest,
        error_type: str,
        message: str,
        *,
        source: Source,
        attempts: int,
        status_code: int | None = None,
        retryable: bool = False,
        provider: str | None = None,
    ) -> LLMError:
        """The error event of ``request``, carrying the request itself (so it can be replayed)."""
        return LLMError(
            request_id=request.request_id,
            error_type=error_type,
            message=message,
            status_code=status_code,
            retryable=retryable,
            attempts=attempts,
            provider=provider or request.provider,
            model=request.model,
            client_id=request.client_id,
            request=request,
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            occurred_at_ms=wall_clock_ms(),
        )

    def provider_error(
        self, request: LLMRequest, exc: ProviderError, source: Source, attempts: int
    ) -> LLMError:
        """The error event of a provider failure, classified as the adapter classified it."""
        return self.error(
            request,
            exc.error_type,
            str(exc),
            source=source,
            attempts=attempts,
            status_code=exc.status_code,
            retryable=exc.retryable,
            provider=exc.provider,
        )

    def success_metric(self, response: LLMResponse) -> LLMMetric:
        """The metric event of a response (``cache_hit`` when it came from the cache)."""
        return LLMMetric(
            request_id=response.request_id,
            status="cache_hit" if response.cached else "success",
            provider=response.provider,
            model=response.model,
            client_id=response.client_id,
            latency_ms=response.latency_ms,
            queue_ms=response.queue_ms,
            attempts=response.attempts,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            total_tokens=response.total_tokens,
            cost_usd=response.cost_usd,
            worker_id=self._worker_id,
            occurred_at_ms=wall_clock_ms(),
        )

    def error_metric(
        self,
        error: LLMError,
        *,
        status: MetricStatus,
        queue_ms: int | None = None,
        latency_ms: int | None = None,
    ) -> LLMMetric:
        """The metric event of an error."""
        return LLMMetric(
            request_id=error.request_id,
            status=status,
            provider=error.provider,
            model=error.model,
            client_id=error.client_id,
            latency_ms=latency_ms,
            queue_ms=queue_ms,
            attempts=error.attempts,
            error_type=error.error_type,
            worker_id=self._worker_id,
            occurred_at_ms=wall_clock_ms(),
        )
