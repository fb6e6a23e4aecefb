"""The Anthropic Messages wire format.

``POST {base_url}/v1/messages`` with ``base_url`` given the way ``ANTHROPIC_BASE_URL`` is
(``https://api.anthropic.com``, no ``/v1``). Errors arrive as ``{"type": "error", "error":
{"type", "message"}, "request_id"}``; 529 ``overloaded_error`` is Anthropic's own status.

How the provider-neutral request is translated:

- ``system`` messages are joined (blank line between) into the top-level ``system`` parameter;
- ``max_tokens`` is required here: the request's, else the configured default;
- ``stop`` becomes ``stop_sequences``; ``name`` has no field and is dropped;
- ``tools`` become ``{name, description, input_schema, strict}``, the function's ``parameters``
  as ``input_schema`` (``{"type": "object"}`` when it has none, and ``type`` added when left out);
- ``tool_choice`` ``auto``/``required``/``none``/a function become ``{"type": "auto"}``,
  ``{"type": "any"}``, ``{"type": "none"}``, ``{"type": "tool", "name": ...}``;
  ``parallel_tool_calls: false`` is ``disable_parallel_tool_use: true`` in it. Both go with
  ``tools`` only: the API refuses a tool choice without tools;
- an assistant message's ``tool_calls`` become ``tool_use`` blocks after its text (``input`` is the
  call's parsed arguments, ``{}`` for empty ones: arguments that are not a JSON object fail the
  request before any call);
- consecutive ``tool`` messages (system messages between them aside) become one ``user`` turn of
  ``tool_result`` blocks (``tool_use_id``, ``content``). Consecutive ``user`` turns are combined
  into one by the API;
- ``response_format`` ``json_object`` or ``json_schema`` has no equivalent here: the request fails
  (``invalid_request``) before any call;
- user and assistant turns are sent in the order given;
- ``service_tier`` is not sent: Anthropic has no flex tier, so a flex request is served (and
  priced) as standard; its batch tier is the Message Batches API, not a field of this call.

An answer's text blocks are joined into the content, its ``tool_use`` blocks become tool calls
(``arguments`` the compact JSON text of ``input``), and ``stop_reason: "tool_use"`` is the finish
reason ``"tool_calls"``.

Streamed (``"stream": true``), the answer comes as named events: ``message_start`` (the model and
the prompt's usage), ``content_block_start`` / ``content_block_delta`` (``text_delta``) /
``content_block_stop`` per block, ``message_delta`` (``stop_reason`` and the output's usage),
``message_stop``; ``ping`` at any time. A ``tool_use`` block starts with its ID and name, and its
input comes as ``input_json_delta`` pieces of partial JSON, read whole once the stream ends. An
``error`` event is the provider failing mid-stream (e.g. ``overloaded_error``), classified by its
type. Other events and deltas (thinking) add nothing, as only text and tool use blocks do in a
whole answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
import orjson
from pydantic import SecretStr
from yarl import URL

from llmstream.processors.providers import Completion, ErrorType, ProviderError
from llmstream.processors.providers.http import (
    MAX_TOKEN_COUNT,
    ErrorFields,
    HTTPAdapter,
    StreamedAnswer,
    endpoint_url,
    present,
    text_field,
    token_count,
)
from llmstream.processors.providers.pool import ConnectionPool
from llmstream.processors.providers.sse import ServerSentEvent
from llmstream.processors.providers.toolcalls import PartialCall, input_arguments, tool_calls
from llmstream.schemas.models import LLMRequest, ToolCall, ToolChoiceFunction

__all__ = ["ANTHROPIC_VERSION", "AnthropicMessages"]

ANTHROPIC_VERSION = "2023-06-01"

FINISH_REASONS = {
    "end_turn": "stop",
    "max_tokens": "length",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
}
# input_tokens excludes prompt-cache reads and writes; adding them makes prompt_tokens mean what
# OpenAI's does (every prompt token). They are 0 without prompt caching.
_PROMPT_TOKEN_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class AnthropicMessages(HTTPAdapter):
    """An adapter for Anthropic's Messages API."""

    error_types: ClassVar[Mapping[str, ErrorType]] = {
        "invalid_request_error": "invalid_request",
        "authentication_error": "auth_error",
        "permission_error": "auth_error",
        "not_found_error": "not_found",
        "request_too_large": "invalid_request",
        "rate_limit_error": "rate_limited",
        "api_error": "provider_error",
        "overloaded_error": "provider_error",
        "billing_error": "provider_error",
        "timeout_error": "timeout",
    }
    # The status each error type comes with, for an error event in a stream.
    error_statuses: ClassVar[Mapping[str, int]] = {
        "invalid_request_error": 400,
        "authentication_error": 401,
        "billing_error": 402,
        "permission_error": 403,
        "not_found_error": 404,
        "request_too_large": 413,
        "rate_limit_error": 429,
        "api_error": 500,
        "timeout_error": 504,
        "overloaded_error": 529,
    }
    # A 429 carrying this error_code is the monthly spend cap, not a rate limit.
    quota_codes = frozenset({"enforced_spend_limit_reached"})
    success_shape = "content blocks"

    def __init__(
        self,
        name: str,
        client: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr | None = None,
        extra_headers: Mapping[str, str] | None = None,
        *,
        default_max_tokens: int = 4096,
        pool: ConnectionPool | None = None,
    ) -> None:
        super().__init__(name, client, base_url, api_key, extra_headers, pool=pool)
        self._default_max_tokens = default_max_tokens

    def endpoint(self, base_url: str) -> URL:
        # Accept a base URL that already ends in /v1, as some gateways document it.
        base = URL(base_url)
        base = base.with_path(base.path.rstrip("/").removesuffix("/v1"), keep_query=True)
        return endpoint_url(str(base), "/v1/messages")

    def wire_headers(self, api_key: str) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def request_body(self, request: LLMRequest, model: str) -> dict[str, Any]:
        """See the module docstring for the translation."""
        if request.response_format is not None and request.response_format.type != "text":
            raise self._refused("response_format is not supported by the anthropic wire format")
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        results: list[dict[str, Any]] | None = None  # the tool_result blocks of the turn just made
        for i, m in enumerate(request.messages):
            if m.role == "tool":
                block = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
                if results is None:
                    results = []
                    messages.append({"role": "user", "content": results})
                results.append(block)
                continue
            # Only an assistant turn that calls tools may have no text.
            text = m.content or ""
            if m.role == "system":
                system.append(text)
                continue
            results = None
            if m.tool_calls:
                blocks = [{"type": "text", "text": text}] if text else []
                blocks.extend(self._tool_use(i, j, call) for j, call in enumerate(m.tool_calls))
                messages.append({"role": m.role, "content": blocks})
            else:
                messages.append({"role": m.role, "content": text})
        if not messages:
            raise self._refused(
                "the request has only system messages; the Messages API needs at least one "
                "user or assistant message"
            )
        return {
            "model": model,
            "max_tokens": request.max_tokens or self._default_max_tokens,
            "messages": messages,
            **present(
                system="\n\n".join(system) if system else None,
                temperature=request.temperature,
                top_p=request.top_p,
                stop_sequences=request.stop or None,
            ),
            **_tool_fields(request),
        }

    def _tool_use(self, i: int, j: int, call: ToolCall) -> dict[str, Any]:
        """Call ``j`` of message ``i`` as a ``tool_use`` block, its arguments parsed."""
        text = call.function.arguments
        try:
            # No text at all is no arguments, as some OpenAI-compatible servers write it.
            arguments = orjson.loads(text) if text.strip() else {}
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise self._refused(
                f"messages.{i}.tool_calls.{j}.function.arguments is not a JSON object; the "
                "anthropic wire format sends a call's arguments as its input object"
            )
        return {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}

    def _refused(self, reason: str) -> ProviderError:
        """A request this API cannot express: refused before any call."""
        return ProviderError(
            f"{self.name}: {reason}",
            provider=self.name,
            error_type="invalid_request",
            retryable=False,
        )

    def parse_completion(self, data: Any, requested_model: str) -> Completion:
        blocks = data["content"]
        text = "".join(b["text"] for b in blocks if b.get("type") == "text")
        calls = [b for b in blocks if b.get("type") == "tool_use"]
        usage = data.get("usage")
        if not isinstance(usage, dict):
            usage = {}  # usage is bookkeeping: without it the answer still counts
        prompt = self._prompt_tokens(usage)
        completion = token_count(self.name, "output_tokens", usage.get("output_tokens"))
        return Completion(
            content=text,
            finish_reason=_finish_reason(data.get("stop_reason")),
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=min(prompt + completion, MAX_TOKEN_COUNT),
            provider=self.name,
            model=str(data.get("model") or requested_model),
            tool_calls=tool_calls(
                (b.get("id"), b.get("name"), input_arguments(b.get("input"), str(b.get("name"))))
                for b in calls
            ),
        )

    def _prompt_tokens(self, usage: Mapping[str, Any]) -> int:
        return min(
            sum(token_count(self.name, key, usage.get(key)) for key in _PROMPT_TOKEN_KEYS),
            MAX_TOKEN_COUNT,
        )

    def stream_fields(self) -> dict[str, Any]:
        return {"stream": True}

    def read_event(self, event: ServerSentEvent, answer: StreamedAnswer) -> str:
        kind = event.event
        if kind == "ping":
            return ""
        data = orjson.loads(event.data)
        kind = kind or data["type"]
        if kind == "content_block_delta":
            delta = data["delta"]
            if delta.get("type") == "input_json_delta":
                answer.calls[int(data["index"])].pieces.append(str(delta["partial_json"]))
            return str(delta["text"]) if delta.get("type") == "text_delta" else ""
        if kind == "content_block_start":
            block = data["content_block"]
            if block.get("type") == "tool_use":
                call = PartialCall(
                    block["id"], block["name"], input_json=True, input=block.get("input")
                )
                answer.calls[int(data["index"])] = call
            return str(block.get("text") or "") if block.get("type") == "text" else ""
        if kind == "message_start":
            message = data["message"]
            answer.model = str(message.get("model") or answer.model)
            self._stream_usage(message.get("usage"), answer)
        elif kind == "message_delta":
            answer.finish_reason = _finish_reason(data["delta"].get("stop_reason"))
            self._stream_usage(data.get("usage"), answer)
        elif kind == "message_stop":
            answer.done = True
        elif kind == "error":
            raise self.stream_error(data.get("error"), event.data)
        return ""

    def _stream_usage(self, usage: object, answer: StreamedAnswer) -> None:
        """Usage from ``message_start`` (the prompt's) or ``message_delta`` (cumulative output
        counts, and the prompt's again on newer API versions): a count given replaces the last."""
        if not isinstance(usage, dict):
            return
        if any(usage.get(key) is not None for key in _PROMPT_TOKEN_KEYS):
            answer.prompt_tokens = self._prompt_tokens(usage)
        if usage.get("output_tokens") is not None:
            answer.completion_tokens = token_count(
                self.name, "output_tokens", usage["output_tokens"]
            )

    def error_fields(self, error: Mapping[str, Any]) -> ErrorFields:
        details = error.get("details")
        return ErrorFields(
            kind=text_field(error.get("type")),
            code=text_field(details.get("error_code")) if isinstance(details, dict) else "",
            message=text_field(error.get("message")),
        )


def _finish_reason(stop: object) -> str | None:
    """Anthropic's ``stop_reason`` in OpenAI's words where they have one."""
    return FINISH_REASONS.get(stop, stop) if isinstance(stop, str) else None


def _tool_fields(request: LLMRequest) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` as the Messages API takes them; none without tools."""
    if not request.tools:
        return {}
    tools = [
        {
            "name": tool.function.name,
            "input_schema": {"type": "object", **(tool.function.parameters or {})},
            **present(description=tool.function.description, strict=tool.function.strict),
        }
        for tool in request.tools
    ]
    choice = request.tool_choice
    serial = request.parallel_tool_calls is False
    wire: dict[str, Any]
    if choice == "none":  # no tool at all: nothing to run in parallel
        wire = {"type": "none"}
    elif isinstance(choice, ToolChoiceFunction):
        wire = {"type": "tool", "name": choice.function.name}
    elif choice == "required":
        wire = {"type": "any"}
    elif choice == "auto" or serial:
        wire = {"type": "auto"}
    else:
        return {"tools": tools}
    if serial and wire["type"] != "none":
        wire["disable_parallel_tool_use"] = True
    return {"tools": tools, "tool_choice": wire}
