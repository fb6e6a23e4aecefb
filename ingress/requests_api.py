"""The native requests API: ``POST /v1/requests`` (one or a batch) and ``GET /v1/requests/{id}``.

A submitted request is an :class:`~schemas.models.LLMRequest` whose ``request_id`` may be left
out (the ingress assigns one); the same limits and messages apply, so the HTTP API rejects exactly
what a Kafka producer's event would be rejected for. Tools, ``response_format`` and
``session_id`` are the contract's fields, taken as they are.

Sessions (:func:`check_sessions`, for this route and ``POST /v1/chat/completions``): a request
naming another client's session is refused before anything is published. A session ID that does
not exist yet is let through without creating anything: the worker creates the session with the
request's answer, owned by the request's client. ``POST /v1/sessions`` makes one up front.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Body, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from redis.exceptions import RedisError

from llmstream.core.clock import wall_clock_ms
from llmstream.core.sessions import SessionStore
from llmstream.ingress.auth import CallerDep, Identity
from llmstream.ingress.errors import ApiError, failure_message, unavailable, validation_error
from llmstream.ingress.parts import LedgerDep, PublisherDep, Routes, SettingsDep, part
from llmstream.ingress.results import Status
from llmstream.schemas.models import (
    MAX_CONTENT_CHARS,
    LLMError,
    LLMRequest,
    LLMResponse,
    RequestId,
)

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
    field: str | None = Field(
        None, description="The first invalid field, for an event rejected as invalid"
    )
    status_code: int | None = None
    retryable: bool = False
    attempts: int = 0
    provider: str | None = None
    model: str | None = None
    occurred_at_ms: int

    @classmethod
    def of(cls, error: LLMError, field: str | None = None, *, rejected: bool = False) -> Failure:
        """The failure as its client sees it. The worker's message is for operators (it names
        provider endpoints), so the client gets :func:`failure_message`; a rejected event's
        message, from validating the event itself, is kept: it says what to fix."""
        message = error.message if rejected else failure_message(error)
        return cls.model_validate(error, from_attributes=True).model_copy(
            update={"field": field, "message": message}
        )


class RequestStatus(BaseModel):
    """``pending`` (queued or being worked on), ``completed`` or ``failed``."""

    request_id: str
    status: Status
    response: LLMResponse | None = None
    error: Failure | None = None


# An Idempotency-Key leaves room for the "-<index>" a batch adds to it.
MAX_IDEMPOTENCY_KEY = 200

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Used as the request ID; in a batch, item i without an ID gets '<key>-<i>'.",
    ),
]

# The failures every /v1 route may answer with, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No API key"},
    403: {"description": "API key not allowed"},
    413: {
        "description": "Body or event too large, or a message's content over "
        f"{MAX_CONTENT_CHARS:,} characters"
    },
    429: {"description": "Rate limited; see Retry-After"},
    503: {"description": "Kafka or Redis unavailable; retry"},
}

# What a route that reads a JSON body may answer besides.
JSON_BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {"description": "The body was not sent with 'Content-Type: application/json'"},
}

routes = Routes(tags=["requests"])


@routes.post(
    "/v1/requests",
    status_code=202,
    response_model=SubmitResponse,
    responses={
        200: {"model": SubmitResponse, "description": "Every ID was known: nothing published"},
        403: {
            "description": "API key not allowed, or (authentication off) a session_id of "
            "another client"
        },
        404: {"description": "A session_id of another client (with API keys)"},
        409: {"description": "A request ID belongs to another client or other content"},
        **ERROR_RESPONSES,
        **JSON_BODY_RESPONSES,
    },
)
async def submit(
    body: Annotated[Submission, Body()],
    identity: CallerDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> SubmitResponse:
    """Publish one request, or a batch, to ``llm-requests``.

    A request without ``request_id`` gets the ``Idempotency-Key`` header, or a new UUID.
    A request ID that exists already is not published again: its current status is returned.
    """
    batch = isinstance(body, SubmittedBatch)
    if isinstance(body, SubmittedBatch):
        if len(body.requests) > settings.max_batch:
            raise ApiError(
                422,
                f"requests: at most {settings.max_batch} requests per batch, "
                f"got {len(body.requests)}",
                param="requests",
                code="too_long",
            )
        items = list(body.requests)
        fields = [f"requests.{i}" for i in range(len(items))]
    else:
        items, fields = [body], [""]
    now = wall_clock_ms()
    requests = [
        _admit(
            item,
            field,
            request_id=_request_id(item, idempotency_key, index, batch=batch),
            client_id=identity.client_id,
            now_ms=now,
        )
        for index, (item, field) in enumerate(zip(items, fields, strict=True))
    ]
    events = [publisher.event(r, f) for r, f in zip(requests, fields, strict=True)]
    await check_sessions(request, requests, fields, identity)
    id_fields = [f"{field}.request_id" if field else "request_id" for field in fields]
    receipts = await publisher.submit(events, identity.client_id, id_fields)
    failed = [r for r in receipts if r.failed]
    if failed:
        raise ApiError(
            503,
            f"{len(failed)} of {len(receipts)} requests could not be published; "
            "submit them again with the same request IDs (published ones are not sent twice)",
            code="publish_failed",
            headers={"Retry-After": "1"},
            extra={
                "requests": [
                    {"request_id": r.request_id, "published": not r.failed} for r in receipts
                ]
            },
        )
    if not any(r.published for r in receipts):
        response.status_code = 200
    return SubmitResponse(
        requests=[
            Admitted(request_id=r.request_id, status=r.status, duplicate=not r.published)
            for r in receipts
        ]
    )


@routes.get(
    "/v1/requests/{request_id:path}",
    response_model=RequestStatus,
    responses={404: {"description": "Unknown request ID"}, **ERROR_RESPONSES},
)
async def get_request(
    request_id: Annotated[str, Path(min_length=1, max_length=256)],
    identity: CallerDep,
    ledger: LedgerDep,
) -> RequestStatus:
    """Where a request stands: ``pending``, ``completed`` or ``failed``.

    With API keys on, a request is shown only to the client it belongs to; any other ID,
    including one that belongs to nobody (produced straight to ``llm-requests``, submitted while
    authentication was off), answers 404 as an unknown one does. An event the worker rejected as
    invalid answers ``failed`` with why, when authentication is off.
    """
    rejected = False
    try:
        stored = await ledger.get(request_id)
        if stored is None and identity.client_id is None:
            stored = await ledger.rejection(request_id)
            rejected = stored is not None
    except RedisError:
        raise unavailable("Redis") from None
    if stored is None or not identity.may_see(stored):
        raise ApiError(404, "no request with this ID", param="request_id", code="not_found")
    outcome = stored.outcome()
    return RequestStatus(
        request_id=request_id,
        status=stored.status,
        response=outcome if isinstance(outcome, LLMResponse) else None,
        error=Failure.of(outcome, stored.field, rejected=rejected)
        if isinstance(outcome, LLMError)
        else None,
    )


async def check_sessions(
    connection: Request,
    requests: Sequence[LLMRequest],
    fields: Sequence[str],
    identity: Identity,
) -> None:
    """Refuse the submission when a request names a session that is not its client's.

    With API keys on, another client's session answers 404, as one that does not exist would
    for ``GET /v1/sessions/{id}``; with authentication off (where every caller sees every
    session) a session of another ``client_id`` answers 403. A session that does not exist yet
    passes. The worker checks again when it answers: a session another client created in the
    meantime fails the request there.
    """
    named = [
        (r.session_id, r, f)
        for r, f in zip(requests, fields, strict=True)
        if r.session_id is not None
    ]
    if not named:
        return
    sessions = part(connection, "sessions", SessionStore)
    found: dict[str, tuple[bool, str | None]] = {}
    for session_id, request, field in named:
        if session_id not in found:
            try:
                found[session_id] = await sessions.owner(session_id)
            except RedisError:
                raise unavailable("Redis") from None
        exists, owner = found[session_id]
        if not exists or owner == request.client_id:
            continue
        param = f"{field}.session_id" if field else "session_id"
        if identity.client_id is not None:
            raise ApiError(404, f"{param}: no session with this ID", param=param, code="not_found")
        raise ApiError(
            403,
            f"{param}: the session belongs to another client_id",
            param=param,
            code="session_of_another_client",
        )


def _request_id(
    item: SubmittedRequest, idempotency_key: str | None, index: int, *, batch: bool
) -> str:
    if item.request_id is not None:
        if idempotency_key is not None and not batch and idempotency_key != item.request_id:
            raise ApiError(
                422,
                "Idempotency-Key: differs from the body's request_id; send one or the same",
                param="Idempotency-Key",
                code="conflicting_request_id",
            )
        return item.request_id
    if idempotency_key is not None:
        return f"{idempotency_key}-{index}" if batch else idempotency_key
    return uuid.uuid4().hex


def _admit(
    item: SubmittedRequest, field: str, *, request_id: str, client_id: str | None, now_ms: int
) -> LLMRequest:
    """The contract's request for a submitted one: its ID, its client, its creation time."""
    data = dict(item)
    data["request_id"] = request_id
    if client_id is not None:
        data["client_id"] = client_id  # the API key's identity, whatever the body said
    if data["created_at_ms"] is None:
        data["created_at_ms"] = now_ms
    try:
        return LLMRequest.model_validate(data)
    except ValidationError as exc:  # only the ID can be new here: one derived from the header
        prefix = tuple(field.split(".")) if field else ()
        errors = [{**e, "loc": ("body", *prefix, *e["loc"])} for e in exc.errors(include_url=False)]
        raise validation_error(errors, status=422) from None
