"""The OpenAI Chat Completions front: its request and response shapes, to and from the contract.

Accepted: ``model`` (passed through as the request's model, e.g. ``openai/gpt-4o-mini``),
``messages`` (``content`` as a string or a list of text parts, joined with newlines; the
``developer`` role is sent as ``system``; assistant messages with ``tool_calls`` and null
content, ``tool`` messages with ``tool_call_id``), ``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens`` (the latter wins), ``stop`` (a string or a list), ``user`` (kept in the
request's metadata), ``metadata``, ``n`` (1 only), ``stream`` and ``stream_options``
(``include_usage``), ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``
and ``service_tier`` (``default`` is the contract's ``standard``; ``auto`` and ``flex`` as they
are). llmstream's own fields come as extra body fields (the openai SDK's ``extra_body``):
``session_id`` and ``server_tools``. The deprecated ``functions`` and ``function_call`` are
refused, saying to use ``tools``; anything else unknown is refused with a 400 naming it rather
than silently ignored. ``"stream": true`` answers OpenAI's ``chat.completion.chunk``
Server-Sent Events (:mod:`ingress.chat_stream`).

An answer in which the model called tools carries ``message.tool_calls`` (OpenAI's shape),
``finish_reason: "tool_calls"`` and, when the model said nothing else, ``content: null``: the
SDK's function-calling loop runs the tools and sends their results back as ``tool`` messages.

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
    ValidationInfo,
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
from llmstream.ingress.requests_api import (
    ERROR_RESPONSES,
    JSON_BODY_RESPONSES,
    IdempotencyKey,
    check_sessions,
)
from llmstream.schemas.models import (
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    MAX_SERVER_TOOLS,
    MAX_STOP_SEQUENCES,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    FunctionCall,
    LLMError,
    LLMRequest,
    LLMResponse,
    Metadata,
    ModelName,
    ResponseFormat,
    ServiceTier,
    SessionId,
    Tool,
    ToolCall,
    ToolCallId,
    ToolChoice,
    ToolName,
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


# At least one character, except in an assistant message that calls tools (the contract's rule,
# checked when the request is made from the body).
Content = Annotated[
    str,
    BeforeValidator(_join_text_parts),
    StringConstraints(max_length=MAX_CONTENT_CHARS),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": MAX_CONTENT_CHARS},
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

# OpenAI's service tiers and the contract's: "default" is the standard tier.
_TIERS: dict[str, ServiceTier] = {"default": "standard", "auto": "auto", "flex": "flex"}
_OPENAI_TIERS = {"standard": "default"}
# In a request, function_call is replaced by tool_choice; in a message, by tool_calls.
_REPLACED = {"functions": "tools", "function_call": "tools (tool_choice, tool_calls)"}


def _deprecated(field: str) -> PydanticCustomError:
    return PydanticCustomError(
        "deprecated",
        "{field} is OpenAI's deprecated function calling and is not supported; use {instead}",
        {"field": field, "instead": _REPLACED.get(field, "tools")},
    )


class CalledFunction(BaseModel):
    """The function an assistant message called, and its arguments' JSON text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ToolName
    arguments: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]
    parsed_arguments: Any = Field(None, description="Ignored (the SDK's stream helper's parse)")


