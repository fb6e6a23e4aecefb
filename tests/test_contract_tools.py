"""The contract for tools, sessions and tiers: what a producer may send, and the errors that name
the field when it breaks a rule (in JSON, in Avro, and for a Python producer using the models).

``tests/payloads/contract_tools/`` holds events with every new field set, as a producer types them.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastavro import schemaless_reader, schemaless_writer
from pydantic import ValidationError

from llmstream.schemas import (
    ChatMessage,
    DecodeError,
    LLMError,
    LLMRequest,
    WireFormat,
    decode,
    encode,
)
from llmstream.schemas.codec import fingerprint_for, schema_for
from llmstream.schemas.models import FunctionCall, ToolCall

TOOL_REQUEST = decode(
    (Path(__file__).parent / "payloads" / "contract_tools" / "request.json").read_bytes(),
    LLMRequest,
)
MINIMAL = {"request_id": "r1", "model": "m", "messages": [{"role": "user", "content": "x"}]}


def request_dict(**changes: Any) -> dict[str, Any]:
    return {**MINIMAL, **changes}


def avro_bytes(model: type[LLMRequest] | type[LLMError], record: dict[str, Any]) -> bytes:
    """Avro bytes written by plain fastavro, without the model's validation."""
    buffer = BytesIO()
    buffer.write(b"\xc3\x01" + fingerprint_for(model).to_bytes(8, "little"))
    schemaless_writer(buffer, schema_for(model), record)
    return buffer.getvalue()


def avro_request(**changes: Any) -> bytes:
    return avro_bytes(LLMRequest, request_dict(**changes))


def assert_names_field(data: bytes, field: str, words: str, model: type[Any] = LLMRequest) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(data, model)
    error = caught.value
    assert (error.kind, error.field) == ("invalid_request", field)
    assert str(error).startswith(f"{field}: ")
    assert words in str(error)


def test_json_objects_are_objects_in_json_and_their_text_in_avro() -> None:
    assert TOOL_REQUEST.tools is not None
    parameters = TOOL_REQUEST.tools[0].function.parameters
    assert parameters is not None and parameters["required"] == ["city"]
    obj = orjson.loads(encode(TOOL_REQUEST))
    assert obj["tools"][0]["function"]["parameters"] == parameters
    assert obj["response_format"]["json_schema"]["schema"]["nested"][4] == {"é": "✓"}
    assert "schema_" not in json.dumps(obj)

    record = schemaless_reader(
        BytesIO(encode(TOOL_REQUEST, WireFormat.AVRO)[10:]), schema_for(LLMRequest), None
    )
    text = record["tools"][0]["function"]["parameters"]
    assert isinstance(text, str) and orjson.loads(text) == parameters
    assert record["tools"][1]["function"]["parameters"] is None
    assert orjson.loads(record["response_format"]["json_schema"]["schema"])["nested"][1] == 2.5


