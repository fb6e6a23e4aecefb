"""The OpenAI Chat Completions front: its request and response shapes, to and from the contract.

Accepted: ``model`` (passed through as the request's model, e.g. ``openai/gpt-4o-mini``),
``messages`` (``content`` as a string or a list of text parts, joined with newlines; the
``developer`` role is sent as ``system``), ``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens`` (the latter wins), ``stop`` (a string or a list), ``user`` (kept in the
request's metadata), ``metadata``, ``n`` (1 only), ``stream`` and ``stream_options``
(``include_usage``). Anything else, such as ``tools`` or ``response_format``, is refused with a
400 naming it rather than silently ignored. ``"stream": true`` answers OpenAI's
``chat.completion.chunk`` Server-Sent Events (:mod:`ingress.chat_stream`).

Outcomes from ``llm-errors`` map to OpenAI's error body and a status the SDK understands; see
:func:`error_for`. :data:`routes` serves ``POST /v1/chat/completions``: it publishes the request
like ``POST /v1/requests`` does, then waits for its outcome.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from llmstream.core.clock import wall_clock_ms
from llmstream.ingress.auth import CallerDep
from llmstream.ingress.chat_stream import stream_chat
from llmstream.ingress.errors import ApiError, failure_message, validation_error
from llmstream.ingress.parts import (
    LedgerDep,
    ListenerDep,
    MetricsDep,
    PublisherDep,
    Routes,
    SettingsDep,
    chunk_hub,
)
from llmstream.ingress.requests_api import ERROR_RESPONSES, JSON_BODY_RESPONSES, IdempotencyKey
from llmstream.schemas.models import (
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    MAX_STOP_SEQUENCES,
    ChatMessage,
    LLMError,
    LLMRequest,
    LLMResponse,
    Metadata,
    ModelName,
)

_TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


def _join_text_parts(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise PydanticCustomError(
                "unsupported_content_part",
                "only text content parts are supported, got '{kind}'",
                {"kind": str(kind)[:40]},
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise PydanticCustomError("string_type", "a text part's 'text' must be a string")
        texts.append(text)
    return "\n".join(texts)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Content = Annotated[
    str,
    BeforeValidator(_join_text_parts),
    StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_CONTENT_CHARS},
                {"type": "array", "items": _TEXT_PART_SCHEMA, "minItems": 1},
            ]
        }
    ),
]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Stop = Annotated[
    list[StopSequence],
    BeforeValidator(_as_list),
    Field(max_length=MAX_STOP_SEQUENCES),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 256},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 256},
                    "maxItems": MAX_STOP_SEQUENCES,
                },
            ]
        }
    ),
]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]


class ChatCompletionMessageParam(BaseModel):
    """One input message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=256)] | None = None


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage``, a last chunk carries the usage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (the subset this gateway serves)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    messages: Annotated[
        list[ChatCompletionMessageParam], Field(min_length=1, max_length=MAX_MESSAGES)
    ]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: Stop | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    metadata: Metadata | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    stream: bool | None = Field(
        None, description="true: the answer as chat.completion.chunk Server-Sent Events."
    )
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("unsupported", "only n=1 is supported")
        return value


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A ``chat.completion`` object; ``id`` is the request ID (poll it at /v1/requests/{id})."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


def to_llm_request(
    body: ChatCompletionRequest, *, request_id: str, client_id: str | None, now_ms: int
) -> LLMRequest:
    """The contract's request for a Chat Completions body; 400 when it cannot be one."""
    metadata = dict(body.metadata or {})
    if body.user is not None:
        metadata.setdefault("user", body.user)
    max_tokens = body.max_completion_tokens or body.max_tokens
    try:
        return LLMRequest(
            request_id=request_id,
            model=body.model,
            messages=[
                ChatMessage(
                    role="system" if m.role == "developer" else m.role,
                    content=m.content,
                    name=m.name,
                )
                for m in body.messages
            ],
            temperature=body.temperature,
            max_tokens=max_tokens,
            top_p=body.top_p,
            stop=body.stop,
            metadata=metadata,
            client_id=client_id,
            created_at_ms=now_ms,
            stream=bool(body.stream),
        )
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False), status=400) from None


