"""What every JSON-over-HTTP adapter shares: the call, and turning each failure into ProviderError.

An adapter subclasses :class:`HTTPAdapter` and supplies its wire format only: the endpoint, the
headers it needs, the request body, and how to read a success body, an error body and the events
of a stream. Sending with the injected client, redacting secrets, classifying statuses, error
events and transport failures, reading ``retry-after``, spotting quota-exhausted 429s and reading
a stream's Server-Sent Events (:mod:`.sse`) happen here, once.

A streamed call (:meth:`HTTPAdapter.stream`) fails as a non-streamed one does until its status
arrives; after that, an error event in the stream is classified by its type as the status it
stands for would be, and a stream that breaks off, or ends without its terminating event, is a
retryable ``connection_error``.

A tool call that does not fit the contract (:mod:`.toolcalls`) makes the whole answer a
non-retryable ``provider_error`` ("malformed response"): nothing invalid travels further.

A 429 whose code says the service tier asked for has no capacity now (OpenAI's
``resource_unavailable`` on flex) is a :class:`CapacityUnavailable`: the tier is busy, not the
account over its limits, so traffic control neither pauses the provider nor slows its rate for it.

Non-streamed calls go over the worker's :class:`~.pool.ConnectionPool` when the adapter is
given one (the per-request path: a third of aiohttp's CPU per call); streamed calls, and every
call of an adapter without a pool, go through aiohttp directly (httpx's layer on top of aiohttp
cost about 250 µs of CPU per call here). Both raise aiohttp's exception types, classified here
alike.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import SecretStr
from yarl import URL

from llmstream.core.once import warn_once
from llmstream.processors.providers import (
    DEFAULT_FINISH_REASON,
    MAX_ERROR_BODY_CHARS,
    Completion,
    ErrorType,
    OnDelta,
    ProviderError,
    parse_retry_after,
)
from llmstream.processors.providers.pool import ConnectionPool, header_map
from llmstream.processors.providers.sse import ServerSentEvent, SSEDecoder
from llmstream.processors.providers.toolcalls import MalformedAnswer, PartialCall, tool_calls
from llmstream.schemas.models import LLMRequest

__all__ = [
    "Answer",
    "CapacityUnavailable",
    "ErrorFields",
    "HTTPAdapter",
    "StreamedAnswer",
    "endpoint_label",
    "endpoint_url",
    "present",
    "redact",
    "request_id_header",
    "status_classification",
    "text_field",
    "token_count",
]

log = logging.getLogger(__name__)

_MAX_MESSAGE_DETAIL_CHARS = 300
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_REDACTED = "[REDACTED]"
# Whatever a success body lacks or holds in the wrong type surfaces as one of these.
_SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)
# The most tokens one count may say: the events' token fields are 32-bit.
MAX_TOKEN_COUNT = 2**31 - 1


class CapacityUnavailable(ProviderError):
    """A 429 saying the service tier the call asked for (flex) has no capacity for it now; the
    same call at the standard tier would be served (:mod:`processors.flex`)."""


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """The machine-readable parts of a provider's error body; empty strings when absent."""

    kind: str = ""
    code: str = ""
    message: str = ""


