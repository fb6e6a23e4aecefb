"""The codec: round trips in both wire formats, format detection, and errors a user can act on."""

from __future__ import annotations

import base64
import json
import pickle
from importlib.resources import files
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import llmstream.schemas as schemas
from llmstream.schemas import (
    ChatMessage,
    DecodeError,
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
    WireFormat,
    decode,
    decode_request,
    detect_format,
    encode,
)
from llmstream.schemas.codec import fingerprint_for, schema_for
from tests.samples import EVENTS, MINIMAL_REQUEST, RAW, REQUEST, SCHEMA_FILES

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Chunks of a streamed answer: a middle one with every field set, and the cache's single chunk.
CHUNKS: dict[str, BaseModel] = {
    "chunk": LLMResponseChunk(
        request_id="req-1",
        attempt=2,
        index=3,
        delta="Hel ✓",
        finish_reason="stop",
        provider="openai",
        model="gpt-4o-mini",
        client_id="client-a",
        created_at_ms=1_700_000_000_500,
    ),
    "chunk-minimal": LLMResponseChunk(
        request_id="r", attempt=0, index=0, delta="", created_at_ms=0
    ),
}
# Events using tools, sessions and tiers, as a producer would type them in JSON.
TOOLS_DIR = Path(__file__).parent / "payloads" / "contract_tools"
V1_DIR = Path(__file__).parent / "payloads" / "contract_v1"
TOOL_MODELS: dict[str, type[BaseModel]] = {
    "request": LLMRequest,
    "response": LLMResponse,
    "error": LLMError,
    "metric": LLMMetric,
}
TOOL_EVENTS: dict[str, BaseModel] = {
    f"{name}-tools": decode((TOOLS_DIR / f"{name}.json").read_bytes(), model)
    for name, model in TOOL_MODELS.items()
}
TOOL_REQUEST = TOOL_EVENTS["request-tools"]
assert isinstance(TOOL_REQUEST, LLMRequest)
TOOL_EVENTS["error-with-tool-request"] = LLMError(
    request_id=TOOL_REQUEST.request_id,
    error_type="provider_error",
    message="upstream 503",
    request=TOOL_REQUEST,
    occurred_at_ms=1,
)
ALL = {**EVENTS, **CHUNKS, **TOOL_EVENTS}

V1_FIELDS = {
    model: {field["name"] for field in json.loads((V1_DIR / filename).read_text())["fields"]}
    for model, filename in SCHEMA_FILES.items()
    if (V1_DIR / filename).exists()
}

BOTH = pytest.mark.parametrize("fmt", list(WireFormat), ids=str)
ALL_EVENTS = pytest.mark.parametrize("event", list(ALL.values()), ids=list(ALL))


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO, written from the Avro specification ("Schema Fingerprints")."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def decode_error(data: bytes, model: type[BaseModel] = LLMRequest) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(data, model)
    return caught.value


# Round trips and the wire layout


@BOTH
@ALL_EVENTS
def test_round_trip(event: BaseModel, fmt: WireFormat) -> None:
    data = encode(event, fmt)
    assert detect_format(data) is fmt
    assert decode(data, type(event)) == event


@BOTH
def test_decode_request_round_trip(fmt: WireFormat) -> None:
    assert decode_request(encode(REQUEST, fmt)) == REQUEST


@ALL_EVENTS
def test_json_is_an_object_with_the_field_names(event: BaseModel) -> None:
    obj = json.loads(encode(event).decode("utf-8"))
    names = list(type(event).model_fields)
    assert list(obj) == [name for name in names if name in obj]
    # Left out: only fields added since v1 while they hold their default, so that consumers
    # not yet upgraded (which refuse unknown fields) read the events that do not use them.
    v1 = V1_FIELDS.get(type(event), set(names))
    for name in set(names) - set(obj):
        assert name not in v1, name
        default = type(event).model_fields[name].get_default(call_default_factory=True)
        assert getattr(event, name) == default, name


def test_json_bytes_are_standard_base64_and_both_alphabets_decode() -> None:
    event = EVENTS["error"]
    obj = orjson.loads(encode(event))
    assert obj["raw_payload"] == base64.b64encode(RAW).decode() == "+//+AG5vdCBqc29u"
    obj["raw_payload"] = base64.urlsafe_b64encode(RAW).decode()
    assert decode(orjson.dumps(obj), LLMError) == event


