"""Wire models of the native API: ``POST /v1/requests`` and ``GET /v1/requests/{id}``.

A submitted request is an :class:`~schemas.models.LLMRequest` whose ``request_id`` may be left
out (the ingress assigns one); the same limits and messages apply, so the HTTP API rejects exactly
what a Kafka producer's event would be rejected for.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from llmstream.ingress.results import Status
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse, RequestId

# The model's bound; the configured `max_batch` (default 100) is checked by the handler.
MAX_BATCH_LIMIT = 10_000


class SubmittedRequest(LLMRequest):
    """One request as a client submits it: ``request_id`` is optional."""

    request_id: RequestId | None = None  # type: ignore[assignment]


class SubmittedBatch(BaseModel):
    """Several requests in one call; each is published as its own event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: Annotated[list[SubmittedRequest], Field(min_length=1, max_length=MAX_BATCH_LIMIT)]


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "batch" if "requests" in value else "request"
    return "batch" if isinstance(value, SubmittedBatch) else "request"


# Tag names appear in validation errors' `loc`; the handler strips them (see BODY_TAGS).
Submission = Annotated[
    Annotated[SubmittedRequest, Tag("request")] | Annotated[SubmittedBatch, Tag("batch")],
    Discriminator(_kind),
]
BODY_TAGS = ("request", "batch")


class Admitted(BaseModel):
    """What became of one submitted request."""

    request_id: str
    status: Status
    duplicate: bool = Field(
        description="true when the ID was known already: nothing was published for it"
    )


class SubmitResponse(BaseModel):
    """The answer to a submission, one entry per request, in the order submitted."""

    requests: list[Admitted]


class Failure(BaseModel):
    """Why a request failed (from ``llm-errors``), without the request it echoes."""

    error_type: str
    message: str
    status_code: int | None = None
    retryable: bool = False
    attempts: int = 0
    provider: str | None = None
    model: str | None = None
    occurred_at_ms: int

    @classmethod
    def of(cls, error: LLMError) -> Failure:
        return cls(
            error_type=error.error_type,
            message=error.message,
            status_code=error.status_code,
            retryable=error.retryable,
            attempts=error.attempts,
            provider=error.provider,
            model=error.model,
            occurred_at_ms=error.occurred_at_ms,
        )


class RequestStatus(BaseModel):
    """``pending`` (queued or being worked on), ``completed`` or ``failed``."""

    request_id: str
    status: Status
    response: LLMResponse | None = None
    error: Failure | None = None
