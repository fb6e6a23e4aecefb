"""The schema files of each event, current and earlier, and which version an event fits.

Each event has its current schema (``llm_request.avsc``) and may have earlier versions
(``llm_request.v1.avsc``) that events on the topics, and consumers not yet upgraded, still use.
Avro events name their writer's schema by fingerprint, so the codec reads an earlier version into
the current one by schema resolution. It writes an event as the oldest version that holds it
unchanged (every field added since holds its default): consumers not yet upgraded read it, and
upgraded ones resolve it. JSON leaves out the fields added since the oldest version while they
hold their defaults, for the same reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from typing import Any

import orjson
from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel

from llmstream.schemas.models import LLMError, LLMMetric, LLMRequest, LLMResponse, LLMResponseChunk

AVRO_MAGIC = b"\xc3\x01"

# Each event's schema files, oldest first, the current one last. LLMError refers to
# llmstream.LLMRequest by name: each of its versions is parsed with the names of the request schema
# of the same version, so the two lists are as long as each other.
VERSIONS: tuple[tuple[type[BaseModel], tuple[str, ...]], ...] = (
    (LLMRequest, ("llm_request.v1.avsc", "llm_request.avsc")),
    (LLMResponse, ("llm_response.v1.avsc", "llm_response.avsc")),
    (LLMMetric, ("llm_metric.v1.avsc", "llm_metric.avsc")),
    (LLMError, ("llm_error.v1.avsc", "llm_error.avsc")),
    (LLMResponseChunk, ("llm_response_chunk.avsc",)),
)

_Check = Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Schema:
    """One version of an event's schema, parsed."""

    model: type[BaseModel]
    parsed: dict[str, Any]
    header: bytes  # the single-object marker and the fingerprint, as on the wire
    fingerprint: int
    # The fields that may hold a record: while they are all null or empty, the model's __dict__
    # can be written as is, without a model_dump() copy.
    record_fields: tuple[str, ...]
    # Where the JSON objects Avro carries as JSON text are: field names, "[]" for array items.
    json_paths: tuple[tuple[str, ...], ...]

    @property
    def name(self) -> str:
        return self.model.__name__


@dataclass(frozen=True, slots=True)
class Registry:
    """Every version of every event's schema."""

    current: dict[type[BaseModel], Schema]
    # Every version, the current ones included, by the header events written with it start with.
    by_header: dict[bytes, Schema]
    # The earlier versions of each event, oldest first, each with the test of whether an event
    # fits it (None: every event does).
    older: dict[type[BaseModel], tuple[tuple[Schema, _Check | None], ...]]
    # Per record name (the name of its model), the fields added since its oldest version, with
    # their defaults.
    added: dict[str, dict[str, Any]]

    def writer(self, model: type[BaseModel], record: dict[str, Any]) -> Schema:
        """The oldest version of ``model``'s schema that holds ``record`` as it is."""
        for older, fits in self.older[model]:
            if fits is None or fits(record):
                return older
        return self.current[model]


def load_registry() -> Registry:
    """Parses the schema files beside this module."""
    current: dict[type[BaseModel], Schema] = {}
    by_header: dict[bytes, Schema] = {}
    older: dict[type[BaseModel], tuple[tuple[Schema, _Check | None], ...]] = {}
    added: dict[str, dict[str, Any]] = {}
    request_names: list[dict[str, Any]] = []
    for model, filenames in VERSIONS:
        versions = []
        for version, filename in enumerate(filenames):
            # Each file gets its own names, so two files may each define a record (ToolCall).
            named = dict(request_names[version]) if model is LLMError else {}
            versions.append(_read(model, filename, named))
            if model is LLMRequest:
                request_names.append(named)
        *earlier, current[model] = versions
        by_header.update((schema.header, schema) for schema in versions)
        names = current[model].parsed["__named_schemas"]
        older[model] = tuple(
            (old, _fit_check(current[model].parsed, old.parsed, names, _names(old)))
            for old in earlier
        )
        if earlier:
            added.update(_added_fields(names, _names(earlier[0])))
    return Registry(current, by_header, older, added)


def _names(schema: Schema) -> dict[str, Any]:
    names: dict[str, Any] = schema.parsed["__named_schemas"]
    return names


def _read(model: type[BaseModel], filename: str, named: dict[str, Any]) -> Schema:
    raw = orjson.loads(files("llmstream.schemas").joinpath(filename).read_bytes())
    # The canonical form needs every named type spelled out; parse a copy with them expanded.
    canonical = to_parsing_canonical_form(parse_schema(raw, dict(named), expand=True))
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))  # little-endian, as on the wire
    parsed = parse_schema(raw, named)
    assert isinstance(parsed, dict)
    return Schema(
        model=model,
        parsed=parsed,
        header=AVRO_MAGIC + fp,
        fingerprint=int.from_bytes(fp, "little"),
        record_fields=tuple(f["name"] for f in raw["fields"] if _has_record(f["type"])),
        json_paths=tuple(_json_paths(parsed, parsed["__named_schemas"], ())),
    )