def test_json_nested_request_is_an_object() -> None:
    obj = orjson.loads(encode(EVENTS["error"]))
    assert obj["request"] == orjson.loads(encode(REQUEST))
    assert obj["request"]["messages"][1] == {
        "role": "user",
        "content": "Hi ✓ \u00e9\U0001f600",
        "name": "ana",
    }


def load_avsc(filename: str) -> Any:
    return json.loads(files("llmstream.schemas").joinpath(filename).read_text(encoding="utf-8"))


def fingerprint_of(filename: str, request_filename: str = "llm_request.avsc") -> int:
    named: dict[str, Any] = {}
    parse_schema(load_avsc(request_filename), named)  # LLMError refers to it by name
    canonical = to_parsing_canonical_form(parse_schema(load_avsc(filename), named, expand=True))
    return crc64_avro(canonical.encode())


@ALL_EVENTS
def test_avro_is_single_object_encoding(event: BaseModel) -> None:
    model = type(event)
    fp = fingerprint_of(SCHEMA_FILES[model])
    assert fingerprint_for(model) == fp
    # An event using nothing added since v1 is written as v1, which consumers not yet upgraded
    # read; the codec reads it into the current schema.
    uses_new = event in CHUNKS.values() or event in TOOL_EVENTS.values()
    writer = SCHEMA_FILES[model] if uses_new else SCHEMA_FILES[model].replace(".avsc", ".v1.avsc")
    writer_fp = fingerprint_of(writer, "llm_request.avsc" if uses_new else "llm_request.v1.avsc")

    data = encode(event, WireFormat.AVRO)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == writer_fp.to_bytes(8, "little")
    named: dict[str, Any] = {}
    if model is LLMError:
        parse_schema(load_avsc(writer.replace("error", "request")), named)
    body = BytesIO(data[10:])
    record = schemaless_reader(body, parse_schema(load_avsc(writer), named), schema_for(model))
    assert with_json_objects(record) == event.model_dump(by_alias=True)
    assert body.tell() == len(data) - 10


def with_json_objects(node: Any) -> Any:
    """An Avro record with the JSON text of tool parameters and JSON schemas parsed."""
    if isinstance(node, list):
        return [with_json_objects(item) for item in node]
    if not isinstance(node, dict):
        return node
    json_text = ("parameters", "schema")
    return {
        key: orjson.loads(value)
        if key in json_text and isinstance(value, str)
        else with_json_objects(value)
        for key, value in node.items()
    }


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ('"null"', 7195948357588979594),
        ('"string"', -8142146995180207161),
        ('{"name":"foo","type":"record","fields":[]}', -4824392279771201922),
        ('{"name":"x.y.foo","type":"record","fields":[]}', 5916914534497305771),
        ('{"type":"map","values":"string"}', -8732877298790414990),
    ],
)
def test_crc64_avro_matches_the_spec_test_vectors(schema: str, expected: int) -> None:
    # Vectors from apache/avro share/test/data/schema-tests.txt (signed Java longs).
    assert crc64_avro(schema.encode()) == expected % 2**64


def test_avro_from_another_producer_decodes() -> None:
    # A producer using only the .avsc and the spec: header by hand, body by plain fastavro.
    buffer = BytesIO()
    buffer.write(b"\xc3\x01" + fingerprint_for(LLMRequest).to_bytes(8, "little"))
    schemaless_writer(buffer, schema_for(LLMRequest), MINIMAL_REQUEST.model_dump())
    assert decode_request(buffer.getvalue()) == MINIMAL_REQUEST


def test_detect_format() -> None:
    assert detect_format(b'{"a": 1}') is WireFormat.JSON
    assert detect_format(b"\xc3\x01anything") is WireFormat.AVRO
    assert detect_format(b"\xc3") is WireFormat.JSON
    assert detect_format(b"") is WireFormat.JSON


def test_unknown_wire_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown wire format"):
        encode(REQUEST, "xml")  # type: ignore[arg-type]


# What a user typing JSON into kcat sees


def test_minimal_json_as_typed_into_kcat_decodes() -> None:
    data = b"""{"request_id": "demo-1", "model": "gpt-4o-mini",
               "messages": [{"role": "user", "content": "Say hi"}]}\n"""
    request = decode_request(data)
    assert request.request_id == "demo-1"
    assert request.messages == [ChatMessage(role="user", content="Say hi")]
    assert (request.metadata, request.fallbacks, request.cache) == ({}, [], False)


DROP = object()


def request_dict(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "request_id": "r1",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        **changes,
    }
    return {k: v for k, v in obj.items() if v is not DROP}


