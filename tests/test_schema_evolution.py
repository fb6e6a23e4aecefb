"""Schema evolution: events written with an earlier contract still decode, and consumers of the
earlier contract still read what is written now, whenever the event uses nothing added since.

``tests/payloads/contract_v1/`` holds the contract before streaming, tools, sessions and tiers
(issues 14 to 16): its four ``.avsc`` files, and each sample event of that time as its codec wrote
it, in JSON and in Avro single-object encoding. Those bytes are what producers and topics may still
hold during and after an upgrade, and what consumers not yet upgraded can read.
"""

from __future__ import annotations

from importlib.resources import files
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel

from llmstream.schemas import (
    DecodeError,
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
    WireFormat,
    decode,
    encode,
)
from llmstream.schemas.codec import schema_for

V1 = Path(__file__).parent / "payloads" / "contract_v1"
TOOLS = Path(__file__).parent / "payloads" / "contract_tools"
MODELS: dict[str, type[BaseModel]] = {
    "request": LLMRequest,
    "response": LLMResponse,
    "metric": LLMMetric,
    "error": LLMError,
}
V1_EVENTS = sorted(path.stem for path in V1.glob("*.json"))  # request, request-minimal, ...


def model_of(name: str) -> type[BaseModel]:
    return MODELS[name.split("-")[0]]


def v1_schema(event: str) -> dict[str, Any]:
    """The v1 schema of an event, parsed from the copy kept with the tests."""
    named: dict[str, Any] = {}
    if event == "error":  # LLMError v1 refers to LLMRequest v1 by name
        parse_schema(orjson.loads((V1 / "llm_request.avsc").read_bytes()), named)
    parsed = parse_schema(orjson.loads((V1 / f"llm_{event}.avsc").read_bytes()), named)
    assert isinstance(parsed, dict)
    return parsed


def header_of(parsed: dict[str, Any]) -> bytes:
    canonical = to_parsing_canonical_form(parse_schema(parsed, expand=True))
    return b"\xc3\x01" + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


