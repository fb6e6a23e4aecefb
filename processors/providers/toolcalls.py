"""Tool calls as providers send them, checked against the contract.

Whatever the wire format, a call becomes the contract's :class:`ToolCall` (OpenAI's shape): an ID
of 1 to 256 characters, a name matching ``^[a-zA-Z0-9_-]{1,64}$``, and the arguments as JSON
text. IDs are unique within one answer, as each tool result names the call it answers by its ID.
What does not fit raises :class:`MalformedAnswer`, which the adapter turns into a non-retryable
``provider_error`` ("malformed response"): an invalid call never reaches an event.

A stream sends a call in pieces (:class:`PartialCall`): OpenAI's ``delta.tool_calls`` fragments by
``index``, Anthropic's ``tool_use`` block and its ``input_json_delta`` pieces.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from llmstream.schemas.models import ToolCall

__all__ = ["MalformedAnswer", "PartialCall", "input_arguments", "tool_call", "tool_calls"]


class MalformedAnswer(ValueError):
    """A success body, or a stream, that says something the contract cannot carry; its message
    says what (and never holds more than a short, quoted excerpt of what the provider sent)."""


@dataclass(slots=True)
class PartialCall:
    """A tool call as a stream builds it: its ID and name, and its arguments' pieces.

    ``input_json`` marks Anthropic's pieces, which are partial JSON of the input object, made
    compact JSON text once whole (``input`` is the block's own, used when no piece came);
    OpenAI's pieces join into the arguments text as the provider wrote it.
    """

    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    input_json: bool = False
    input: object = None

    def arguments(self) -> str:
        text = "".join(self.pieces)
        if not self.input_json:
            return text
        if not text.strip():
            value = self.input if self.input is not None else {}
        else:
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise MalformedAnswer(
                    f"tool call {self.name!r:.80}: its streamed input is not JSON"
                ) from None
        return input_arguments(value, self.name)


def tool_call(call_id: object, name: object, arguments: object) -> ToolCall:
    """A provider's tool call in the contract's shape, or :class:`MalformedAnswer` saying which
    part does not fit. ``arguments`` is JSON text; a JSON object (some OpenAI-compatible servers
    send one) is written as compact JSON text."""
    if isinstance(arguments, dict):
        arguments = orjson.dumps(arguments).decode()
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
        raise MalformedAnswer(
            f"tool call {name!r:.80} has no string id, name or arguments "
            "(the contract needs all three)"
        )
    try:
        function = {"name": name, "arguments": arguments}
        return ToolCall.model_validate({"id": call_id, "type": "function", "function": function})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        part = ".".join(str(step) for step in error["loc"])
        # Either part is the provider's text: quoted and cut, so a page of it never reaches a log.
        raise MalformedAnswer(
            f"tool call {name!r:.80} (id {call_id!r:.80}) does not fit the contract: "
            f"{part}: {error['msg']}"
        ) from None


def tool_calls(calls: Iterable[tuple[object, object, object]]) -> tuple[ToolCall, ...]:
    """:func:`tool_call` for each ``(id, name, arguments)``; IDs must be unique in one answer,
    as each tool result names the call it answers by its ID."""
    checked = tuple(tool_call(*call) for call in calls)
    seen: set[str] = set()
    for call in checked:
        if call.id in seen:
            raise MalformedAnswer(f"two tool calls have the id {call.id!r:.80}")
        seen.add(call.id)
    return checked


def input_arguments(value: object, name: str) -> str:
    """A tool call's input object (Anthropic's ``input``) as compact JSON arguments text."""
    if not isinstance(value, dict):
        raise MalformedAnswer(f"tool call {name!r:.80}: its input is not a JSON object")
    return orjson.dumps(value).decode()
