"""LLM provider adapters behind one small Protocol, and the router that picks one per request.

Wire formats live in one module per API family (`openai.py`, `anthropic.py`), on the shared
call and error mapping in `http.py`; the environment is read in `settings.py`, which also builds
the router. Adapters receive one shared HTTP client (`create_http_client`, aiohttp: streamed
calls) and the worker's connection pool (`pool.py`: non-streamed calls, the per-request path),
and never build their own.

Failures are :class:`ProviderError` (see `llmstream.core.errors` for the tree); it carries what the
retry policy needs: ``retryable``, ``retry_after`` and the status code.
"""

from __future__ import annotations

import email.utils
import math
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from llmstream.core.clock import wall_clock_ms
from llmstream.core.errors import LLMStreamError
from llmstream.schemas.models import LLMRequest, ToolCall

__all__ = [
    "DEFAULT_FINISH_REASON",
    "Completion",
    "ErrorType",
    "OnDelta",
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
    # The request names a built-in provider this deployment has no configuration for.
    "provider_not_configured",
    # No answer within LLMSTREAM_MAX_QUEUE_S for a request without its own deadline.
    "provider_unavailable",
]

MAX_ERROR_BODY_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Completion:
    """One successful answer, streamed or not, in the provider-neutral shape the worker
    publishes; a streamed answer's ``content`` is its deltas joined. ``tool_calls`` are the
    calls the model asks for (finish reason ``"tool_calls"``), in OpenAI's shape whatever the
    wire format; a stream's chunks carry text only, its calls arrive here whole."""

    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    provider: str
    model: str
    tool_calls: tuple[ToolCall, ...] = ()


# What a streamed answer that completed without saying why it stopped is taken to have ended
# with: the last chunk of a stream must say that it is the last.
DEFAULT_FINISH_REASON = "stop"

# Called with each piece of a streamed answer's text as it arrives, and once more at the end of
# a stream that completed, with its finish reason (the text may then be ""). The worker produces
# each call as one chunk event; awaiting it is how a slow producer slows the read down.
OnDelta = Callable[[str, str | None], Awaitable[None]]


class Provider(Protocol):
    """Anything that answers an :class:`LLMRequest`; ``model`` comes without its provider prefix."""

    name: str

    async def complete(self, request: LLMRequest, model: str) -> Completion:
        """One call; the whole answer at once."""

    async def stream(self, request: LLMRequest, model: str, on_delta: OnDelta) -> Completion:
        """One call in streaming mode: ``on_delta`` gets the text as it comes, then the whole
        answer is returned. A stream that breaks off is a retryable ``connection_error``."""


class ProviderError(LLMStreamError):
    """A provider call failed.

    ``error_type`` is one of :data:`ErrorType`; ``retryable`` says whether the same call may
    succeed later; ``retry_after`` (seconds) is what the server asked for, if it said;
    ``attempts`` is set by the retry loop to the number of calls made. ``body`` is the start of
    the provider's error body and ``headers`` its response headers, names lowercased. Secrets
    the adapter knows are redacted before they get here.
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
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.error_type: ErrorType = error_type
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body[:MAX_ERROR_BODY_CHARS] if body is not None else None
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}
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
    ``unconfigured`` names the providers the router knows of but has no configuration for, each
    with the variable to set: a request for one fails at once (``provider_not_configured``),
    and nothing is ever sent to it.
    """

    def __init__(
        self, providers: Mapping[str, Provider], unconfigured: Mapping[str, str] | None = None
    ) -> None:
        self._providers = dict(providers)
        self._unconfigured = {
            name: hint for name, hint in (unconfigured or {}).items() if name not in providers
        }

    @property
    def names(self) -> list[str]:
        """The configured provider names, sorted."""
        return sorted(self._providers)

    @property
    def unconfigured(self) -> dict[str, str]:
        """Known but unconfigured providers, each with the variable that would configure it."""
        return dict(self._unconfigured)

    def get(self, name: str) -> Provider | None:
        """The provider called ``name``, if configured."""
        return self._providers.get(name)

    def resolve(self, request: LLMRequest) -> tuple[Provider, str]:
        """Pick the provider and the model name to send it; an unknown or unconfigured
        provider → ProviderError (not retryable)."""
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
        if provider is None and name not in self._unconfigured:
            raise self._unknown(name, f"unknown provider {name!r} for model {request.model!r}")
        if not model:
            raise self._unknown(name, f"model {request.model!r} has no model name after {name!r}")
        if provider is None:
            raise ProviderError(
                f"{name} is not configured: set {self._unconfigured[name]}",
                provider=name,
                error_type="provider_not_configured",
                retryable=False,
            )
        return provider, model

    def _unknown(self, name: str | None, message: str) -> ProviderError:
        known = ", ".join(self.names) or "none configured"
        return ProviderError(
            f"{message} (known providers: {known})",
            provider=name or "",
            error_type="invalid_request",
            retryable=False,
        )


def create_http_client(timeout_s: float, max_connections: int) -> aiohttp.ClientSession:
    """The one shared HTTP client for every adapter: an aiohttp session (call it in a coroutine).

    ``max_connections`` bounds concurrent sockets over all providers: calls beyond it wait for a
    free connection. ``timeout_s`` bounds each phase (a free connection and connecting, then each
    wait for bytes from the provider), not the whole call.
    """
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=0, keepalive_timeout=30.0
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
    # Proxy variables (HTTPS_PROXY, NO_PROXY) are honoured when set (and then every call goes
    # through aiohttp, as the pool has no proxy support); when none is, aiohttp is told so,
    # which spares it reading the environment on every call.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=bool(urllib.request.getproxies()),
        raise_for_status=False,
    )


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
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
    return max(0.0, when.timestamp() - (wall_clock_ms() / 1000 if now is None else now))
