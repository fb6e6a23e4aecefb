"""The OpenAI Chat Completions wire format: OpenAI itself, OpenRouter, Ollama, vLLM and the like.

``POST {base_url}/chat/completions`` with ``base_url`` given the way ``OPENAI_BASE_URL`` is
(``https://api.openai.com/v1``). Errors arrive as ``{"error": {"message", "type", "param",
"code"}}``; OpenRouter puts the HTTP status in ``code``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from llmstream.processors.providers import (
    Completion,
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

__all__ = ["OpenAICompatible"]

# 429s that mean money or quota ran out, not "slow down": retrying cannot succeed until a person
# acts, so they are not retryable (OpenAI's documented error.type / error.code values).
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_usage_limit_exceeded",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "billing_hard_limit_reached",
    }
)


class OpenAICompatible:
    """An adapter for any endpoint that speaks OpenAI's Chat Completions API."""

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: SecretStr | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._client = client
        self._url = endpoint_url(base_url, "/chat/completions")
        headers = {**(extra_headers or {}), "content-type": "application/json"}
        secrets = list((extra_headers or {}).values())
        if api_key is not None and api_key.get_secret_value():
            headers["authorization"] = f"Bearer {api_key.get_secret_value()}"
            secrets.append(api_key.get_secret_value())
        self._headers = headers
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        return f"OpenAICompatible(name={self.name!r}, url={endpoint_label(self._url)!r})"

    async def complete(self, request: LLMRequest, model: str) -> Completion:
        """Send one chat completion; raise ProviderError on any failure."""
        headers = dict(self._headers)
        headers["x-client-request-id"] = request_id_header(request.request_id)
        try:
            response = await self._client.post(
                self._url, content=orjson.dumps(request_body(request, model)), headers=headers
            )
        except httpx.RequestError as exc:
            raise transport_error(self.name, self._url, exc, self._secrets) from exc
        if not response.is_success:
            raise self._status_error(response)
        return self._parse(response, model)

    def _parse(self, response: httpx.Response, requested_model: str) -> Completion:
        try:
            data = orjson.loads(response.content)
            choice = data["choices"][0]
            message = choice["message"]
            usage = data.get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            total = int(usage.get("total_tokens") or prompt + completion)
            return Completion(
                content=str(message.get("content") or ""),
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=total,
                provider=self.name,
                model=str(data.get("model") or requested_model),
            )
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            reason = f"no choices[0].message ({type(exc).__name__})"
            raise malformed_response(self.name, response, reason, self._secrets) from None

    def _status_error(self, response: httpx.Response) -> ProviderError:
        error_type, retryable = status_classification(response.status_code)
        kind, code, message = _error_fields(response)
        if response.status_code == 429 and (kind in QUOTA_CODES or code in QUOTA_CODES):
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


def request_body(request: LLMRequest, model: str) -> dict[str, Any]:
    """The JSON body for ``request``; optional sampling fields only when the request sets them."""
    messages: list[dict[str, str]] = []
    for m in request.messages:
        item = {"role": m.role, "content": m.content}
        if m.name is not None:
            item["name"] = m.name
        messages.append(item)
    body: dict[str, Any] = {"model": model, "messages": messages}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    return body


def _error_fields(response: httpx.Response) -> tuple[str, str, str]:
    """``(type, code, message)`` of an OpenAI-style error body; empty strings when absent."""
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "", "", ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", "", ""

    def text(value: object) -> str:
        return "" if value is None else str(value)

    return text(error.get("type")), text(error.get("code")), text(error.get("message"))