HI = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "get_weather"}}
TOOLS_INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "tool-message-without-call-id": (
        {"messages": [HI, {"role": "tool", "content": "18"}]},
        "messages.1.tool_call_id",
        "Field required in a tool message",
    ),
    "call-id-outside-tool-message": (
        {"messages": [{**HI, "tool_call_id": "c1"}]},
        "messages.0.tool_call_id",
        "only a tool message has a tool_call_id, not a user message",
    ),
    "assistant-with-neither-content-nor-tool-calls": (
        {"messages": [HI, {"role": "assistant", "content": None}]},
        "messages.1.content",
        "only an assistant message with tool_calls may leave content null or empty",
    ),
    "user-with-null-content": (
        {"messages": [{"role": "user", "content": None}]},
        "messages.0.content",
        "at least 1 character",
    ),
    "tool-calls-outside-assistant": (
        {"messages": [{**HI, "tool_calls": [CALL]}]},
        "messages.0.tool_calls",
        "only an assistant message carries tool_calls, not a user message",
    ),
    "empty-tool-calls": (
        {"messages": [HI, {"role": "assistant", "content": "", "tool_calls": []}]},
        "messages.1.tool_calls",
        "at least 1 item",
    ),
    "tool-name-with-a-space": (
        {"tools": [{"function": {"name": "get weather"}}]},
        "tools.0.function.name",
        "should match pattern",
    ),
    "tool-name-too-long": (
        {"tools": [{"function": {"name": "x" * 65}}]},
        "tools.0.function.name",
        "at most 64 characters",
    ),
    "called-tool-name": (
        {
            "messages": [
                HI,
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "a.b", "arguments": ""}}],
                },
            ]
        },
        "messages.1.tool_calls.0.function.name",
        "should match pattern",
    ),
    "tool-type": (
        {"tools": [{**TOOL, "type": "retrieval"}]},
        "tools.0.type",
        "'function'",
    ),
    "duplicate-tool": (
        {"tools": [TOOL, TOOL]},
        "tools.1.function.name",
        "get_weather is in tools twice",
    ),
    "server-tool-also-in-tools": (
        {"tools": [TOOL], "server_tools": ["get_weather"]},
        "server_tools.0",
        "get_weather is in tools too",
    ),
    "tool-choice-names-another-tool": (
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "search"}}},
        "tool_choice.function.name",
        "tool_choice names search, which is in neither tools nor server_tools",
    ),
    "tool-choice-required-without-tools": (
        {"tool_choice": "required"},
        "tool_choice",
        "required needs tools or server_tools",
    ),
    "tool-choice-mode": (
        {"tool_choice": "sometimes"},
        "tool_choice",
        "Input should be 'none', 'auto' or 'required'",
    ),
    "parameters-not-an-object": (
        {"tools": [{"function": {"name": "f", "parameters": [1]}}]},
        "tools.0.function.parameters",
        "Input should be an object",
    ),
    "parameters-too-large": (
        {"tools": [{"function": {"name": "f", "parameters": {"d": "x" * 100_000}}}]},
        "tools.0.function.parameters",
        "the limit is 100,000",
    ),
    "json-schema-missing": (
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "type json_schema needs json_schema",
    ),
    "json-schema-with-type-text": (
        {"response_format": {"type": "text", "json_schema": {"name": "x"}}},
        "response_format.json_schema",
        "json_schema goes with type json_schema, not text",
    ),
    "response-format-type": (
        {"response_format": {"type": "yaml"}},
        "response_format.type",
        "'text', 'json_object' or 'json_schema'",
    ),
    "service-tier": (
        {"service_tier": "fast"},
        "service_tier",
        "'standard', 'flex', 'batch' or 'auto'",
    ),
    "session-id-with-a-newline": ({"session_id": "a\nb"}, "session_id", "should match pattern"),
    "too-many-server-tools": (
        {"server_tools": [f"t{i}" for i in range(65)]},
        "server_tools",
        "at most 64 items",
    ),
}


# Avro carries parameters as JSON text, not as an object: those cases are JSON's alone.
IN_AVRO = [case for case in TOOLS_INVALID if "parameters" not in case]


@pytest.mark.parametrize("case", list(TOOLS_INVALID))
def test_invalid_json_request_names_the_field(case: str) -> None:
    changes, field, words = TOOLS_INVALID[case]
    assert_names_field(json.dumps(request_dict(**changes)).encode(), field, words)


@pytest.mark.parametrize("case", IN_AVRO)
def test_invalid_avro_request_names_the_field(case: str) -> None:
    changes, field, words = TOOLS_INVALID[case]
    assert_names_field(avro_request(**changes), field, words)


def with_parameters(text: str) -> dict[str, Any]:
    return {"tools": [{**TOOL, "function": {"name": "f", "parameters": text}}]}


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        (with_parameters("{not json"), "tools.0.function.parameters", "not valid JSON text"),
        (with_parameters("[1, 2]"), "tools.0.function.parameters", "JSON text of array, not"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": "7"},
                }
            },
            "response_format.json_schema.schema",
            "JSON text of number, not of an object",
        ),
    ],
    ids=["not-json", "array", "number"],
)
def test_avro_json_text_that_is_not_an_object_names_the_field(
    changes: dict[str, Any], field: str, words: str
) -> None:
    assert_names_field(avro_request(**changes), field, words)
    # The same request inside an error event: the path starts at the error's field.
    error = {"request_id": None, "error_type": "x", "message": "x", "occurred_at_ms": 1}
    data = avro_bytes(LLMError, {**error, "request": request_dict(**changes)})
    assert_names_field(data, f"request.{field}", words, LLMError)


def test_a_python_producer_sees_the_same_field_paths() -> None:
    # The ingress builds requests with the models: the error's loc is the field's path.
    with pytest.raises(ValidationError) as caught:
        LLMRequest.model_validate(
            request_dict(
                messages=[HI, {"role": "tool", "content": "18"}],
                tools=[TOOL],
                tool_choice={"type": "function", "function": {"name": "search"}},
            )
        )
    errors = caught.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [
        (("messages", 1, "tool_call_id"), "tool_call_id_required"),
    ]
    # Rules across fields of the request run once its fields are valid.
    with pytest.raises(ValidationError) as caught:
        LLMRequest.model_validate(
            request_dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}})
        )
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [
        (("tool_choice", "function", "name"), "unknown_tool")
    ]


def test_an_assistant_message_with_tool_calls_may_have_no_content() -> None:
    for content in (None, ""):
        message = ChatMessage(
            role="assistant",
            content=content,
            tool_calls=[ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"))],
        )
        assert message.content == content
