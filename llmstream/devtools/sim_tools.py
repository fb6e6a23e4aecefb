"""How the provider simulator reads a conversation and decides on tool calls, in both wire formats.

Deterministic from the request body, so a retry, or the same request streamed, gets the same
answer (tool call IDs included):

- Tools are called when the body offers some (OpenAI ``tools``; Anthropic ``tools`` with an
  ``input_schema``), ``tool_choice`` is not "none", and the conversation holds fewer tool steps
  than N: 1, or the number in a ``[tool-steps:N]`` marker in the first user message. A step is
  one round of results (the ``tool`` messages after one assistant turn, or one user message of
  ``tool_result`` blocks), however many parallel calls it answered; without parallel calls a step
  is one tool result.
- The tool called: the one ``tool_choice`` names, else the offered tool whose name comes first in
  the last user message, else the first tool offered. ``[parallel-tools]`` in a user message calls
  every offered tool at once (unless parallel calls are turned off or one tool is forced).
- Arguments follow the tool's JSON schema: every required property is filled (string: the last
  user message, cut to 200 characters; integer 42; number 4.2; boolean true; array []; object:
  its own required properties; an ``enum`` or ``const``: its first value).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Wire = Literal["openai", "anthropic"]

MAX_STRING_ARGUMENT = 200
PARALLEL_MARKER = "[parallel-tools]"
_STEPS_MARKER = re.compile(r"\[tool-steps:(\d{1,4})\]")
_MAX_SCHEMA_DEPTH = 8


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One tool call the simulated model makes."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI sends them: compact JSON text."""
        return orjson.dumps(self.arguments).decode()


@dataclass(frozen=True, slots=True)
class Conversation:
    """What the simulator needs from a request's messages, whichever the wire format."""

    first_user: str
    last_user: str
    tool_results: tuple[str, ...]
    tool_steps: int

    @property
    def markers(self) -> str:
        return f"{self.first_user}\n{self.last_user}"


def plain_text(content: Any) -> str:
    """The text of a content value: a string, or the ``text`` of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def read_conversation(wire: Wire, messages: list[dict[str, Any]]) -> Conversation:
    """The user's texts and the tool results of a (checked) message list."""
    users: list[str] = []
    results: list[str] = []
    steps = 0
    in_step = False
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if wire == "openai" and role == "tool":
            results.append(plain_text(content))
            steps += not in_step
            in_step = True
            continue
        in_step = False
        if role != "user":
            continue
        blocks = content if isinstance(content, list) else []
        returned = [
            plain_text(b.get("content"))
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "tool_result"
        ]
        if wire == "anthropic" and returned:
            results.extend(returned)
            steps += 1
        text = plain_text(content)
        if text or not returned:
            users.append(text)
    return Conversation(
        first_user=users[0] if users else "",
        last_user=users[-1] if users else "",
        tool_results=tuple(results),
        tool_steps=steps,
    )


def offered_tools(wire: Wire, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, JSON schema of its arguments)`` for each tool the (checked) body offers."""
    tools: list[tuple[str, dict[str, Any]]] = []
    for tool in body.get("tools") or []:
        if wire == "openai":
            function = tool.get("function") or {}
            schema = function.get("parameters")
            name = function.get("name")
        else:
            schema = tool.get("input_schema")
            name = tool.get("name")
        if isinstance(name, str) and (wire == "openai" or isinstance(schema, dict)):
            tools.append((name, schema if isinstance(schema, dict) else {}))
    return tools


def tool_calls_due(wire: Wire, body: dict[str, Any], talk: Conversation) -> tuple[ToolUse, ...]:
    """The tool calls the simulated model answers ``body`` with; none when it answers text."""
    tools = offered_tools(wire, body)
    if not tools:
        return ()
    choice = body.get("tool_choice")
    forced = _forced_tool(wire, choice)
    if forced == "":  # tool_choice "none"
        return ()
    match = _STEPS_MARKER.search(talk.first_user)
    steps = int(match.group(1)) if match else 1
    if talk.tool_steps >= steps:
        return ()
    by_name = dict(tools)
    if forced is not None:
        chosen = [(forced, by_name.get(forced, {}))]
    elif PARALLEL_MARKER in talk.markers and _parallel_allowed(wire, body):
        chosen = tools
    else:
        chosen = [_named_in(tools, talk.last_user)]
    return tuple(
        ToolUse(
            id=_call_id(wire, body["messages"], index),
            name=name,
            arguments=arguments_for(schema, talk.last_user),
        )
        for index, (name, schema) in enumerate(chosen)
    )


def arguments_for(schema: dict[str, Any], text: str, depth: int = 0) -> dict[str, Any]:
    """An object with every required property of ``schema`` filled deterministically."""
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = schema.get("required")
    names = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    return {name: _value(properties.get(name), text, depth + 1) for name in names}


def _value(schema: Any, text: str, depth: int) -> Any:
    if not isinstance(schema, dict):
        return text[:MAX_STRING_ARGUMENT]
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "integer":
        return 42
    if kind == "number":
        return 4.2
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return arguments_for(schema, text, depth) if depth < _MAX_SCHEMA_DEPTH else {}
    if kind == "null":
        return None
    return text[:MAX_STRING_ARGUMENT]


def _forced_tool(wire: Wire, choice: Any) -> str | None:
    """The tool ``tool_choice`` forces; "" when it forbids tools; None when the model picks."""
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return ""
    if not isinstance(choice, dict):
        return None
    if wire == "openai" and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        return name if isinstance(name, str) else None
    if wire == "anthropic" and choice.get("type") == "tool":
        name = choice.get("name")
        return name if isinstance(name, str) else None
    return None


def _parallel_allowed(wire: Wire, body: dict[str, Any]) -> bool:
    if wire == "openai":
        return body.get("parallel_tool_calls") is not False
    choice = body.get("tool_choice")
    return not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True)


def _named_in(tools: list[tuple[str, dict[str, Any]]], text: str) -> tuple[str, dict[str, Any]]:
    """The tool whose name appears first in ``text`` (as a whole word); else the first tool."""
    found = []
    for tool in tools:
        hit = re.search(rf"(?<![\w-]){re.escape(tool[0])}(?![\w-])", text)
        if hit:
            found.append((hit.start(), tool))
    return min(found, key=lambda f: f[0])[1] if found else tools[0]


def _call_id(wire: Wire, messages: list[Any], index: int) -> str:
    # From the conversation, not the whole body: streamed or not, retried or not, the same ID.
    digest = hashlib.sha256(orjson.dumps([messages, index], option=orjson.OPT_SORT_KEYS))
    return ("call_" if wire == "openai" else "toolu_") + digest.hexdigest()[:24]