class HTTPAdapter(ABC):
    """One provider endpoint reached with a POST of JSON; subclasses own the wire format."""

    # The error body's ``kind`` → ErrorType, where it says more than the status does.
    error_types: ClassVar[Mapping[str, ErrorType]] = {}
    # 429 kinds or codes meaning money or quota ran out, not "slow down": a retry cannot
    # succeed until a person acts.
    quota_codes: ClassVar[frozenset[str]] = frozenset()
    # 429 codes meaning the service tier asked for is short of capacity (CapacityUnavailable).
    capacity_codes: ClassVar[frozenset[str]] = frozenset()
    # Whether the API has OpenAI's flex tier (a request's service_tier "flex" is sent as such).
    offers_flex: ClassVar[bool] = False
    # What a success body must hold, for the message when it does not.
    success_shape: ClassVar[str]
    # An error event in a stream has no status of its own: the status its kind stands for.
    # A numeric ``code`` (OpenRouter's) is the status itself; an unknown kind counts as 500.
    error_statuses: ClassVar[Mapping[str, int]] = {}

    def __init__(
        self,
        name: str,
        client: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr | None = None,
        extra_headers: Mapping[str, str] | None = None,
        *,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.name = name
        self._client = client
        self._url = self.endpoint(base_url)
        # Non-streamed calls take the pool's connections, except where aiohttp does what the
        # pool does not: a proxy from the environment, credentials in the URL (Basic auth).
        direct = not client.trust_env and self._url.user is None
        self._pool = pool if direct else None
        key = api_key.get_secret_value() if api_key is not None else ""
        extra = dict(extra_headers or {})
        self._headers = {**extra, "content-type": "application/json", **self.wire_headers(key)}
        # Extra headers often carry credentials too (Azure's api-key), and so may the URL (a
        # password, a key in the query string), which aiohttp names whole in some errors.
        url = self._url
        in_url = (url.password, url.raw_password, url.query_string, url.raw_query_string)
        self._secrets = tuple(value for value in (*extra.values(), key, *in_url) if value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={endpoint_label(self._url)!r})"

    @abstractmethod
    def endpoint(self, base_url: str) -> URL:
        """The URL every call is sent to."""

    @abstractmethod
    def wire_headers(self, api_key: str) -> dict[str, str]:
        """Headers the API requires, credentials included when ``api_key`` is not empty."""

    @abstractmethod
    def request_body(self, request: LLMRequest, model: str) -> dict[str, Any]:
        """The JSON body; raise ProviderError for a request this API cannot express."""

    @abstractmethod
    def parse_completion(self, data: Any, requested_model: str) -> Completion:
        """The Completion in a decoded success body; any lookup error means a malformed body."""

    @abstractmethod
    def error_fields(self, error: Mapping[str, Any]) -> ErrorFields:
        """What the ``error`` object of an error body says."""

    @abstractmethod
    def stream_fields(self) -> dict[str, Any]:
        """What the body adds to ask for a stream."""

    @abstractmethod
    def read_event(self, event: ServerSentEvent, answer: StreamedAnswer) -> str:
        """The text one event of a stream adds (``""`` for none); records the rest (usage, finish
        reason, the end) on ``answer``. An error event raises :meth:`stream_error`'s error; any
        lookup error means a malformed event."""

    async def complete(self, request: LLMRequest, model: str) -> Completion:
        """Make one call; raise ProviderError on any failure."""
        content = orjson.dumps(self.request_body(request, model))
        headers = {**self._headers, "x-client-request-id": request_id_header(request.request_id)}
        try:
            answer = await self._post(headers, content)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        if not 200 <= answer.status < 300:
            raise self._status_error(answer)
        return self._parsed(answer, model)

    async def _post(self, headers: dict[str, str], content: bytes) -> Answer:
        """The answer to one POST, over the pool when there is one. Redirects are not followed:
        a provider API answers, it does not redirect, and following one would send the
        credentials to wherever it points."""
        if self._pool is not None:
            status, raw_headers, body = await self._pool.post(self._url, headers, content)
            # A success's headers are never read: made only for an error.
            ok = 200 <= status < 300
            return Answer(status, _NO_HEADERS if ok else header_map(raw_headers), body)
        async with self._client.post(
            self._url, data=content, headers=headers, allow_redirects=False
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    async def stream(self, request: LLMRequest, model: str, on_delta: OnDelta) -> Completion:
        """Make one call in streaming mode, passing the text to ``on_delta`` as it arrives;
        raise ProviderError on any failure.

        The deltas one read from the socket brings are passed together: a stream read as fast
        as it comes gives a chunk per delta, one that arrives faster than the worker reads
        (a loaded worker) gives fewer, larger chunks. The finish reason is passed only once the
        stream's terminating event arrived. Each read waits at most the client's ``sock_read``
        timeout, and there is no total timeout, so a long answer is never cut.
        """
        body = {**self.request_body(request, model), **self.stream_fields()}
        headers = {
            **self._headers,
            "accept": "text/event-stream",
            "x-client-request-id": request_id_header(request.request_id),
        }
        try:
            async with self._client.post(
                self._url, data=orjson.dumps(body), headers=headers, allow_redirects=False
            ) as response:
                if not 200 <= response.status < 300:
                    raise self._status_error(
                        Answer(response.status, response.headers, await response.read())
                    )
                if response.content_type == "application/json":
                    # A server that does not stream answered whole: one delta.
                    answer = Answer(response.status, response.headers, await response.read())
                    completion = self._parsed(answer, model)
                    finish = completion.finish_reason or DEFAULT_FINISH_REASON
                    await on_delta(completion.content, finish)
                    return completion
                return await self._read_stream(response, StreamedAnswer(model), on_delta)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc

    async def _read_stream(
        self, response: aiohttp.ClientResponse, answer: StreamedAnswer, on_delta: OnDelta
    ) -> Completion:
        decoder = SSEDecoder()
        async for piece in response.content.iter_any():
            texts = []
            try:
                for event in decoder.feed(piece):
                    texts.append(self.read_event(event, answer))
                    if answer.done:
                        break  # nothing after the end belongs to this answer
            except _SHAPE_ERRORS as exc:
                raise self._malformed_stream(response.status, exc) from None
            delta = "".join(texts)
            if delta:
                answer.parts.append(delta)
            if answer.done:
                answer.finish_reason = answer.finish_reason or DEFAULT_FINISH_REASON
                try:
                    completion = answer.completion(self.name)
                except MalformedAnswer as exc:  # checked before the last chunk goes out
                    raise self._malformed_stream(response.status, exc) from None
                await on_delta(delta, answer.finish_reason)
                return completion
            if delta:
                await on_delta(delta, None)
        raise ProviderError(
            f"{self.name}: the stream from {endpoint_label(self._url)} ended before its "
            "terminating event",
            provider=self.name,
            error_type="connection_error",
            retryable=True,
            status_code=response.status,
        )

    def _parsed(self, answer: Answer, model: str) -> Completion:
        try:
            return self.parse_completion(orjson.loads(answer.body), model)
        except MalformedAnswer as exc:
            raise self._malformed_response(answer, redact(str(exc), self._secrets)) from None
        except _SHAPE_ERRORS as exc:
            reason = f"no {self.success_shape} ({type(exc).__name__})"
            raise self._malformed_response(answer, reason) from None

    def stream_error(self, error: object, data: str) -> ProviderError:
        """An error event in a stream that began with a 2xx: ``error`` is its error object,
        ``data`` the event's data. Classified as its kind's status (:attr:`error_statuses`)
        would be, with no status code of its own."""
        fields = self.error_fields(error) if isinstance(error, dict) else ErrorFields()
        error_type, retryable = self._classified(self._status_of(fields), fields)
        detail = self._detail(fields) or "no details"
        return ProviderError(
            f"{self.name}: error event in the stream from {endpoint_label(self._url)}: {detail}",
            provider=self.name,
            error_type=error_type,
            retryable=retryable,
            body=redact(data[: MAX_ERROR_BODY_CHARS * 4], self._secrets),
        )

    def _status_of(self, fields: ErrorFields) -> int:
        if fields.code.isdigit() and 100 <= int(fields.code) <= 599:
            return int(fields.code)
        return self.error_statuses.get(fields.kind, 500)

    def _classified(self, status: int, fields: ErrorFields) -> tuple[ErrorType, bool]:
        """``(error_type, retryable)`` of a failure with ``status`` whose body said ``fields``."""
        error_type, retryable = status_classification(status)
        error_type = self.error_types.get(fields.kind, error_type)
        if status == 429 and not self.quota_codes.isdisjoint((fields.kind, fields.code)):
            retryable = False
        return error_type, retryable

    def _detail(self, fields: ErrorFields) -> str:
        label = "/".join(part for part in (fields.kind, fields.code) if part)
        detail = redact(f"{label}: {fields.message}" if label else fields.message, self._secrets)
        return detail[:_MAX_MESSAGE_DETAIL_CHARS]

    def _malformed_stream(self, status: int, exc: Exception) -> ProviderError:
        where = endpoint_label(self._url)
        if isinstance(exc, MalformedAnswer):
            reason = redact(str(exc), self._secrets)
            message = f"{self.name}: malformed response in the stream from {where}: {reason}"
        else:
            kind = type(exc).__name__
            message = f"{self.name}: malformed event in the stream from {where} ({kind})"
        return ProviderError(
            message,
            provider=self.name,
            error_type="provider_error",
            retryable=False,
            status_code=status,
        )

    def _status_error(self, response: Answer) -> ProviderError:
        """A non-2xx answer: classified by its status, refined by the error body."""
        fields = self._read_error_body(response.body)
        error_type, retryable = self._classified(response.status, fields)
        detail = self._detail(fields)
        message = f"{self.name}: HTTP {response.status} from {endpoint_label(self._url)}"
        if detail:
            message = f"{message}: {detail}"
        busy = response.status == 429 and fields.code in self.capacity_codes
        return (CapacityUnavailable if busy else ProviderError)(
            message,
            provider=self.name,
            error_type=error_type,
            retryable=retryable,
            status_code=response.status,
            retry_after=parse_retry_after(response.headers),
            body=self._body_text(response),
            headers={key: redact(value, self._secrets) for key, value in response.headers.items()},
        )

    def _read_error_body(self, content: bytes) -> ErrorFields:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            return ErrorFields()
        error = data.get("error") if isinstance(data, dict) else None
        return self.error_fields(error) if isinstance(error, dict) else ErrorFields()

    def _malformed_response(self, response: Answer, reason: str) -> ProviderError:
        """A 2xx answer that is not the documented shape (a proxy's HTML page, a truncated body)."""
        return ProviderError(
            f"{self.name}: malformed response from {endpoint_label(self._url)}: {reason}",
            provider=self.name,
            error_type="provider_error",
            retryable=False,
            status_code=response.status,
            body=self._body_text(response),
        )

    def _body_text(self, response: Answer) -> str:
        # Decoded from a bounded prefix: a multi-megabyte error page is not worth decoding.
        prefix = response.body[: MAX_ERROR_BODY_CHARS * 4].decode("utf-8", "replace")
        return redact(prefix, self._secrets)

    def _transport_error(self, exc: aiohttp.ClientError | TimeoutError) -> ProviderError:
        """A failure below HTTP: timeouts and broken connections are retryable."""
        where = endpoint_label(self._url)
        kind = type(exc).__name__
        detail = redact(str(exc) or kind, self._secrets)[:_MAX_MESSAGE_DETAIL_CHARS]
        error_type: ErrorType
        if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
            error_type, retryable, what = "timeout", True, f"timed out calling {where}"
        elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
            # A misconfigured base URL: retrying cannot help.
            error_type, retryable, what = "connection_error", False, f"cannot call {where}"
        elif isinstance(exc, aiohttp.ClientPayloadError) and isinstance(
            exc.__cause__, ContentEncodingError
        ):
            # A body that does not decode as its Content-Encoding says: no transport fault.
            error_type, retryable, what = "provider_error", False, f"unusable response from {where}"
        elif isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            # Refused, reset, closed mid-answer: the next connection may well work.
            error_type, retryable, what = "connection_error", True, f"connection to {where} failed"
        else:
            # Malformed HTTP, bad encodings: the server answered something we cannot use.
            error_type, retryable, what = "provider_error", False, f"unusable response from {where}"
        return ProviderError(
            f"{self.name}: {what} ({kind}: {detail})",
            provider=self.name,
            error_type=error_type,
            retryable=retryable,
        )


@dataclass(slots=True)
class StreamedAnswer:
    """What a stream said so far; the wire format's :meth:`HTTPAdapter.read_event` fills it."""

    model: str  # the model asked for, until the stream names the one that answers
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    done: bool = False  # the terminating event arrived
    # Tool calls by their position in the answer (OpenAI's index, Anthropic's block index).
    calls: dict[int, PartialCall] = field(default_factory=dict)

    def completion(self, provider: str) -> Completion:
        """The whole answer; :class:`MalformedAnswer` when a tool call does not fit the contract."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        calls = [self.calls[index] for index in sorted(self.calls)]
        return Completion(
            content="".join(self.parts),
            finish_reason=self.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=self.total_tokens or min(prompt + completion, MAX_TOKEN_COUNT),
            provider=provider,
            model=self.model,
            tool_calls=tool_calls((call.id, call.name, call.arguments()) for call in calls),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A provider's answer, read whole: its status, headers and body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def status_classification(status_code: int) -> tuple[ErrorType, bool]:
    """``(error_type, retryable)`` from the HTTP status alone; the error body may refine it."""
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


def present(**fields: Any) -> dict[str, Any]:
    """The ``fields`` that are set: an optional request field is sent only when given."""
    return {name: value for name, value in fields.items() if value is not None}


def text_field(value: object) -> str:
    """A string or number from an error body as text; anything else (or nothing) as ``""``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def token_count(provider: str, name: str, value: object) -> int:
    """A usage count from a success body; 0 when absent, and 0 (logged once per provider and
    field) when negative, absurd (over 32 bits) or not a number. The answer itself is good and
    paid for: a bad count must not turn it into a failure further on (counters, cost, events)."""
    if value is None:
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        count = int(value)
        if 0 <= count <= MAX_TOKEN_COUNT:
            return count
    warn_once(
        log,
        (provider, name),
        "%s answered usage.%s = %.40r, which is not a token count; counted as 0 "
        "(said once per process)",
        provider,
        name,
        value,
    )
    return 0


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


def endpoint_url(base_url: str, path: str) -> URL:
    """``path`` appended to the base URL's path; a query string (Azure's api-version) is kept.

    Parsed once here: handing aiohttp a ready URL saves re-parsing a string on every call.
    """
    base = URL(base_url)
    return base.with_path(base.path.rstrip("/") + path, keep_query=True)


def endpoint_label(url: str | URL) -> str:
    """Scheme, host, port and path of ``url``: no credentials, no query string."""
    parsed = URL(url)
    port = f":{parsed.explicit_port}" if parsed.explicit_port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"
