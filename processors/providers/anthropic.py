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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
from pydantic import SecretStr
from yarl import URL

from llmstream.processors.providers import Completion, ErrorType, ProviderError
from llmstream.processors.providers.http import (
    MAX_TOKEN_COUNT,
    ErrorFields,
    HTTPAdapter,
    endpoint_url,
    present,
    text_field,
    token_count,
)
from llmstream.schemas.models import LLMRequest

__all__ = ["ANTHROPIC_VERSION", "AnthropicMessages"]

ANTHROPIC_VERSION = "2023-06-01"

FINISH_REASONS = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}
# input_tokens excludes prompt-cache reads and writes; adding them makes prompt_tokens mean what
# OpenAI's does (every prompt token). They are 0 without prompt caching.
_PROMPT_TOKEN_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class AnthropicMessages(HTTPAdapter):
    """An adapter for Anthropic's Messages API (non-streaming)."""

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
            if m.role == "system":
                system.append(m.content)
            elif m.role == "tool":
                label = f"Tool result ({m.name})" if m.name else "Tool result"
                messages.append({"role": "user", "content": f"{label}:\n{m.content}"})
            else:
                messages.append({"role": m.role, "content": m.content})
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
        prompt = min(
            sum(token_count(self.name, key, usage.get(key)) for key in _PROMPT_TOKEN_KEYS),
            MAX_TOKEN_COUNT,
        )
        completion = token_count(self.name, "output_tokens", usage.get("output_tokens"))
        stop = data.get("stop_reason")
        return Completion(
            content=text,
            finish_reason=FINISH_REASONS.get(stop, stop) if isinstance(stop, str) else None,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=min(prompt + completion, MAX_TOKEN_COUNT),
            provider=self.name,
            model=str(data.get("model") or requested_model),
        )

    def error_fields(self, error: Mapping[str, Any]) -> ErrorFields:
        details = error.get("details")
        return ErrorFields(
            kind=text_field(error.get("type")),
            code=text_field(details.get("error_code")) if isinstance(details, dict) else "",
            message=text_field(error.get("message")),
        )
