"""Pydantic models of the five events, mirroring the `.avsc` files field by field.

The `.avsc` files beside this module are the source of truth; `tests/test_schemas.py` proves the
models agree with them (names, types, nullability, defaults). Validation limits live here so every
producer in Python (the ingress, the worker, tests) rejects the same things with the same messages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

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
# Tools: OpenAI's limits where it has them (128 tools, names of 64 characters).
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_SERVER_TOOLS = 64
MAX_TOOL_NAME_CHARS = 64
MAX_DESCRIPTION_CHARS = 16_384
# A JSON object (tool parameters, a response format's schema), measured as compact UTF-8 JSON.
MAX_JSON_OBJECT_BYTES = 100_000

Role = Literal["system", "user", "assistant", "tool"]
MetricStatus = Literal["success", "error", "duplicate", "cache_hit", "expired"]
ServiceTier = Literal["standard", "flex", "batch", "auto"]
ToolChoiceMode = Literal["none", "auto", "required"]
ToolStepStatus = Literal["ok", "error"]

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
SessionId = RequestId
ToolName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=r"^[a-zA-Z0-9_-]+$"),
]
Description = Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)]
ToolCallId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class JsonText:
    """Marks a JSON object that Avro carries as its JSON text (a ``string`` with
    ``"logicalType": "json"``); JSON and the models carry the object itself. The codec converts."""


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # from Python: a value JSON cannot hold, or too deep
        raise ValueError(f"cannot be written as JSON ({exc})") from None
    if size > MAX_JSON_OBJECT_BYTES:
        raise ValueError(f"{size:,} bytes as compact JSON; the limit is {MAX_JSON_OBJECT_BYTES:,}")
    return value


JsonObject = Annotated[dict[str, Any], JsonText(), AfterValidator(_bounded_json)]


class _Broken:
    """The fields that break a rule across fields, raised together as one ValidationError.

    Raised from a model validator, each error gets the model's own location in front, so the path
    reads ``messages.2.tool_call_id`` wherever the message is.
    """

    def __init__(self, model: BaseModel) -> None:
        self._title = type(model).__name__
        self._errors: list[InitErrorDetails] = []

    def add(self, loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> None:
        # kind becomes the error's type: a code a client can act on (the ingress returns it).
        error = PydanticCustomError(kind, message)
        self._errors.append(InitErrorDetails(type=error, loc=loc, input=value))

    def raise_any(self) -> None:
        if self._errors:
            raise ValidationError.from_exception_data(self._title, self._errors)


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


class FunctionCall(_Event):
    """The function a model called and its arguments."""

    name: ToolName
    # The JSON text of the arguments object, exactly as the provider sent it: a model may write
    # JSON that does not parse, and whoever runs the tool reports that back to it.
    arguments: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]


class ToolCall(_Event):
    """A model's request to call a tool (OpenAI's shape)."""

    id: ToolCallId
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Event):
    """One message of a conversation.

    ``content`` may be null or empty only in an assistant message that carries ``tool_calls``;
    a ``tool`` message answers one call and names it in ``tool_call_id``.
    """

    role: Role
    content: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOL_CALLS)] | None = (
        None
    )
    tool_call_id: ToolCallId | None = None

    @model_validator(mode="after")
    def _roles_and_tools(self) -> Self:
        plain = self.tool_calls is None and self.tool_call_id is None and self.role != "tool"
        if plain and self.content:
            return self  # the common message: nothing to check (the decode's hot path)
        broken = _Broken(self)
        if self.tool_calls is not None and self.role != "assistant":
            broken.add(
                ("tool_calls",),
                "tool_calls_not_allowed",
                f"only an assistant message carries tool_calls, not a {self.role} message",
                self.tool_calls,
            )
        if not self.content and not (self.role == "assistant" and self.tool_calls):
            broken.add(
                ("content",),
                "content_required",
                "String should have at least 1 character (only an assistant message with "
                "tool_calls may leave content null or empty)",
                self.content,
            )
        if self.role == "tool" and self.tool_call_id is None:
            broken.add(
                ("tool_call_id",),
                "tool_call_id_required",
                "Field required in a tool message: the ID of the call it answers",
                None,
            )
        elif self.role != "tool" and self.tool_call_id is not None:
            broken.add(
                ("tool_call_id",),
                "tool_call_id_not_allowed",
                f"only a tool message has a tool_call_id, not a {self.role} message",
                self.tool_call_id,
            )
        broken.raise_any()
        return self


class ToolFunction(_Event):
    """A function the model may call: its name, what it does, and its parameters' JSON Schema."""

    name: ToolName
    description: Description | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(_Event):
    """A tool offered to the model (OpenAI's shape)."""

    type: Literal["function"] = "function"
    function: ToolFunction