def avro_request(**changes: Any) -> bytes:
    """Avro bytes of a request, written by plain fastavro without the model's validation."""
    buffer = BytesIO()
    buffer.write(b"\xc3\x01" + fingerprint_for(LLMRequest).to_bytes(8, "little"))
    record = {**MINIMAL_REQUEST.model_dump(), **request_dict(**changes)}
    schemaless_writer(buffer, schema_for(LLMRequest), record)
    return buffer.getvalue()


INVALID: dict[str, tuple[dict[str, Any], str, str]] = {
    "empty-content": (
        {"messages": [{"role": "user", "content": ""}]},
        "messages.0.content",
        "String should have at least 1 character",
    ),
    "temperature": ({"temperature": 3.0}, "temperature", "less than or equal to 2"),
    "no-messages": ({"messages": []}, "messages", "at least 1 item"),
    "role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
    "no-model": ({"model": DROP}, "model", "Field required"),
    "unknown-field": ({"colour": "blue"}, "colour", "unknown field"),
    "ms-overflow": ({"deadline_ms": 2**63}, "deadline_ms", "less than or equal to"),
    "huge-int": ({"max_tokens": 10**400}, "max_tokens", "less than or equal to"),
}
# Avro cannot carry an unknown field, a missing one or an int out of range, so only these apply.
INVALID_IN_AVRO = ["empty-content", "temperature", "no-messages", "role"]


def assert_names_field(data: bytes, field: str, words: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_request(data)
    error = caught.value
    assert (error.kind, error.field) == ("invalid_request", field)
    assert str(error).startswith(f"{field}: ")
    assert words in str(error)


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_json_request_names_the_field(case: str) -> None:
    changes, field, words = INVALID[case]
    assert_names_field(json.dumps(request_dict(**changes)).encode(), field, words)


@pytest.mark.parametrize("case", INVALID_IN_AVRO)
def test_invalid_avro_request_names_the_field(case: str) -> None:
    changes, field, words = INVALID[case]
    assert_names_field(avro_request(**changes), field, words)


def test_example_message_reads_well() -> None:
    data = json.dumps(request_dict(messages=[{"role": "user", "content": ""}])).encode()
    with pytest.raises(
        DecodeError,
        match=r"^messages\.0\.content: String should have at least 1 character \(only an "
        r"assistant message with tool_calls may leave content null or empty\)$",
    ):
        decode_request(data)


def test_every_error_is_counted() -> None:
    data = json.dumps(request_dict(model=DROP, temperature=9, colour="x")).encode()
    with pytest.raises(DecodeError, match=r"^model: Field required \(and 2 more\)$"):
        decode_request(data)


# Bytes that are not an event at all


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty payload"),
        (b"hello", "not valid JSON"),
        (b'{"request_id": "r1", ', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b"null", "expected a JSON object, got null"),
        (b'"{}"', "expected a JSON object, got string"),
        (b"12", "expected a JSON object, got number"),
        (b"true", "expected a JSON object, got boolean"),
        (b"\xc3\x01\x00", "truncated Avro single-object header"),
    ],
)
def test_undecodable(data: bytes, words: str) -> None:
    error = decode_error(data)
    assert (error.kind, error.field) == ("undecodable", None)
    assert words in str(error)


def test_tombstone_is_undecodable() -> None:
    with pytest.raises(DecodeError, match="empty payload"):
        decode_request(None)  # type: ignore[arg-type]


def test_avro_of_another_event_names_both() -> None:
    data = encode(EVENTS["response"], WireFormat.AVRO)
    error = decode_error(data)
    assert error.kind == "undecodable"
    assert "is an LLMResponse; LLMRequest events start with c3 01" in str(error)


def test_avro_with_an_unknown_fingerprint() -> None:
    data = bytearray(encode(REQUEST, WireFormat.AVRO))
    data[2] ^= 0xFF
    error = decode_error(bytes(data))
    assert error.kind == "undecodable"
    assert "not a known llmstream schema; LLMRequest events start with" in str(error)
    # The expected header as the bytes a producer must write: C3 01, then the fingerprint
    # little-endian, never as a (byte-reversed looking) integer.
    expected = b"\xc3\x01" + fingerprint_for(LLMRequest).to_bytes(8, "little")
    assert expected.hex(" ") in str(error)
    assert bytes(data[:10]).hex(" ") in str(error)


def test_truncated_and_padded_avro() -> None:
    data = encode(REQUEST, WireFormat.AVRO)
    assert "malformed Avro LLMRequest body" in str(decode_error(data[:-3]))
    assert "2 unexpected bytes after the Avro LLMRequest body" in str(decode_error(data + b"\0\0"))


