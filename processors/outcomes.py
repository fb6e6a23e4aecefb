"""The events a request's outcome becomes: the response or error, its metric, and the encoded
outputs that carry them to the broker.

Pure construction, no I/O: :class:`processors.pipeline.RequestProcessor` decides which outcome a
request has, this module says what that outcome looks like on ``llm-responses``,
``llm-errors`` and ``llm-metrics`` (and encodes the chunks of :mod:`processors.streaming`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.providers import Completion, ProviderError
from llmstream.processors.settings import WorkerSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import (
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
    MetricStatus,
    ToolStep,
)

__all__ = ["Outcomes", "Output", "Source", "carried_payload"]

# Whose request an event is about: every event carries these, under the same names, copied
# from the event (or request) it follows from.
_WHO = {"request_id", "provider", "model", "client_id"}
# What a response carries of its request, as the application sent it.
_CARRIED = {"request_id", "client_id", "metadata", "created_at_ms", "session_id"}
# What a response's metric copies of the response.
_RESPONSE_MEASURES = _WHO | {
    "latency_ms",
    "queue_ms",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "service_tier",
}
# The tier every request is served in until tiers are implemented.
_SERVICE_TIER = "standard"


@dataclass(frozen=True, slots=True)
class Source:
    """Where an event came from, for ``llm-errors`` and logs."""

    topic: str
    partition: int
    offset: int

    def error_fields(self) -> dict[str, Any]:
        """The fields of an error event that say where its event came from."""
        return {
            "source_topic": self.topic,
            "source_partition": self.partition,
            "source_offset": self.offset,
        }


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
        self,
        topic: str,
        request_id: str | None,
        event: LLMResponse | LLMError | LLMMetric | LLMResponseChunk,
        json: bytes | None = None,
    ) -> Output:
        """``event`` encoded for ``topic``, keyed by its request ID; ``json``, the event already
        encoded as JSON, is used as it is when the output format is JSON."""
        key = request_id.encode() if request_id is not None else None
        if json is not None and self._format is WireFormat.JSON:
            return Output(topic, key, json)
        return Output(topic, key, encode(event, self._format))

    def response(
        self,
        request: LLMRequest,
        completion: Completion,
        *,
        attempts: int,
        latency_ms: int,
        queue_ms: int | None,
        cost_usd: float | None,
        cached: bool,
        tool_steps: Sequence[ToolStep] = (),
        service_tier: str = _SERVICE_TIER,
    ) -> LLMResponse:
        """The response event of ``request``: the completion as the provider gave it, with what
        the worker measured, the steps of its tool loop, and what the request asked to be
        carried along."""
        return LLMResponse(
            content=completion.content,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.total_tokens,
            provider=completion.provider,
            model=completion.model,
            tool_calls=list(completion.tool_calls) or None,
            tool_steps=list(tool_steps),
            # Read off the request, not dumped: a dump copies every field to drop most of them.
            **{name: getattr(request, name) for name in _CARRIED},
            cost_usd=cost_usd,
            latency_ms=latency_ms,
            queue_ms=queue_ms,
            attempts=attempts,
            cached=cached,
            service_tier=service_tier,
            completed_at_ms=wall_clock_ms(),
        )

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
        tool_steps: Sequence[ToolStep] = (),
    ) -> LLMError:
        """The error event of ``request``, carrying the request itself (so it can be replayed)
        and the steps its tool loop made before it failed."""
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
            session_id=request.session_id,
            tool_steps=list(tool_steps),
            request=request,
            **source.error_fields(),
            occurred_at_ms=wall_clock_ms(),
        )

    def provider_error(
        self,
        request: LLMRequest,
        exc: ProviderError,
        source: Source,
        attempts: int,
        tool_steps: Sequence[ToolStep] = (),
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
            tool_steps=tool_steps,
        )

    def rejection(
        self,
        request_id: str | None,
        kind: str,
        message: str,
        *,
        source: Source,
        picked_up_ms: int,
        raw_payload: bytes | None,
        raw_payload_size: int | None,
        raw_payload_sha256: str | None,
    ) -> LLMError:
        """The error event of an event that is not a valid request, carrying (some of) its bytes."""
        return LLMError(
            request_id=request_id,
            error_type=kind,
            message=message,
            retryable=False,
            raw_payload=raw_payload,
            raw_payload_size=raw_payload_size,
            raw_payload_sha256=raw_payload_sha256,
            **source.error_fields(),
            occurred_at_ms=picked_up_ms,
        )

    def too_large(self, metric: LLMMetric, size: int) -> LLMError:
        """The error event that stands in for an outcome of ``size`` bytes the broker refused;
        ``metric`` is the refused outcome's metric, which says whose request it was."""
        return LLMError(
            **metric.model_dump(include=_WHO | {"attempts"}),
            error_type="output_too_large",
            message=f"the outcome ({size} bytes) is larger than the broker accepts "
            "(max.message.bytes); it is stored and readable via the ingress",
            occurred_at_ms=wall_clock_ms(),
        )

    def success_metric(self, response: LLMResponse) -> LLMMetric:
        """The metric event of a response (``cache_hit`` when it came from the cache)."""
        fields = response.__dict__  # scalars only: read, not dumped
        # Validated from a dict: pydantic-core does that in 3.4 µs, model_construct's Python
        # loop over the fields takes 6.3 µs (timeit).
        measures = {name: fields[name] for name in _RESPONSE_MEASURES}
        measures["status"] = "cache_hit" if response.cached else "success"
        measures["worker_id"] = self._worker_id
        measures["occurred_at_ms"] = wall_clock_ms()
        return LLMMetric.model_validate(measures)

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
            **error.model_dump(include=_WHO | {"attempts", "error_type"}),
            status=status,
            latency_ms=latency_ms,
            queue_ms=queue_ms,
            worker_id=self._worker_id,
            occurred_at_ms=wall_clock_ms(),
        )

    def duplicate_metric(self, request: LLMRequest) -> LLMMetric:
        """The metric event of a request whose outcome another copy already settled."""
        return LLMMetric(
            **request.model_dump(include=_WHO),
            status="duplicate",
            worker_id=self._worker_id,
            occurred_at_ms=wall_clock_ms(),
        )


# Room in an error event for everything but the payload (the message is bounded by the codec).
_ERROR_EVENT_ROOM = 16 * 1024
_TRUNCATED_PAYLOAD_BYTES = 64 * 1024


def carried_payload(
    raw: bytes | None, max_event_bytes: int
) -> tuple[bytes | None, int | None, str | None]:
    """What of an undecodable payload its error event carries: the whole payload when the event
    still fits under the producer's limit (base64 in JSON grows it by a third), else its first
    bytes with its size and SHA-256, so that one oversized event cannot stop its partition."""
    if raw is None:
        return None, None, None
    fits = max(0, (max_event_bytes - _ERROR_EVENT_ROOM) * 3 // 4)
    if len(raw) <= fits:
        return raw, None, None
    kept = raw[: min(fits, _TRUNCATED_PAYLOAD_BYTES)]
    return kept, len(raw), hashlib.sha256(raw).hexdigest()