class NamedFunction(_Event):
    """A function named in ``tool_choice``."""

    name: ToolName


class ToolChoiceFunction(_Event):
    """``tool_choice`` forcing one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: NamedFunction


_TOOL_CHOICE_MODE: TypeAdapter[ToolChoiceMode] = TypeAdapter(ToolChoiceMode)


def _tool_choice(value: object, _union: object) -> ToolChoiceMode | ToolChoiceFunction:
    # Validated by hand rather than as the union, so an error names tool_choice (or the field in
    # it), not tool_choice.literal['none','auto','required'] and tool_choice.ToolChoiceFunction.
    # A wrap validator, not a plain one, so the union still serializes the value.
    if isinstance(value, str):
        return _TOOL_CHOICE_MODE.validate_python(value, strict=True)
    return ToolChoiceFunction.model_validate(value)


ToolChoice = Annotated[ToolChoiceMode | ToolChoiceFunction, WrapValidator(_tool_choice)]


class JsonSchemaFormat(_Event):
    """The JSON Schema an answer must follow (``response_format.json_schema``)."""

    name: ToolName
    description: Description | None = None
    # "schema" is a (deprecated) BaseModel method: the field keeps the name on the wire through
    # its alias; in Python it is ``schema_``, built with ``JsonSchemaFormat(schema=...)``.
    schema_: JsonObject | None = Field(default=None, alias="schema")
    strict: bool | None = None


ResponseFormatType = Literal["text", "json_object", "json_schema"]


class ResponseFormat(_Event):
    """The shape of the answer: text, any JSON object, or JSON following ``json_schema``."""

    type: ResponseFormatType
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> Self:
        broken = _Broken(self)
        if self.type == "json_schema" and self.json_schema is None:
            broken.add(
                ("json_schema",), "json_schema_required", "type json_schema needs json_schema", None
            )
        elif self.type != "json_schema" and self.json_schema is not None:
            broken.add(
                ("json_schema",),
                "json_schema_not_allowed",
                f"json_schema goes with type json_schema, not {self.type}",
                self.json_schema,
            )
        broken.raise_any()
        return self


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
    session_id: SessionId | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    server_tools: Annotated[list[ToolName], Field(max_length=MAX_SERVER_TOOLS)] = Field(
        default_factory=list
    )
    service_tier: ServiceTier | None = None

    @model_validator(mode="after")
    def _tools_agree(self) -> Self:
        if not self.tools and not self.server_tools and self.tool_choice is None:
            return self  # no tools: nothing to agree (the decode's hot path)
        broken = _Broken(self)
        offered = [tool.function.name for tool in self.tools or ()]
        for i, name in enumerate(offered):
            if name in offered[:i]:
                broken.add(
                    ("tools", i, "function", "name"),
                    "duplicate_tool",
                    f"tool {name} is in tools twice",
                    name,
                )
        for i, name in enumerate(self.server_tools):
            if name in offered or name in self.server_tools[:i]:
                where = "tools" if name in offered else "server_tools"
                broken.add(
                    ("server_tools", i), "duplicate_tool", f"tool {name} is in {where} too", name
                )
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceFunction):
            name = choice.function.name
            if name not in offered and name not in self.server_tools:
                broken.add(
                    ("tool_choice", "function", "name"),
                    "unknown_tool",
                    f"tool_choice names {name}, which is in neither tools nor server_tools",
                    name,
                )
        elif choice == "required" and not offered and not self.server_tools:
            broken.add(
                ("tool_choice",),
                "tools_required",
                "tool_choice required needs tools or server_tools",
                choice,
            )
        broken.raise_any()
        return self


class ToolStep(_Event):
    """One call of an operator-registered tool in the worker's own tool loop."""

    tool: str
    call_id: str
    arguments: str  # JSON text, as the model wrote it
    status: ToolStepStatus
    latency_ms: NonNegativeMs
    error: str | None = None


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
    tool_calls: list[ToolCall] | None = None
    tool_steps: list[ToolStep] = Field(default_factory=list)
    session_id: str | None = None
    service_tier: str | None = None


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
    service_tier: str | None = None


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
    tool_steps: list[ToolStep] = Field(default_factory=list)
    session_id: str | None = None


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
