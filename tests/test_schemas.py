"""The `.avsc` files and the pydantic models agree field by field.

The walk is generic: it reads each model's ``model_fields`` and the raw `.avsc` JSON and follows
nested records (``ChatMessage``, ``LLMError.request``), so a field added on one side only fails.
"""

from __future__ import annotations

import json
import re
import types
from importlib.resources import files
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from llmstream.schemas.models import (
    ChatMessage,
    JsonObject,
    JsonText,
    LLMError,
    ToolCall,
    ToolChoice,
)
from tests.samples import SCHEMA_FILES

NAMESPACE = "llmstream"
INT_RANGE = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


def load_avsc(filename: str) -> Any:
    return json.loads(files("llmstream.schemas").joinpath(filename).read_text(encoding="utf-8"))


def named_records() -> dict[str, dict[str, Any]]:
    """Every named record of the schema files, by full name, so references can be followed.

    A record defined in several files (ToolCall, ToolStep) must be the same in each.
    """
    found: dict[str, dict[str, Any]] = {}

    def collect(avro_type: Any) -> None:
        if isinstance(avro_type, list):
            for branch in avro_type:
                collect(branch)
        elif isinstance(avro_type, dict):
            if avro_type["type"] == "record":
                name = f"{NAMESPACE}.{avro_type['name']}"
                assert found.get(name, avro_type) == avro_type, f"{name} differs between files"
                found[name] = avro_type
                for field in avro_type["fields"]:
                    collect(field["type"])
            collect(avro_type.get("items"))
            collect(avro_type.get("values"))

    for filename in SCHEMA_FILES.values():
        collect(load_avsc(filename))
    return found


def split_nullable(annotation: Any) -> tuple[bool, list[Any]]:
    """``(True, [T, ...])`` for ``T | ... | None``, else ``(False, [the union's members])``.

    A union inside ``Annotated`` (``ToolChoice``, validated by hand) counts as its members.
    """
    if get_origin(annotation) in (Union, types.UnionType):
        members = [
            member
            for arg in get_args(annotation)
            for member in (split_nullable(arg)[1] if is_annotated_union(arg) else [arg])
        ]
        args = [arg for arg in members if arg is not type(None)]
        return len(args) < len(members), args
    if is_annotated_union(annotation):
        return split_nullable(get_args(annotation)[0])
    return False, [annotation]


