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

from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from llmstream.processors.providers import (
    Completion,
    ErrorType,
    ProviderError,
    endpoint_label,
    endpoint_url,
    malformed_response,
    request_id_header,
    status_classification,
    status_error,
    transport_error,
)
from llmstream.schemas.models import LLMRequest

__all__ = ["ANTHROPIC_VERSION", "AnthropicMessages"]

ANTHROPIC_VERSION = "2023-06-01"

FINISH_REASONS = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}

_ERROR_TYPES: dict[str, ErrorType] = {
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
# A 429 carrying this error_code is the monthly spend cap, not a rate limit: no retry helps.
_SPEND_LIMIT_CODE = "enforced_spend_limit_reached"


class AnthropicMessages:
    """An adapter for Anthropic's Messages API (non-streaming)."""

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: SecretStr | None = None,
        extra_headers: dict[str, str] | None = None,
        *,
        default_max_tokens: int = 4096,
    ) -> None:
        self.name = name
        self._client = client
        # Accept a base URL that already ends in /v1, as some gateways document it.
        base = httpx.URL(base_url)
        base = base.copy_with(path=base.path.rstrip("/").removesuffix("/v1"))
        self._url = endpoint_url(str(base), "/v1/messages")
        self._default_max_tokens = default_max_tokens
        headers = {
            **(extra_headers or {}),
            "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json",
        }
        secrets = list((extra_headers or {}).values())
        if api_key is not None and api_key.get_secret_value():
            headers["x-api-key"] = api_key.get_secret_value()
            secrets.append(api_key.get_secret_value())
        self._headers = headers
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        return f"AnthropicMessages(name={self.name!r}, url={endpoint_label(self._url)!r})"

    async def complete(self, request: LLMRequest, model: str) -> Completion:
        """Send one message request; raise ProviderError on any failure."""
        body = request_body(request, model, self._default_max_tokens)
        if not body["messages"]:
            raise ProviderError(
                f"{self.name}: the request has only system messages; the Messages API needs "
                "at least one user or assistant message",
                provider=self.name,
                error_type="invalid_request",
                retryable=False,
            )
        headers = dict(self._headers)
        headers["x-client-request-id"] = request_id_header(request.request_id)
        try:
            response = await self._client.post(
                self._url, content=orjson.dumps(body), headers=headers
            )
        except httpx.RequestError as exc:
            raise transport_error(self.name, self._url, exc, self._secrets) from exc
        if not response.is_success:
            raise self._status_error(response)
        return self._parse(response, model)

    def _parse(self, response: httpx.Response, requested_model: str) -> Completion:
        try:
            data = orjson.loads(response.content)
            blocks = data["content"]
            text = "".join(b["text"] for b in blocks if b.get("type") == "text")
            usage = data.get("usage") or {}
            # input_tokens excludes prompt-cache reads and writes; add them so prompt_tokens
            # means what OpenAI's does (every prompt token). They are 0 without prompt caching.
            prompt = sum(
                int(usage.get(key) or 0)
                for key in (
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                )
            )
            completion = int(usage.get("output_tokens") or 0)
            stop_reason = data.get("stop_reason")
            return Completion(
                content=text,
                finish_reason=FINISH_REASONS.get(stop_reason, stop_reason),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                provider=self.name,
                model=str(data.get("model") or requested_model),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            reason = f"no content blocks ({type(exc).__name__})"
            raise malformed_response(self.name, response, reason, self._secrets) from None

    def _status_error(self, response: httpx.Response) -> ProviderError:
        error_type, retryable = status_classification(response.status_code)
        kind, code, message = _error_fields(response)
        error_type = _ERROR_TYPES.get(kind, error_type)
        if response.status_code == 429 and code == _SPEND_LIMIT_CODE:
            retryable = False
        label = "/".join(part for part in (kind, code) if part)
        detail = f"{label}: {message}" if label else message
        return status_error(
            self.name,
            response,
            error_type=error_type,
            retryable=retryable,
            detail=detail,
            secrets=self._secrets,
        )


def request_body(request: LLMRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The JSON body for ``request`` (see the module docstring for the translation)."""
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
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens or default_max_tokens,
        "messages": messages,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    return body


def _error_fields(response: httpx.Response) -> tuple[str, str, str]:
    """``(error.type, error.details.error_code, error.message)``; empty strings when absent."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "", "", ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", "", ""
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    kind, message = error.get("type"), error.get("message")
    return (
        kind if isinstance(kind, str) else "",
        code if isinstance(code, str) else "",
        message if isinstance(message, str) else "",
    )
