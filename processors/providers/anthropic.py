"""The Anthropic Messages wire format.

``POST {base_url}/v1/messages`` with ``base_url`` given the way ``ANTHROPIC_BASE_URL`` is
(``https://api.anthropic.com``, no ``/v1``). Errors arrive as ``{"type": "error", "error":
{"type", "message"}, "request_id"}``; 529 ``overloaded_error`` is Anthropic's own status.

How the provider-neutral request is translated:

- ``system`` messages are joined (blank line between) into the top-level ``system`` parameter;
- ``max_tokens`` is required here: the request's, else the configured default;
- ``stop`` becomes ``stop_sequences``; ``name`` has no field and is dropped;
- a ``tool`` message becomes a ``user`` turn whose text says it is a tool result. Anthropic's
  structured ``tool_result`` block needs the ``tool_use_id`` of a ``tool_use`` block in the
  previous assistant turn, and the event carries neither, so a structured block would be
  rejected. Consecutive ``user`` turns are combined into one by the API;
- user and assistant turns are sent in the order given.

Streamed (``"stream": true``), the answer comes as named events: ``message_start`` (the model and
the prompt's usage), ``content_block_start`` / ``content_block_delta`` (``text_delta``) /
``content_block_stop`` per block, ``message_delta`` (``stop_reason`` and the output's usage),
``message_stop``; ``ping`` at any time. An ``error`` event is the provider failing mid-stream
(e.g. ``overloaded_error``), classified by its type. Other events and deltas (thinking, tool
input) add no text, as only text blocks do in a whole answer.
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
from llmstream.processors.providers.sse import ServerSentEvent
from llmstream.schemas.models import LLMRequest

__all__ = ["ANTHROPIC_VERSION", "AnthropicMessages"]

ANTHROPIC_VERSION = "2023-06-01"

FINISH_REASONS = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}
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
    ) -> None:
        super().__init__(name, client, base_url, api_key, extra_headers)
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
        system: list[str] = []
        messages: list[dict[str, str]] = []
        for m in request.messages:
            # Only an assistant turn that calls tools may have no text.
            text = m.content or ""
            if m.role == "system":
                system.append(text)
            elif m.role == "tool":
                label = f"Tool result ({m.name})" if m.name else "Tool result"
                messages.append({"role": "user", "content": f"{label}:\n{text}"})
            else:
                messages.append({"role": m.role, "content": text})
        if not messages:
            raise ProviderError(
                f"{self.name}: the request has only system messages; the Messages API needs "
                "at least one user or assistant message",
                provider=self.name,
                error_type="invalid_request",
                retryable=False,
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
        }

    def parse_completion(self, data: Any, requested_model: str) -> Completion:
        text = "".join(b["text"] for b in data["content"] if b.get("type") == "text")
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
            return str(delta["text"]) if delta.get("type") == "text_delta" else ""
        if kind == "content_block_start":
            block = data["content_block"]
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
