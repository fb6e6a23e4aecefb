"""LLM provider adapters behind one small Protocol, and the router that picks one per request.

Wire formats live in one module per API family (`openai.py`, `anthropic.py`); the environment is
read in `settings.py`, which also builds the router. Adapters receive one shared HTTP client
(`create_http_client`) and never build their own.

Failures are :class:`ProviderError` (see `llmstream.core.errors` for the tree); it carries what the
retry policy needs: ``retryable``, ``retry_after`` and the status code.
"""

from __future__ import annotations

import email.utils
import math
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from llmstream.core.errors import LLMStreamError
from llmstream.schemas.models import LLMRequest

__all__ = [
    "Completion",
    "ErrorType",
    "Provider",
    "ProviderError",
    "ProviderRouter",
    "create_http_client",
    "parse_retry_after",
]

ErrorType = Literal[
    "provider_error",
    "rate_limited",
    "timeout",
    "auth_error",
    "invalid_request",
    "connection_error",
    "not_found",
    "expired",
]

MAX_ERROR_BODY_CHARS = 1024
_MAX_MESSAGE_DETAIL_CHARS = 300
_REDACTED = "[REDACTED]"


@dataclass(frozen=True, slots=True)
class Completion:
    """One successful, non-streamed answer, in the provider-neutral shape the worker publishes."""

    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    provider: str
    model: str


class Provider(Protocol):
    """Anything that answers an :class:`LLMRequest`; ``model`` comes without its provider prefix."""

    name: str

    async def complete(self, request: LLMRequest, model: str) -> Completion: ...