class ToolCallParam(BaseModel):
    """A tool call of an assistant message, as the answer carried it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: ToolCallId
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = Field(None, description="Ignored (where the SDK's stream helper put it)")

    def contract(self) -> ToolCall:
        called = FunctionCall(name=self.function.name, arguments=self.function.arguments)
        return ToolCall(id=self.id, function=called)


class ChatCompletionMessageParam(BaseModel):
    """One input message.

    An answer's message goes back as the SDK holds it: with ``refusal``, and, from the SDK's
    stream helper, ``annotations``, ``audio``, ``function_call`` and ``parsed`` (all null) and
    each tool call's ``index`` and ``parsed_arguments``. Those are the SDK's, not the model's:
    accepted and not passed on. A ``function_call`` or ``audio`` that is set is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = Field(
        None, description="Null only in an assistant message that carries tool_calls"
    )
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCallParam], Field(max_length=MAX_TOOL_CALLS)] | None = Field(
        None, description="An assistant message's calls (as the answer carried them)"
    )
    tool_call_id: ToolCallId | None = Field(
        None, description="A tool message's: the ID of the call it answers"
    )
    # The SDK sends an answer's message back as it was received, refusal included.
    refusal: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] | None = None
    annotations: list[Any] | None = Field(None, description="Ignored")
    parsed: Any = Field(None, description="Ignored (the SDK's parse of content)")
    audio: None = Field(None, description="Null only: no audio answers here")
    function_call: Any = Field(None, description="Deprecated; null only: use tool_calls")

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> None:
        if value is not None:
            raise _deprecated("function_call")

    def contract(self) -> dict[str, Any]:
        """The fields of the contract's message (whose rules are checked as it is made)."""
        content = self.content
        if self.refusal and not content:
            content = self.refusal  # what the model said, in a refusal's words
        return {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
            "name": self.name,
            "tool_calls": [call.contract() for call in self.tool_calls or ()] or None,
            "tool_call_id": self.tool_call_id,
        }


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
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    service_tier: Literal["default", "auto", "flex"] | None = Field(
        None, description="default: the standard tier; flex: cheaper, slower, may wait"
    )
    # llmstream's own (the openai SDK sends them with extra_body).
    session_id: SessionId | None = Field(
        None,
        description="Answer after the session's history and append this turn to it "
        "(a new ID starts a session; see /v1/sessions)",
    )
    server_tools: Annotated[list[ToolName], Field(max_length=MAX_SERVER_TOOLS)] | None = Field(
        None, description="Operator-registered tools the worker may run for the model"
    )
    # OpenAI's deprecated function calling: named, so the refusal can say what replaces it.
    functions: Any = Field(None, description="Deprecated; refused: use tools")
    function_call: Any = Field(None, description="Deprecated; refused: use tool_choice")

    @field_validator("functions", "function_call")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        raise _deprecated(info.field_name or "")

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
    tool_calls: list[ToolCall] | None = Field(
        None, description="The tools the model calls (absent when it calls none)"
    )


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
    service_tier: str | None = None

    def body(self) -> dict[str, Any]:
        """As JSON, leaving out ``tool_calls`` when there are none, as OpenAI does (the SDK
        sends a message back as it received it)."""
        body = self.model_dump(mode="json")
        for choice in body["choices"]:
            if choice["message"]["tool_calls"] is None:
                del choice["message"]["tool_calls"]
        return body


def to_llm_request(
    body: ChatCompletionRequest, *, request_id: str, client_id: str | None, now_ms: int
) -> LLMRequest:
    """The contract's request for a Chat Completions body; 400 when it cannot be one."""
    metadata = dict(body.metadata or {})
    if body.user is not None:
        metadata.setdefault("user", body.user)
    max_tokens = body.max_completion_tokens or body.max_tokens
    fields: dict[str, Any] = {
        "request_id": request_id,
        "model": body.model,
        "messages": [message.contract() for message in body.messages],
        "temperature": body.temperature,
        "max_tokens": max_tokens,
        "top_p": body.top_p,
        "stop": body.stop,
        "metadata": metadata,
        "client_id": client_id,
        "created_at_ms": now_ms,
        "stream": bool(body.stream),
        "session_id": body.session_id,
        "tools": body.tools,
        "tool_choice": body.tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": body.response_format,
        "server_tools": body.server_tools or [],
        "service_tier": _TIERS[body.service_tier] if body.service_tier else None,
    }
    try:
        # The messages are checked here, by the contract's rules (content, tool_call_id ...).
        return LLMRequest.model_validate(fields)
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
    if response.finish_reason is None and response.tool_calls:
        return "tool_calls"
    return _FINISH_REASONS.get(response.finish_reason, response.finish_reason) or "stop"


def openai_tier(response: LLMResponse) -> str | None:
    """OpenAI's name of the tier that served the response (``default`` for ``standard``)."""
    tier = response.service_tier
    return _OPENAI_TIERS.get(tier, tier) if tier is not None else None


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
                message=ChatCompletionMessage(
                    # A model that only called tools said nothing: null, as OpenAI answers.
                    content=(response.content or None) if response.tool_calls else response.content,
                    tool_calls=response.tool_calls or None,
                ),
                finish_reason=finish,
            )
        ],
        usage=CompletionUsage(
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            total_tokens=response.total_tokens,
        ),
        service_tier=openai_tier(response),
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
        404: {"description": "session_id names another client's session (with API keys)"},
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
    llm_request = to_llm_request(
        body, request_id=request_id, client_id=identity.client_id, now_ms=now_ms
    )
    event = publisher.event(llm_request)
    await check_sessions(request, [llm_request], [""], identity)
    if body.stream:
        return await stream_chat(
            event,
            model=body.model,
            created=now_ms // 1000,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            tools_offered=bool(body.tools),
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
        await publisher.submit_chat(event, identity.client_id)
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
    return JSONResponse(completion.body(), headers=final)
