"""Schema evolution: events written with an earlier contract still decode, and so on.

``tests/payloads/contract_v1/`` holds the contract before streaming, tools, sessions and tiers
(issues 14 to 16): its four ``.avsc`` files, and each sample event of that time as its codec wrote
it, in JSON and in Avro single-object encoding. Those bytes are what producers and topics may still
hold during and after an upgrade.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form
from pydantic import BaseModel

from llmstream.schemas import LLMError, LLMMetric, LLMRequest, LLMResponse, decode, encode

V1 = Path(__file__).parent / "payloads" / "contract_v1"
MODELS: dict[str, type[BaseModel]] = {
    "request": LLMRequest,
    "response": LLMResponse,
    "metric": LLMMetric,
    "error": LLMError,
}
V1_EVENTS = sorted(path.name for path in V1.iterdir() if path.suffix in (".json", ".avro"))


def model_of(name: str) -> type[BaseModel]:
    return MODELS[name.split("-")[0].split(".")[0]]


def restricted(new: Any, old: Any) -> Any:
    """``new`` with only what ``old`` has: the fields an old reader knows, at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {key: restricted(new.get(key), value) for key, value in old.items()}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [restricted(n, o) for n, o in zip(new, old, strict=True)]
    return new


def canonical(text: str, named: dict[str, Any]) -> str:
    return to_parsing_canonical_form(parse_schema(orjson.loads(text), named, expand=True))


@pytest.mark.parametrize("event", ["request", "response", "metric", "error"])
def test_the_shipped_v1_schemas_are_the_v1_contract(event: str) -> None:
    # The codec reads old events with llm_*.v1.avsc; they must stay what v1 producers wrote with.
    shipped = files("llmstream.schemas").joinpath(f"llm_{event}.v1.avsc").read_text("utf-8")
    kept = (V1 / f"llm_{event}.avsc").read_text("utf-8")
    request = (V1 / "llm_request.avsc").read_text("utf-8")
    named_a: dict[str, Any] = {}
    named_b: dict[str, Any] = {}
    parse_schema(orjson.loads(request), named_a)
    parse_schema(orjson.loads(request), named_b)
    assert canonical(shipped, named_a) == canonical(kept, named_b)


@pytest.mark.parametrize("name", V1_EVENTS)
def test_a_v1_event_decodes_with_the_new_fields_at_their_defaults(name: str) -> None:
    model = model_of(name)
    data = (V1 / name).read_bytes()
    event = decode(data, model)
    old_fields = orjson.loads((V1 / name.replace(".avro", ".json")).read_bytes())
    new = orjson.loads(encode(event))
    assert restricted(new, old_fields) == old_fields
    for key in set(new) - set(old_fields):
        info = model.model_fields[key]
        assert getattr(event, key) == info.get_default(call_default_factory=True), key