class ProviderError(LLMStreamError):
    """A provider call failed.

    ``error_type`` is one of :data:`ErrorType`; ``retryable`` says whether the same call may
    succeed later; ``retry_after`` (seconds) is what the server asked for, if it said;
    ``attempts`` is set by the retry loop to the number of calls made. ``body`` is the start of
    the provider's error body. Secrets the adapter knows are redacted before they get here.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        error_type: ErrorType,
        retryable: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.error_type: ErrorType = error_type
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body[:MAX_ERROR_BODY_CHARS] if body is not None else None
        self.attempts = 0

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, provider={self.provider!r}, "
            f"error_type={self.error_type!r}, status_code={self.status_code!r}, "
            f"retryable={self.retryable!r}, retry_after={self.retry_after!r}, "
            f"attempts={self.attempts!r})"
        )


class ProviderRouter:
    """Maps a request to ``(provider, bare model)``.

    Rules, in order:

    1. ``request.provider`` set: that provider; a leading ``"<provider>/"`` on the model is
       removed, any other slash is part of the model name (OpenRouter's ``openai/gpt-4o``).
    2. Otherwise the model's first path segment names the provider:
       ``openrouter/meta-llama/llama-3-8b`` → ``openrouter``, ``meta-llama/llama-3-8b``.

    Endpoints come from configuration only; nothing in the event can point a call elsewhere.
    """

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)

    @property
    def names(self) -> list[str]:
        """The configured provider names, sorted."""
        return sorted(self._providers)

    def get(self, name: str) -> Provider | None:
        """The provider called ``name``, if configured."""
        return self._providers.get(name)

    def resolve(self, request: LLMRequest) -> tuple[Provider, str]:
        """Pick the provider and the model name to send it; unknown provider → ProviderError."""
        if request.provider is not None:
            name = request.provider
            model = request.model.removeprefix(f"{name}/")
        else:
            name, sep, model = request.model.partition("/")
            if not sep:
                raise self._unknown(
                    None,
                    f"model {request.model!r} names no provider: write it as "
                    f"'<provider>/{request.model}' or set the request's provider field",
                )
        provider = self._providers.get(name)
        if provider is None:
            raise self._unknown(name, f"unknown provider {name!r} for model {request.model!r}")
        if not model:
            raise self._unknown(name, f"model {request.model!r} has no model name after {name!r}")
        return provider, model

    def _unknown(self, name: str | None, message: str) -> ProviderError:
        known = ", ".join(self.names) or "none configured"
        return ProviderError(
            f"{message} (known providers: {known})",
            provider=name or "",
            error_type="invalid_request",
            retryable=False,
        )


def create_http_client(timeout_s: float, max_connections: int) -> httpx.AsyncClient:
    """The one shared HTTP client for every adapter, on the `httpx-aiohttp` transport.

    httpx's default transport collapses with hundreds of calls in flight (encode/httpx#3215);
    aiohttp's connection pool does not. ``max_connections`` bounds concurrent sockets over all
    providers: calls beyond it wait for a free connection, within the same ``timeout_s``.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    return HttpxAiohttpClient(timeout=httpx.Timeout(timeout_s), limits=limits)


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, or None.

    ``retry-after-ms`` (OpenAI's) wins over ``Retry-After``, which may be seconds (integer or,
    non-standard, a float) or an HTTP-date. Negative waits become 0; unusable values are ignored.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; a zone-less one is read the same way
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# --- shared by the adapters -----------------------------------------------------------------


def request_id_header(request_id: str) -> str:
    """The request ID as a header value: non-ASCII is percent-encoded, as headers are ASCII."""
    if request_id.isascii():
        return request_id
    return urllib.parse.quote(request_id, safe="".join(chr(c) for c in range(0x20, 0x7F)))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced, so an echoed key never reaches a log or a topic."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    return text


def endpoint_url(base_url: str, path: str) -> httpx.URL:
    """``path`` appended to the base URL's path; a query string (Azure's api-version) is kept.

    Parsed once here: handing httpx a ready URL saves re-parsing a string on every call.
    """
    base = httpx.URL(base_url)
    return base.copy_with(path=base.path.rstrip("/") + path)


def endpoint_label(url: str | httpx.URL) -> str:
    """Scheme, host, port and path of ``url``: no credentials, no query string."""
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def status_classification(status_code: int) -> tuple[ErrorType, bool]:
    """``(error_type, retryable)`` from the HTTP status alone; adapters refine it from the body."""
    if status_code in (401, 403):
        return "auth_error", False
    if status_code == 402:  # payment required: an account problem no retry fixes
        return "provider_error", False
    if status_code == 404:
        return "not_found", False
    if status_code == 408:
        return "timeout", True
    if status_code == 409:
        return "provider_error", True
    if status_code == 429:
        return "rate_limited", True
    if status_code >= 500:
        return "provider_error", True
    return "invalid_request", False


def transport_error(
    provider: str, url: httpx.URL, exc: httpx.RequestError, secrets: Iterable[str]
) -> ProviderError:
    """Classify a failure below HTTP: timeouts and broken connections are retryable."""
    where = endpoint_label(url)
    # The transport's own exception (aiohttp's) names the failure better than httpx's mapping.
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    kind = type(cause).__name__
    detail = redact(str(cause) or kind, secrets)[:_MAX_MESSAGE_DETAIL_CHARS]
    # httpx-aiohttp maps every aiohttp ClientConnectionError (refused, reset, server went away)
    # to httpx.ConnectTimeout; only a TimeoutError underneath is really a timeout.
    if isinstance(exc, httpx.TimeoutException) and (
        exc.__cause__ is None or isinstance(exc.__cause__, TimeoutError)
    ):
        return ProviderError(
            f"{provider}: timed out calling {where} ({kind}: {detail})",
            provider=provider,
            error_type="timeout",
            retryable=True,
        )
    if isinstance(exc, httpx.UnsupportedProtocol):
        # A misconfigured base URL: retrying cannot help.
        return ProviderError(
            f"{provider}: cannot call {where}: {detail}",
            provider=provider,
            error_type="connection_error",
            retryable=False,
        )
    if isinstance(exc, httpx.TransportError):
        return ProviderError(
            f"{provider}: connection to {where} failed ({kind}: {detail})",
            provider=provider,
            error_type="connection_error",
            retryable=True,
        )
    # Decoding errors, redirect loops: the server answered something we cannot use.
    return ProviderError(
        f"{provider}: unusable response from {where} ({kind}: {detail})",
        provider=provider,
        error_type="provider_error",
        retryable=False,
    )


def status_error(
    provider: str,
    response: httpx.Response,
    *,
    error_type: ErrorType,
    retryable: bool,
    detail: str,
    secrets: Iterable[str],
) -> ProviderError:
    """A ProviderError for a non-2xx answer; the adapter has classified it."""
    secrets = tuple(secrets)
    body = redact(response.content[: MAX_ERROR_BODY_CHARS * 4].decode("utf-8", "replace"), secrets)
    detail = redact(detail, secrets)[:_MAX_MESSAGE_DETAIL_CHARS]
    message = f"{provider}: HTTP {response.status_code} from {endpoint_label(response.url)}"
    if detail:
        message = f"{message}: {detail}"
    return ProviderError(
        message,
        provider=provider,
        error_type=error_type,
        retryable=retryable,
        status_code=response.status_code,
        retry_after=parse_retry_after(response.headers),
        body=body,
    )


def malformed_response(
    provider: str, response: httpx.Response, reason: str, secrets: Iterable[str]
) -> ProviderError:
    """A 2xx answer that is not the documented shape (a proxy's HTML page, a truncated body)."""
    body = response.content[: MAX_ERROR_BODY_CHARS * 4].decode("utf-8", "replace")
    return ProviderError(
        f"{provider}: malformed response from {endpoint_label(response.url)}: {reason}",
        provider=provider,
        error_type="provider_error",
        retryable=False,
        status_code=response.status_code,
        body=redact(body, secrets),
    )
