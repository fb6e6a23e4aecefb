"""OpenAI's Chat Completions and Anthropic's Messages API as the provider simulator speaks them:
what a request must look like, the (deterministic) answer, and error bodies.

The answer is ``"echo: <last user message>"`` (truncated to 200 characters), cut at the first
stop sequence and at ``max_tokens`` words. A token is a whitespace-separated word.
"""

from __future__ import annotations

import time
from typing import Any, Literal

Wire = Literal["openai", "anthropic"]

ECHO_PREFIX = "echo: "
MAX_ECHO_CHARS = 200

_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


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
    return _check_common(body, "stop_sequences")


def _check_common(body: dict[str, Any], stop_field: str) -> str | None:
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            return f"{field}: Input should be a valid number"
    stop = body.get(stop_field)
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return f"{stop_field}: Input should be a list of strings"
    return None


def _text(content: Any) -> str:
    """The text of a message's content: a string, or a list of text-bearing blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text", part.get("content"))) for part in content if part)
    return ""


def _tokens(text: str) -> int:
    return len(text.split())


def _reply(body: dict[str, Any], stop: Any) -> tuple[str, Literal["end", "stop", "length"], str]:
    """``(content, why it ended, the stop sequence hit or "")`` for a request body."""
    last_user = next(
        (_text(m.get("content")) for m in reversed(body["messages"]) if m.get("role") == "user"),
        "",
    )
    content = (ECHO_PREFIX + last_user)[:MAX_ECHO_CHARS]
    ended: Literal["end", "stop", "length"] = "end"
    hit = ""
    stops = [stop] if isinstance(stop, str) else stop or []
    cut = min(((content.find(s), s) for s in stops if s and s in content), default=None)
    if cut is not None:
        content, ended, hit = content[: cut[0]], "stop", cut[1]
    max_tokens = body.get("max_tokens")
    words = content.split()
    if isinstance(max_tokens, int) and len(words) > max_tokens:
        content, ended, hit = " ".join(words[:max_tokens]), "length", ""
    return content, ended, hit


def openai_completion(body: dict[str, Any], number: int) -> dict[str, Any]:
    """The Chat Completions answer to a valid ``body``; ``number`` makes its ID unique."""
    content, ended, _ = _reply(body, body.get("stop"))
    prompt = sum(_tokens(_text(m.get("content"))) for m in body["messages"])
    completion = _tokens(content)
    return {
        "id": f"chatcmpl-sim{number:012d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if ended == "length" else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_simulator",
    }


def anthropic_message(body: dict[str, Any], number: int) -> dict[str, Any]:
    """The Messages API answer to a valid ``body``; ``number`` makes its ID unique."""
    content, ended, hit = _reply(body, body.get("stop_sequences"))
    prompt = _tokens(_text(body.get("system"))) + sum(
        _tokens(_text(m.get("content"))) for m in body["messages"]
    )
    stop_reason = {"end": "end_turn", "stop": "stop_sequence", "length": "max_tokens"}[ended]
    return {
        "id": f"msg_sim{number:018d}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": content}],
        "stop_reason": stop_reason,
        "stop_sequence": hit or None,
        "usage": {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": _tokens(content),
            "service_tier": "standard",
        },
    }


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