def _has_record(avro_type: Any) -> bool:
    if isinstance(avro_type, list):
        return any(_has_record(branch) for branch in avro_type)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "array":
            return _has_record(avro_type["items"])
        if kind == "map":
            return _has_record(avro_type["values"])
        return bool(kind == "record" or _has_record(kind))
    return "." in avro_type  # a named type referred to by its full name


def _json_paths(
    avro_type: Any, named: dict[str, Any], path: tuple[str, ...]
) -> Iterator[tuple[str, ...]]:
    """The paths of the ``{"type": "string", "logicalType": "json"}`` values under ``avro_type``."""
    if isinstance(avro_type, str):
        if avro_type in named and avro_type not in path:  # a reference; the check stops a cycle
            yield from _json_paths(named[avro_type], named, (*path, avro_type))
    elif isinstance(avro_type, list):
        for branch in avro_type:
            yield from _json_paths(branch, named, path)
    elif avro_type.get("logicalType") == "json":
        yield tuple(step for step in path if step not in named)
    elif avro_type["type"] == "array":
        yield from _json_paths(avro_type["items"], named, (*path, "[]"))
    elif avro_type["type"] == "record":
        for field in avro_type["fields"]:
            yield from _json_paths(field["type"], named, (*path, field["name"]))


def _added_fields(names: dict[str, Any], old_names: dict[str, Any]) -> dict[str, dict[str, Any]]:
    added = {}
    for name, record in names.items():
        if name in old_names:
            known = {field["name"] for field in old_names[name]["fields"]}
            new = {f["name"]: f["default"] for f in record["fields"] if f["name"] not in known}
            added[name.rpartition(".")[2]] = new
    return added


_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _never(_value: Any) -> bool:
    return False


def _fit_check(
    new: Any, old: Any, new_names: dict[str, Any], old_names: dict[str, Any]
) -> _Check | None:
    """A test of whether a value written for the ``new`` type reads back the same through the
    ``old`` one (every field ``old`` lacks holds its default, no value is one ``old`` cannot
    hold); None when every value does. Built once, so writing an event walks only what changed."""
    if isinstance(new, str):
        new = new_names.get(new, new)  # a named type, or a primitive
    if isinstance(old, str):
        old = old_names.get(old, old)
    if isinstance(new, list) or isinstance(old, list):  # unions: ["null", T] where they changed
        new_branches = [b for b in (new if isinstance(new, list) else [new]) if b != "null"]
        old_branches = [b for b in (old if isinstance(old, list) else [old]) if b != "null"]
        old_nullable = isinstance(old, list) and "null" in old
        if len(new_branches) != 1 or len(old_branches) != 1:
            return None if new == old else _never
        inner = _fit_check(new_branches[0], old_branches[0], new_names, old_names)
        if inner is None and old_nullable:
            return None
        return lambda value: old_nullable if value is None else inner is None or inner(value)
    kind, old_kind = _kind(new), _kind(old)
    if kind != old_kind:
        return _never
    if kind == "record":
        return _record_check(new, old, new_names, old_names)
    if kind in ("array", "map"):
        key = "items" if kind == "array" else "values"
        item = _fit_check(new[key], old[key], new_names, old_names)
        if item is None:
            return None
        if kind == "array":
            return lambda value: all(item(each) for each in value)
        return lambda value: all(item(each) for each in value.values())
    return None if kind in _PRIMITIVES else _never  # no enum or fixed in these schemas


def _kind(avro_type: Any) -> str:
    return str(avro_type["type"] if isinstance(avro_type, dict) else avro_type)


def _record_check(
    new: dict[str, Any], old: dict[str, Any], new_names: dict[str, Any], old_names: dict[str, Any]
) -> _Check | None:
    old_fields = {field["name"]: field for field in old["fields"]}
    new_fields = {field["name"] for field in new["fields"]}
    if any(name not in new_fields and "default" not in f for name, f in old_fields.items()):
        return _never
    checks: list[tuple[str, _Check]] = []
    for field in new["fields"]:
        name = field["name"]
        if name in old_fields:
            check = _fit_check(field["type"], old_fields[name]["type"], new_names, old_names)
            if check is not None:
                checks.append((name, check))
        else:
            checks.append((name, partial(operator.eq, field["default"])))
    if not checks:
        return None
    return lambda value: all(check(value[name]) for name, check in checks)
