"""OpenAI's Chat Completions and Anthropic's Messages API as the provider simulator speaks them:
what a request must look like, the (deterministic) answer, and error bodies.

The answer, in order: tool calls when they are due (see :mod:`llmstream.devtools.sim_tools`);
else ``"Tool results: <content1>; <content2>"`` when the conversation holds tool results; else
``"echo: <last user message>"`` (truncated to 200 characters). On OpenAI, a ``response_format``
of type ``json_object`` makes that text ``{"answer": "<text>"}``; ``json_schema`` fills the
schema's required properties (strings with the text). Text is cut at the first stop sequence and
at ``max_tokens`` words. A token is a whitespace-separated word.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from llmstream.devtools.sim_tools import (
    ToolUse,
    Wire,
    arguments_for,
    read_conversation,
    tool_calls_due,
)

__all__ = [
    "ECHO_PREFIX",
    "Reply",
    "Wire",
    "anthropic_envelope",
    "anthropic_message",
    "check_anthropic",
    "check_openai",
    "error_body",
    "last_user_text",
    "openai_completion",
    "openai_id",
    "openai_usage",
    "reply_to",
]

ECHO_PREFIX = "echo: "
TOOL_RESULTS_PREFIX = "Tool results: "
MAX_ECHO_CHARS = 200

Ended = Literal["end", "stop", "length", "tool"]

_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
_OPENAI_FINISH = {"end": "stop", "stop": "stop", "length": "length", "tool": "tool_calls"}
_ANTHROPIC_STOP = {
    "end": "end_turn",
    "stop": "stop_sequence",
    "length": "max_tokens",
    "tool": "tool_use",
}


def check_openai(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _OPENAI_ROLES:
            return f"messages[{i}]: invalid role"
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            return f"messages[{i}].tool_call_id: Field required for role 'tool'"
    if body.get("stream_options") is not None and body.get("stream") is not True:
        return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid array"
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                return f"tools[{i}].function.name: Field required"
            if function.get("parameters") is not None and not isinstance(
                function["parameters"], dict
            ):
                return f"tools[{i}].function.parameters: Input should be an object"
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        return (
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
            "specified."
        )
    if choice is not None and choice not in ("none", "auto", "required"):
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            return "tool_choice: Invalid value"
        if name not in {t["function"]["name"] for t in tools or []}:
            return f"tool_choice: no function named '{name}' in tools"
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in ("text", "json_object", "json_schema")
    ):
        return "response_format.type: Invalid value"
    return _check_common(body, "stop")


def check_anthropic(body: Any, version: str | None) -> str | None:
    if not version:
        return "anthropic-version: header is required"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return (
                f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
    if "system" in body and not isinstance(body["system"], str | list):
        return "system: Input should be a valid string"
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                return f"tools.{i}.name: Field required"
            if "type" not in tool and not isinstance(tool.get("input_schema"), dict):
                return f"tools.{i}.custom.input_schema: Field required"
    choice = body.get("tool_choice")
    if choice is not None and (
        not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none")
    ):
        return "tool_choice: Input tag does not match any of the expected tags"
    return _check_common(body, "stop_sequences")


def _check_common(body: dict[str, Any], stop_field: str) -> str | None:
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            return f"{field}: Input should be a valid number"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: Input should be a valid boolean"
    stop = body.get(stop_field)
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return f"{stop_field}: Input should be a list of strings"
    return None


def _text(content: Any) -> str:
    """All the text of a message's content, tool results included (to count prompt tokens)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text", part.get("content"))) for part in content if part)
    return ""


def _tokens(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True, slots=True)
class Reply:
    """The simulated model's answer to one request, before it is written in a wire format."""

    text: str
    ended: Ended
    stop_sequence: str  # the stop sequence hit, or ""
    tool_uses: tuple[ToolUse, ...]
    prompt_tokens: int
    completion_tokens: int

    @property
    def openai_finish(self) -> str:
        return _OPENAI_FINISH[self.ended]

    @property
    def anthropic_stop(self) -> str:
        return _ANTHROPIC_STOP[self.ended]