def avro_body(parsed: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = BytesIO()
    schemaless_writer(buffer, parsed, record)
    return buffer.getvalue()


def read(body: bytes, writer: dict[str, Any], reader: dict[str, Any] | None = None) -> Any:
    buffer = BytesIO(body)
    record = schemaless_reader(buffer, writer, reader)
    assert buffer.tell() == len(body)
    return record


def restricted(new: Any, old: Any) -> Any:
    """``new`` with only what ``old`` has: the fields an old reader knows, at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {key: restricted(new.get(key), value) for key, value in old.items()}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [restricted(n, o) for n, o in zip(new, old, strict=True)]
    return new


# Old events, new readers


@pytest.mark.parametrize("event", list(MODELS))
def test_the_shipped_v1_schemas_are_the_v1_contract(event: str) -> None:
    # The codec reads old events with llm_*.v1.avsc; they must stay what v1 producers wrote with.
    shipped = files("llmstream.schemas").joinpath(f"llm_{event}.v1.avsc").read_bytes()
    named: dict[str, Any] = {}
    if event == "error":
        parse_schema(orjson.loads((V1 / "llm_request.avsc").read_bytes()), named)
    ours = to_parsing_canonical_form(parse_schema(orjson.loads(shipped), named, expand=True))
    assert ours == to_parsing_canonical_form(parse_schema(v1_schema(event), expand=True))


@pytest.mark.parametrize("fmt", ["json", "avro"])
@pytest.mark.parametrize("name", V1_EVENTS)
def test_a_v1_event_decodes_with_the_new_fields_at_their_defaults(name: str, fmt: str) -> None:
    model = model_of(name)
    event = decode((V1 / f"{name}.{fmt}").read_bytes(), model)
    old = orjson.loads((V1 / f"{name}.json").read_bytes())
    new = orjson.loads(encode(event))
    assert restricted(new, old) == old
    for field in set(model.model_fields) - set(old):
        default = model.model_fields[field].get_default(call_default_factory=True)
        assert getattr(event, field) == default, field


@pytest.mark.parametrize("name", V1_EVENTS)
def test_fastavro_resolves_a_v1_body_into_the_new_schema(name: str) -> None:
    # Plain Avro schema resolution, writer = v1, reader = now: what any Avro library does.
    model = model_of(name)
    data = (V1 / f"{name}.avro").read_bytes()
    writer = v1_schema(name.split("-")[0])
    assert data[:10] == header_of(writer)
    record = read(data[10:], writer, schema_for(model))
    assert model.model_validate(record) == decode(data, model)


def test_every_field_added_since_v1_has_a_default() -> None:
    # Without one, schema resolution cannot read a v1 event: the rule every later change keeps.
    for event, model in MODELS.items():
        old_records = v1_schema(event)["__named_schemas"]
        for name, record in schema_for(model)["__named_schemas"].items():
            if name not in old_records:
                continue  # a record added since: only reachable through an added field
            known = {field["name"] for field in old_records[name]["fields"]}
            for field in record["fields"]:
                if field["name"] not in known:
                    assert "default" in field, f"{name}.{field['name']}"


# New events, old readers


@pytest.mark.parametrize("name", V1_EVENTS)
def test_an_event_using_nothing_new_is_written_as_the_v1_codec_wrote_it(name: str) -> None:
    # Byte for byte, in both formats: a consumer not yet upgraded reads it as it always did.
    model = model_of(name)
    v1_json = (V1 / f"{name}.json").read_bytes().strip()
    event = decode(v1_json, model)
    assert encode(event, WireFormat.JSON) == v1_json
    assert encode(event, WireFormat.AVRO) == (V1 / f"{name}.avro").read_bytes()


@pytest.mark.parametrize("name", V1_EVENTS)
def test_a_v1_reader_reads_a_new_body_without_the_new_fields(name: str) -> None:
    # Forward compatibility of the schemas themselves: writer = now, reader = v1.
    model = model_of(name)
    event = decode((V1 / f"{name}.json").read_bytes(), model)
    new = schema_for(model)
    body = avro_body(new, event.model_dump(by_alias=True))
    assert read(body, new, v1_schema(name.split("-")[0])) == read(
        (V1 / f"{name}.avro").read_bytes()[10:], v1_schema(name.split("-")[0])
    )


def tool_request(**changes: Any) -> LLMRequest:
    data = orjson.loads((TOOLS / "request.json").read_bytes())
    return LLMRequest.model_validate({**data, **changes})


def new_body(request: LLMRequest) -> bytes:
    """The Avro body of a request that only the new schema holds, as the codec writes it."""
    data = encode(request, WireFormat.AVRO)
    assert data[:10] == header_of(schema_for(LLMRequest))
    return data[10:]


def test_a_v1_reader_reads_a_request_using_tools_without_them_where_avro_can() -> None:
    # Every message has content, so v1 (content a string) reads the body; the rest is dropped.
    request = tool_request(messages=[{"role": "user", "content": "hi"}])
    old = read(new_body(request), schema_for(LLMRequest), v1_schema("request"))
    assert old["messages"] == [{"role": "user", "content": "hi", "name": None}]
    assert "tools" not in old and old["request_id"] == request.request_id


def test_a_v1_reader_cannot_read_an_assistant_message_without_content() -> None:
    # Where Avro does not allow it: v1's content is a string, a tool-calling turn has none.
    request = tool_request()
    assert request.messages[2].content is None
    with pytest.raises(SchemaResolutionError):
        read(new_body(request), schema_for(LLMRequest), v1_schema("request"))


def unknown_to(value: Any, avro_type: Any, named: dict[str, Any]) -> list[str]:
    """The keys of a JSON event that the schema does not have, at any depth: what a consumer
    refusing unknown fields (as the models do) would refuse."""
    avro_type = named.get(avro_type, avro_type) if isinstance(avro_type, str) else avro_type
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        return unknown_to(value, branches[0], named) if value is not None else []
    if not isinstance(avro_type, dict):
        return []
    if avro_type["type"] == "array":
        return [key for item in value for key in unknown_to(item, avro_type["items"], named)]
    if avro_type["type"] != "record":
        return []
    fields = {field["name"]: field["type"] for field in avro_type["fields"]}
    unknown = [key for key in value if key not in fields]
    for key, item in value.items():
        if key in fields:
            unknown += unknown_to(item, fields[key], named)
    return unknown


PLAIN = {"request_id": "r", "model": "m", "messages": [{"role": "user", "content": "x"}]}
TOOL_TURN = [
    {"role": "user", "content": "x"},
    {
        "role": "assistant",
        "content": "calling",
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "content": "18", "tool_call_id": "c1"},
]
ERROR = {"request_id": "r", "error_type": "x", "message": "m", "occurred_at_ms": 1}
METRIC = {"request_id": None, "status": "error", "worker_id": "w", "occurred_at_ms": 1}
# Which events v1 holds: those that use nothing added since, at any depth.
WRITTEN_AS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "plain-request": ("request", PLAIN, True),
    "streamed-request": ("request", {**PLAIN, "stream": True}, False),
    "request-with-a-tool-turn": ("request", {**PLAIN, "messages": TOOL_TURN}, False),
    "metric": ("metric", METRIC, True),
    "metric-with-a-tier": ("metric", {**METRIC, "service_tier": "flex"}, False),
    "error-with-a-plain-request": ("error", {**ERROR, "request": PLAIN}, True),
    "error-with-a-session": ("error", {**ERROR, "request": {**PLAIN, "session_id": "s"}}, False),
}


@pytest.mark.parametrize("case", list(WRITTEN_AS))
def test_events_are_written_for_v1_consumers_exactly_when_v1_holds_them(case: str) -> None:
    name, fields, v1 = WRITTEN_AS[case]
    model = MODELS[name]
    event = model.model_validate(fields)
    old = v1_schema(name)
    data = encode(event, WireFormat.AVRO)
    assert data[:10] == header_of(old if v1 else schema_for(model))
    assert decode(data, model) == event
    unknown = unknown_to(orjson.loads(encode(event)), old, old["__named_schemas"])
    assert (unknown == []) is v1, unknown


def test_a_v1_consumer_refuses_a_new_avro_event_by_its_fingerprint() -> None:
    # What a consumer not yet upgraded does with an event that needs the new schema: it is
    # refused as an unknown schema (and routed to llm-errors), never misread.
    data = encode(tool_request(), WireFormat.AVRO)
    assert data[:10] != header_of(v1_schema("request"))
    with pytest.raises(DecodeError, match="is an LLMRequest"):
        decode(data, LLMError)


# The chunk schema


CHUNK = LLMResponseChunk(
    request_id="r1",
    attempt=1,
    index=0,
    delta="Hel",
    provider="openai",
    model="gpt-4o-mini",
    client_id="c",
    created_at_ms=1,
)


def chunk_schema_with(*extra: dict[str, Any]) -> dict[str, Any]:
    raw = orjson.loads(files("llmstream.schemas").joinpath("llm_response_chunk.avsc").read_bytes())
    raw["fields"] = [*raw["fields"], *extra]
    parsed = parse_schema(raw)
    assert isinstance(parsed, dict)
    return parsed


USAGE = {"name": "completion_tokens", "type": ["null", "int"], "default": None, "doc": "x"}


def test_a_chunk_reader_with_an_added_optional_field_reads_todays_chunks() -> None:
    body = encode(CHUNK, WireFormat.AVRO)[10:]
    record = read(body, schema_for(LLMResponseChunk), chunk_schema_with(USAGE))
    assert record == {**CHUNK.model_dump(), "completion_tokens": None}


def test_todays_chunk_reader_reads_chunks_with_an_added_optional_field() -> None:
    future = chunk_schema_with(USAGE)
    body = avro_body(future, {**CHUNK.model_dump(), "completion_tokens": 7})
    record = read(body, future, schema_for(LLMResponseChunk))
    assert LLMResponseChunk.model_validate(record) == CHUNK


def test_a_chunk_reader_without_the_optional_fields_reads_todays_chunks() -> None:
    # A minimal consumer (request_id, attempt, index, delta) keeps working as fields come and go.
    raw = orjson.loads(files("llmstream.schemas").joinpath("llm_response_chunk.avsc").read_bytes())
    raw["fields"] = [
        f for f in raw["fields"] if f["name"] in ("request_id", "attempt", "index", "delta")
    ]
    minimal = parse_schema(raw)
    body = encode(CHUNK, WireFormat.AVRO)[10:]
    assert read(body, schema_for(LLMResponseChunk), minimal) == {
        "request_id": "r1",
        "attempt": 1,
        "index": 0,
        "delta": "Hel",
    }