_FINISH_REASONS = {
    None: "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def finish_reason(response: LLMResponse) -> str:
    """OpenAI's ``finish_reason`` for a response's (providers name them differently)."""
    return _FINISH_REASONS.get(response.finish_reason, response.finish_reason) or "stop"


def chat_completion(response: LLMResponse) -> ChatCompletion:
    """The ``chat.completion`` object for a response from ``llm-responses``."""
    finish = finish_reason(response)
    created_ms = response.completed_at_ms or wall_clock_ms()
    return ChatCompletion(
        id=response.request_id,
        created=created_ms // 1000,
        model=response.model,
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(content=response.content),
                finish_reason=finish,
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            total_tokens=response.total_tokens,
        ),
    )


# The worker's error types, by who can act on them: the client (4xx) or the gateway (5xx).
# A provider's refusal of the gateway's credentials is the gateway's problem, not the caller's.
_STATUS = {
    "invalid_request": 400,
    # The model's provider is not set up on the workers: like an unknown model, the request's.
    "provider_not_configured": 400,
    "provider_unavailable": 503,
    "not_found": 404,
    "rate_limited": 429,
    "expired": 504,
    "timeout": 504,
}


def error_for(error: LLMError, headers: dict[str, str]) -> ApiError:
    """OpenAI's error answer for a failure from ``llm-errors``, in the client's words
    (:func:`failure_message`: the worker's message names provider endpoints)."""
    status = _STATUS.get(error.error_type, 502)
    return ApiError(
        status,
        failure_message(error),
        code=error.error_type,
        headers=headers,
        extra={"request_id": error.request_id},
    )


CHAT_PATH = "/v1/chat/completions"

routes = Routes(tags=["openai"])


@routes.post(
    CHAT_PATH,
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "The completion; with stream=true, chat.completion.chunk events",
        },
        400: {"description": "Invalid request (OpenAI error format)"},
        502: {"description": "The provider failed"},
        504: {"description": "No outcome in time; poll /v1/requests/{request_id}"},
        **ERROR_RESPONSES,
        **JSON_BODY_RESPONSES,
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    identity: CallerDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    publisher: PublisherDep,
    listener: ListenerDep,
    ledger: LedgerDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """OpenAI's Chat Completions, through Kafka: answered when the outcome arrives, or streamed
    as it is generated (``"stream": true``)."""
    request_id = idempotency_key or f"chatcmpl-{uuid.uuid4().hex}"
    now_ms = wall_clock_ms()
    event = publisher.event(
        to_llm_request(body, request_id=request_id, client_id=identity.client_id, now_ms=now_ms)
    )
    if body.stream:
        return await stream_chat(
            event,
            model=body.model,
            created=now_ms // 1000,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            identity=identity,
            settings=settings,
            metrics=metrics,
            publisher=publisher,
            listener=listener,
            hub=chunk_hub(request),
            ledger=ledger,
            finish_reason=finish_reason,
            failure=lambda error: error_for(error, {}),
        )
    # The request is past the point of no return once published: the SDK must not send it
    # again on its own (it would be a new request, and paid for again).
    final = {"x-request-id": request_id, "x-should-retry": "false"}
    started = time.perf_counter()
    async with listener.waiter(request_id) as waiter:
        [receipt] = await publisher.submit([event], identity.client_id, ["Idempotency-Key"])
        if receipt.failed:
            raise ApiError(
                503,
                "the request could not be published; retry",
                code="publish_failed",
                headers={"x-request-id": request_id, "Retry-After": "1"},
            )
        outcome = await waiter.result(settings.chat_timeout_s)
    waited = time.perf_counter() - started
    if outcome is None:
        metrics.wait_time.labels("timeout").observe(waited)
        raise ApiError(
            504,
            f"no outcome within {settings.chat_timeout_s:g} s; the request goes on: "
            f"poll GET /v1/requests/{request_id}",
            code="timeout",
            headers=final,
            extra={"request_id": request_id},
        )
    if identity.client_id is not None and outcome.client_id != identity.client_id:
        # The ID was free when reserved, yet the outcome is another request's (an event with
        # this ID produced straight to Kafka and processed first): not the caller's to read.
        raise ApiError(
            409,
            "Idempotency-Key: this request ID is used by another client",
            param="Idempotency-Key",
            code="request_id_taken",
            headers={"x-request-id": request_id},
        )
    metrics.outcomes.labels(waiter.source or "").inc()
    if isinstance(outcome, LLMError):
        metrics.wait_time.labels("error").observe(waited)
        raise error_for(outcome, final)
    metrics.wait_time.labels("completed").observe(waited)
    completion = chat_completion(outcome)
    return JSONResponse(completion.model_dump(mode="json"), headers=final)