def reply_to(wire: Wire, body: dict[str, Any]) -> Reply:
    """The answer to a valid ``body``: the same whether it is streamed or not."""
    messages: list[dict[str, Any]] = body["messages"]
    prompt = sum(_tokens(_text(m.get("content"))) for m in messages)
    if wire == "anthropic":
        prompt += _tokens(_text(body.get("system")))
    talk = read_conversation(wire, messages)
    calls = tool_calls_due(wire, body, talk)
    if calls:
        spoken = sum(max(1, _tokens(call.arguments_json)) for call in calls)
        return Reply("", "tool", "", calls, prompt, spoken)
    if talk.tool_results:
        text = TOOL_RESULTS_PREFIX + "; ".join(talk.tool_results)
    else:
        text = (ECHO_PREFIX + talk.last_user)[:MAX_ECHO_CHARS]
    if wire == "openai":
        text = _formatted(body.get("response_format"), text)
    text, ended, hit = _cut(text, body.get("stop" if wire == "openai" else "stop_sequences"), body)
    return Reply(text, ended, hit, (), prompt, _tokens(text))


def _formatted(response_format: Any, text: str) -> str:
    """``text`` as the JSON object a ``response_format`` asks for."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("json_object", "json_schema"):
        return text
    answer: dict[str, Any] = {"answer": text}
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if isinstance(schema, dict) and schema.get("properties"):
        answer = arguments_for(schema, text)
    return orjson.dumps(answer).decode()


def _cut(text: str, stop: Any, body: dict[str, Any]) -> tuple[str, Ended, str]:
    """``(text, why it ended, the stop sequence hit or "")`` after stops and ``max_tokens``."""
    ended: Ended = "end"
    hit = ""
    stops = [stop] if isinstance(stop, str) else stop or []
    cut = min(((text.find(s), s) for s in stops if s and s in text), default=None)
    if cut is not None:
        text, ended, hit = text[: cut[0]], "stop", cut[1]
    max_tokens = body.get("max_tokens")
    words = text.split()
    if isinstance(max_tokens, int) and len(words) > max_tokens:
        text, ended, hit = " ".join(words[:max_tokens]), "length", ""
    return text, ended, hit


def last_user_text(wire: Wire, body: dict[str, Any]) -> str:
    """The text of the last user message of a valid ``body`` (tool results left out)."""
    return read_conversation(wire, body["messages"]).last_user


def openai_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_completion(body: dict[str, Any], number: int) -> dict[str, Any]:
    """The Chat Completions answer to a valid ``body``; ``number`` makes its ID unique."""
    reply = reply_to("openai", body)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if reply.tool_uses else reply.text,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool_uses:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for call in reply.tool_uses
        ]
    return {
        "id": openai_id(number),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.openai_finish,
            }
        ],
        "usage": openai_usage(reply),
        "service_tier": "default",
        "system_fingerprint": "fp_simulator",
    }


def anthropic_message(body: dict[str, Any], number: int) -> dict[str, Any]:
    """The Messages API answer to a valid ``body``; ``number`` makes its ID unique."""
    reply = reply_to("anthropic", body)
    content: list[dict[str, Any]] = [
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        for call in reply.tool_uses
    ] or [{"type": "text", "text": reply.text}]
    return {
        **anthropic_envelope(body, number, reply),
        "content": content,
        "stop_reason": reply.anthropic_stop,
        "stop_sequence": reply.stop_sequence or None,
    }


def anthropic_envelope(body: dict[str, Any], number: int, reply: Reply) -> dict[str, Any]:
    """A Messages API message without its content and stop reason (as a stream starts it)."""
    return {
        "id": f"msg_sim{number:018d}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": reply.completion_tokens,
            "service_tier": "standard",
        },
    }


def openai_id(number: int) -> str:
    return f"chatcmpl-sim{number:012d}"


# --- errors, in each provider's own shape ----------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM). Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
}
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def error_body(wire: Wire, status: int, message: str | None, number: int) -> dict[str, Any]:
    """An error as the provider writes it; ``message`` replaces the usual text."""
    if wire == "openai":
        fallback = _OPENAI_ERRORS[500 if status >= 500 else 400]
        kind, code, text = _OPENAI_ERRORS.get(status, fallback)
        return {"error": {"message": message or text, "type": kind, "param": None, "code": code}}
    kind, text = _ANTHROPIC_ERRORS.get(status, _ANTHROPIC_ERRORS[500 if status >= 500 else 400])
    return {
        "type": "error",
        "error": {"type": kind, "message": message or text},
        "request_id": f"req_sim{number:018d}",
    }
