"""The sample events the tests share: builders for one request or response, and one of each event
with every field set (and with only the required ones), for the codec's round trips."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from llmstream.core.clock import wall_clock_ms
from llmstream.schemas.models import (
    ChatMessage,
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
)

__all__ = [
    "EVENTS",
    "MINIMAL_REQUEST",
    "RAW",
    "REQUEST",
    "SCHEMA_FILES",
    "request",
    "response_to",
]


def request(
    request_id: str, model: str = "openai/gpt-4o-mini", text: str = "hello", **kw: object
) -> LLMRequest:
    """A one-message request created now; ``kw`` sets any other field."""
    return LLMRequest(
        request_id=request_id,
        model=model,
        messages=[ChatMessage(role="user", content=text)],
        created_at_ms=wall_clock_ms(),
        **kw,  # type: ignore[arg-type]
    )


def response_to(original: LLMRequest, content: str, **kw: Any) -> LLMResponse:
    """The answer a worker would emit for ``original``: one attempt, 3 + 4 tokens; ``kw`` wins."""
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    fields: dict[str, Any] = {"provider": "openai", "latency_ms": 12, "attempts": 1, **usage}
    return LLMResponse(
        request_id=original.request_id, model=original.model, content=content, **{**fields, **kw}
    )


# Bytes whose base64 has both '+' and '/', so the alphabet is visible.
# Each event's schema file in llmstream/schemas/.
SCHEMA_FILES: dict[type[BaseModel], str] = {
    LLMRequest: "llm_request.avsc",
    LLMResponse: "llm_response.avsc",
    LLMMetric: "llm_metric.avsc",
    LLMError: "llm_error.avsc",
    LLMResponseChunk: "llm_response_chunk.avsc",
}

RAW = b"\xfb\xff\xfe\x00not json"

REQUEST = LLMRequest(
    request_id="req-1",
    model="gpt-4o-mini",
    provider="openai",
    messages=[
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi ✓ \u00e9\U0001f600", name="ana"),
    ],
    temperature=0.7,
    max_tokens=256,
    top_p=0.9,
    stop=["\n\n"],
    metadata={"team": "search", "trace": ""},
    client_id="client-a",
    fallbacks=["gpt-4o"],
    cache=True,
    deadline_ms=1_700_000_060_000,
    created_at_ms=1_700_000_000_000,
)
MINIMAL_REQUEST = LLMRequest(
    request_id="r", model="m", messages=[ChatMessage(role="user", content="x")]
)

# What the response, its metric and the error say about REQUEST's call, set once.
_CALL: dict[str, Any] = {
    "request_id": REQUEST.request_id,
    "provider": REQUEST.provider,
    "model": REQUEST.model,
    "client_id": REQUEST.client_id,
}
_USAGE: dict[str, Any] = {
    "prompt_tokens": 12,
    "completion_tokens": 3,
    "total_tokens": 15,
    "cost_usd": 0.000123,
    "latency_ms": 850,
    "queue_ms": 4,
}

EVENTS: dict[str, BaseModel] = {
    "request": REQUEST,
    "request-minimal": MINIMAL_REQUEST,
    "response": LLMResponse(
        **_CALL,
        **_USAGE,
        content="Hello!",
        finish_reason="stop",
        attempts=2,
        cached=True,
        metadata={"team": "search"},
        created_at_ms=1_700_000_000_000,
        completed_at_ms=1_700_000_000_900,
    ),
    "response-minimal": LLMResponse(
        request_id="r", provider="p", model="m", content="", latency_ms=0, attempts=1
    ),
    "metric": LLMMetric(
        **_CALL,
        **_USAGE,
        status="success",
        attempts=2,
        error_type=None,
        worker_id="worker-1",
        occurred_at_ms=1_700_000_000_900,
    ),
    "metric-minimal": LLMMetric(
        request_id=None, status="duplicate", worker_id="w", occurred_at_ms=0
    ),
    "error": LLMError(
        **_CALL,
        error_type="provider_error",
        message="upstream 503",
        status_code=503,
        retryable=True,
        attempts=3,
        request=REQUEST,
        raw_payload=RAW,
        source_topic="llm-requests",
        source_partition=7,
        source_offset=2**40,
        occurred_at_ms=1_700_000_001_000,
    ),
    "error-minimal": LLMError(
        request_id=None, error_type="undecodable", message="bad", occurred_at_ms=1
    ),
}