def is_annotated_union(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and get_origin(get_args(annotation)[0]) in (
        Union,
        types.UnionType,
    )


def unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """The bare type under ``Annotated[...]`` and every constraint found on the way."""
    metadata = list(metadata)
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return annotation, metadata


def int_bounds(metadata: list[Any]) -> tuple[Any, Any]:
    low: Any = None
    high: Any = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = int(item.gt) + 1  # type: ignore[call-overload]
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = int(item.lt) - 1  # type: ignore[call-overload]
    return low, high


class Walk:
    """Compares a model with an Avro record, recursing into nested records."""

    def __init__(self) -> None:
        self.named = named_records()
        self.visited: set[str] = set()

    def record(self, model: type[BaseModel], record: Any, where: str) -> None:
        if isinstance(record, str):
            assert record in self.named, f"{where}: unknown named type {record}"
            record = self.named[record]
        assert isinstance(record, dict) and record["type"] == "record", f"{where}: not a record"
        assert record["name"] == model.__name__, f"{where}: record name {record['name']}"
        # A field's name on the wire is its alias when it has one (JsonSchemaFormat.schema).
        wire_names = {info.alias or name: info for name, info in model.model_fields.items()}
        assert [f["name"] for f in record["fields"]] == list(wire_names), (
            f"{where}: field names or order differ"
        )
        self.visited.add(model.__name__)
        for avro_field in record["fields"]:
            info = wire_names[avro_field["name"]]
            self.field(info, avro_field, f"{model.__name__}.{avro_field['name']}")

    def field(self, info: FieldInfo, avro_field: dict[str, Any], where: str) -> None:
        nullable, members = split_nullable(info.annotation)
        avro_type = avro_field["type"]
        if nullable:
            # "null" first, so that null is a legal default (Avro: a union's default is its first).
            assert isinstance(avro_type, list) and avro_type[0] == "null", (
                f"{where}: optional in the model, so must be ['null', ...] in Avro"
            )
            branches = avro_type[1:]
        else:
            assert not isinstance(avro_type, list), f"{where}: union in Avro, not optional in model"
            branches = [avro_type]
        # The members of a union (tool_choice: a mode or a function) are its branches, in order.
        assert len(members) == len(branches), (
            f"{where}: {len(members)} types, {len(branches)} in Avro"
        )
        for member, branch in zip(members, branches, strict=True):
            self.type(member, info.metadata, branch, where)

        if info.is_required():
            assert "default" not in avro_field, f"{where}: required in the model, defaulted in Avro"
        else:
            assert "default" in avro_field, f"{where}: defaulted in the model, not in Avro"
            default = info.get_default(call_default_factory=True)
            # Through JSON, so that False and 0 (equal in Python) are told apart.
            assert json.dumps(avro_field["default"]) == json.dumps(default), (
                f"{where}: Avro default {avro_field['default']!r}, model default {default!r}"
            )

    def type(self, annotation: Any, metadata: list[Any], avro_type: Any, where: str) -> None:
        annotation, metadata = unwrap(annotation, metadata)
        origin = get_origin(annotation)
        if any(isinstance(item, JsonText) for item in metadata):
            # A JSON object in the model and in JSON; its JSON text in Avro.
            assert origin is dict, f"{where}: JSON text holds an object (dict) in the model"
            assert avro_type == {"type": "string", "logicalType": "json"}, (
                f"{where}: a JSON object is a string of logicalType json in Avro, got {avro_type!r}"
            )
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            self.record(annotation, avro_type, where)
        elif annotation is str or origin is Literal:
            if origin is Literal:
                assert all(isinstance(v, str) for v in get_args(annotation)), where
            assert avro_type == "string", f"{where}: str is 'string', got {avro_type!r}"
        elif annotation is bool:
            assert avro_type == "boolean", f"{where}: bool is 'boolean', got {avro_type!r}"
        elif annotation is int:
            assert avro_type in INT_RANGE, f"{where}: int is 'int' or 'long', got {avro_type!r}"
            low, high = int_bounds(metadata)
            min_avro, max_avro = INT_RANGE[avro_type]
            assert low is not None and low >= min_avro, (
                f"{where}: model allows below Avro {avro_type}"
            )
            assert high is not None and high <= max_avro, (
                f"{where}: model allows above Avro {avro_type}"
            )
        elif annotation is float:
            assert avro_type == "double", f"{where}: float is 'double', got {avro_type!r}"
        elif annotation is bytes:
            assert avro_type == "bytes", f"{where}: bytes is 'bytes', got {avro_type!r}"
        elif origin is list:
            assert isinstance(avro_type, dict) and avro_type["type"] == "array", f"{where}: array"
            (item,) = get_args(annotation)
            self.type(item, [], avro_type["items"], f"{where}[]")
        elif origin is dict:
            assert isinstance(avro_type, dict) and avro_type["type"] == "map", f"{where}: map"
            key, value = get_args(annotation)
            assert unwrap(key, [])[0] is str, f"{where}: Avro map keys are strings"
            self.type(value, [], avro_type["values"], f"{where}{{}}")
        else:
            pytest.fail(f"{where}: no Avro mapping for {annotation!r}")


@pytest.mark.parametrize("model", list(SCHEMA_FILES), ids=lambda m: m.__name__)
def test_model_and_avsc_agree(model: type[BaseModel]) -> None:
    schema = load_avsc(SCHEMA_FILES[model])
    assert schema["namespace"] == NAMESPACE
    Walk().record(model, schema, SCHEMA_FILES[model])


def test_walk_reaches_nested_records() -> None:
    walk = Walk()
    walk.record(LLMError, load_avsc("llm_error.avsc"), "llm_error.avsc")
    assert walk.visited == {
        "LLMError",
        "LLMRequest",
        "ChatMessage",
        "ToolCall",
        "FunctionCall",
        "Tool",
        "ToolFunction",
        "ToolChoiceFunction",
        "NamedFunction",
        "ResponseFormat",
        "JsonSchemaFormat",
        "ToolStep",
    }
    assert load_avsc("llm_error.avsc")["fields"][9]["type"] == ["null", "llmstream.LLMRequest"]


def test_every_record_and_field_has_a_doc() -> None:
    for name, record in named_records().items():
        assert record.get("doc"), name
        for field in record["fields"]:
            assert field.get("doc"), f"{name}.{field['name']}"


def test_milliseconds_and_offsets_are_long() -> None:
    # Epoch milliseconds overflowed a 32-bit int in 1970; offsets grow without bound.
    for name, record in named_records().items():
        for field in record["fields"]:
            if field["name"].endswith(("_ms", "_offset")):
                assert field["type"] in ("long", ["null", "long"]), f"{name}.{field['name']}"


# The walk itself must be able to fail: each of these models disagrees with a record in one way.
class Reordered(BaseModel):
    content: str | None = None
    role: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class RequiredName(BaseModel):
    role: str
    content: str | None = None
    name: str | None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class WrongDefault(BaseModel):
    role: str
    content: str | None = None
    name: str | None = "anonymous"
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class WrongType(BaseModel):
    role: str
    content: bytes | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class UnboundedInt(BaseModel):
    count: Annotated[int, Field(ge=0)]


class JsonNotText(BaseModel):
    parameters: JsonObject | None = None


class SwappedUnion(BaseModel):
    choice: ToolChoice | None = None


def record_of(name: str, *fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


@pytest.mark.parametrize(
    ("model", "record", "words"),
    [
        (Reordered, "llmstream.ChatMessage", "field names or order differ"),
        (RequiredName, "llmstream.ChatMessage", "required in the model, defaulted in Avro"),
        (WrongDefault, "llmstream.ChatMessage", "Avro default None, model default 'anonymous'"),
        (WrongType, "llmstream.ChatMessage", "bytes is 'bytes', got 'string'"),
        (ChatMessage, record_of("ChatMessage"), "field names or order differ"),
        (UnboundedInt, record_of("UnboundedInt", {"name": "count", "type": "int"}), "above Avro"),
        (
            JsonNotText,
            record_of(
                "JsonNotText", {"name": "parameters", "type": ["null", "string"], "default": None}
            ),
            "a JSON object is a string of logicalType json",
        ),
        (
            SwappedUnion,
            record_of(
                "SwappedUnion",
                {
                    "name": "choice",
                    "type": ["null", "llmstream.ToolChoiceFunction", "string"],
                    "default": None,
                },
            ),
            "str is 'string'",
        ),
    ],
    ids=["order", "required", "default", "type", "missing-fields", "int-range", "json", "union"],
)
def test_walk_detects_disagreement(model: type[BaseModel], record: Any, words: str) -> None:
    walk = Walk()
    if isinstance(record, str):
        walk.named[record] = {**walk.named[record], "name": model.__name__}
    with pytest.raises(AssertionError, match=re.escape(words)):
        walk.record(model, record, "deliberately wrong")