def test_message_echoes_little_of_the_payload() -> None:
    key = "k" * 10_000
    error = decode_error(json.dumps(request_dict(**{key: 1})).encode())
    assert error.field is not None and len(error.field) <= 64
    assert str(error).count("k") < 200
    long_content = request_dict(messages=[{"role": "user", "content": "x" * 2_000_000}])
    error = decode_error(json.dumps(long_content).encode())
    assert error.field == "messages.0.content"
    assert str(error).count("x") < 200


def test_control_characters_in_a_key_are_escaped() -> None:
    error = decode_error(json.dumps(request_dict(**{"a\nb\x1b": 1})).encode())
    assert error.field == "a\\nb\\x1b"
    assert "\n" not in str(error)


def test_decode_error_survives_pickling() -> None:
    error = decode_error(b"[]")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.field, str(copy)) == (error.kind, error.field, str(error))


def test_package_exports() -> None:
    for name in schemas.__all__:
        assert hasattr(schemas, name), name
    assert {"DecodeError", "WireFormat", "encode", "decode", "decode_request"} <= set(
        schemas.__all__
    )


# Whatever the bytes, decoding raises DecodeError and nothing else


def only_decode_errors(data: bytes, model: type[BaseModel] = LLMRequest) -> None:
    try:
        event = decode_request(data) if model is LLMRequest else decode(data, model)
    except DecodeError as error:
        assert error.kind in ("undecodable", "invalid_request")
        assert str(error).strip()
        assert len(str(error)) < 600
    else:
        assert isinstance(event, model)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
request_keys = st.sampled_from([*LLMRequest.model_fields, "role", "content", "name", "extra"])


models = st.sampled_from(list(SCHEMA_FILES))


@FUZZ
@given(st.binary(max_size=300), models)
def test_random_bytes(data: bytes, model: type[BaseModel]) -> None:
    only_decode_errors(data, model)


@FUZZ
@given(st.binary(max_size=200), models)
def test_random_avro_bodies(body: bytes, model: type[BaseModel]) -> None:
    header = b"\xc3\x01" + fingerprint_for(model).to_bytes(8, "little")
    only_decode_errors(header + body, model)


@FUZZ
@given(json_values, models)
def test_random_json_values(value: Any, model: type[BaseModel]) -> None:
    # The standard library writes what orjson refuses: huge integers and lone surrogates.
    only_decode_errors(json.dumps(value).encode(), model)


@FUZZ
@given(st.data())
def test_mutated_json_requests(data: st.DataObject) -> None:
    obj = orjson.loads(encode(REQUEST))
    # Taken before mutating, as the mutations may detach them from obj.
    targets = [obj, obj["messages"][1], obj["metadata"]]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(targets))
        key = data.draw(request_keys)
        if data.draw(st.booleans()):
            target[key] = data.draw(json_values)
        else:
            target.pop(key, None)
    raw = bytearray(json.dumps(obj).encode())
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at : at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))
    only_decode_errors(bytes(raw))


@FUZZ
@given(st.data())
def test_mutated_avro(data: st.DataObject) -> None:
    event = data.draw(st.sampled_from([REQUEST, EVENTS["error"], EVENTS["response"]]))
    raw = bytearray(encode(event, WireFormat.AVRO))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(10, len(raw) - 1))
        raw[at : at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))
    only_decode_errors(bytes(raw), type(event))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("temperature", True),
        ("max_tokens", "16"),
        ("max_tokens", True),
        ("max_tokens", 16.5),
        ("cache", "yes"),
        ("cache", 1),
        ("created_at_ms", True),
        ("created_at_ms", "1700000000000"),
        ("stream", "true"),
        ("stream", 1),
        ("parallel_tool_calls", "false"),
        ("server_tools", "web_search"),
        ("session_id", 42),
    ],
)
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(
    field: str, value: object
) -> None:
    # Producers in other languages must not rely on coercion: a string is not a number, a
    # boolean is neither a number nor a string.
    event = {**json.loads(encode(MINIMAL_REQUEST, WireFormat.JSON)), field: value}
    error = decode_error(json.dumps(event).encode())
    assert error.kind == "invalid_request"
    assert error.field == field


def test_an_integer_is_a_valid_temperature() -> None:
    event = {**json.loads(encode(MINIMAL_REQUEST, WireFormat.JSON)), "temperature": 1}
    assert decode_request(json.dumps(event).encode()).temperature == 1.0
