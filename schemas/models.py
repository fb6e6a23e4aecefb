"""Pydantic models of the five events, mirroring the `.avsc` files field by field.

The `.avsc` files beside this module are the source of truth; `tests/test_schemas.py` proves the
models agree with them (names, types, nullability, defaults). Validation limits live here so every
producer in Python (the ingress, the worker, tests) rejects the same things with the same messages.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Limits a user would expect of an LLM request; generous, but finite so one event cannot exhaust
# a worker. Content is counted in characters.
MAX_ID_LENGTH = 256
MAX_MODEL_LENGTH = 256
MAX_MESSAGES = 1_000
MAX_CONTENT_CHARS = 1_000_000
MAX_STOP_SEQUENCES = 16
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4_096
MAX_FALLBACKS = 10

Role = Literal["system", "user", "assistant", "tool"]
MetricStatus = Literal["success", "error", "duplicate", "cache_hit", "expired"]

RequestId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_MODEL_LENGTH, strip_whitespace=True)
]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_ENTRIES)]
# Avro `int` is 32-bit and `long` 64-bit: bounding the models keeps every valid event encodable.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
NonNegativeMs = Annotated[int, Field(ge=0, le=2**63 - 1)]
NonNegativeInt32 = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Event(BaseModel):
    # JSON carries bytes as base64; unknown fields are an error so a typo is reported, not ignored.
    # Strict types: the contract is read by many languages, so a string is not a number and a
    # boolean is neither a number nor "yes" ("0.5", true and "16" are refused, naming the field).
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )


class ChatMessage(_Event):
    """One message of a conversation."""

    role: Role
    content: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None


class LLMRequest(_Event):
    """A request on `llm-requests`, keyed by `request_id` (the idempotency key)."""

    request_id: RequestId
    model: ModelName
    provider: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    stop: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=256)]],
            Field(max_length=MAX_STOP_SEQUENCES),
        ]
        | None
    ) = None
    metadata: Metadata = Field(default_factory=dict)
    client_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    fallbacks: Annotated[list[ModelName], Field(max_length=MAX_FALLBACKS)] = Field(
        default_factory=list
    )
    cache: bool = False
    deadline_ms: NonNegativeMs | None = None
    created_at_ms: NonNegativeMs | None = None
    stream: bool = False


class LLMResponse(_Event):
    """A successful answer on `llm-responses`, keyed by `request_id`."""

    request_id: str
    provider: str
    model: str
    content: str
    finish_reason: str | None = None
    prompt_tokens: Int32 = 0
    completion_tokens: Int32 = 0
    total_tokens: Int32 = 0
    cost_usd: float | None = None
    latency_ms: Int64
    queue_ms: Int64 | None = None
    attempts: Int32
    cached: bool = False
    client_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at_ms: Int64 | None = None
    completed_at_ms: Int64 | None = None


class LLMMetric(_Event):
    """One event per request outcome on `llm-metrics`, for analytics."""

    request_id: str | None
    status: MetricStatus
    provider: str | None = None
    model: str | None = None
    client_id: str | None = None
    latency_ms: Int64 | None = None
    queue_ms: Int64 | None = None
    attempts: Int32 = 0
    prompt_tokens: Int32 | None = None
    completion_tokens: Int32 | None = None
    total_tokens: Int32 | None = None
    cost_usd: float | None = None
    error_type: str | None = None
    worker_id: str
    occurred_at_ms: Int64


class LLMError(_Event):
    """A failure on `llm-errors`: enough to understand it and to replay the request."""

    request_id: str | None
    error_type: str
    message: str
    status_code: Int32 | None = None
    retryable: bool = False
    attempts: Int32 = 0
    provider: str | None = None
    model: str | None = None
    client_id: str | None = None
    request: LLMRequest | None = None
    raw_payload: bytes | None = None
    source_topic: str | None = None
    source_partition: Int32 | None = None
    source_offset: Int64 | None = None
    occurred_at_ms: Int64
    raw_payload_size: Int64 | None = None
    raw_payload_sha256: str | None = None


class LLMResponseChunk(_Event):
    """A piece of a streamed answer on `llm-response-chunks`, keyed by `request_id`.

    Chunks of one provider call share ``attempt`` and are numbered by ``index``; a retry starts a
    new attempt. The answer is the chunks of ``attempt == LLMResponse.attempts`` in ``index`` order
    (the schema's doc states the whole consumer rule).
    """

    request_id: str
    attempt: NonNegativeInt32
    index: NonNegativeInt32
    delta: str
    finish_reason: str | None = None
    provider: str | None = None
    model: str | None = None
    client_id: str | None = None
    created_at_ms: Int64
