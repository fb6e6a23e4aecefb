"""Every error answer of the ingress, in one shape: OpenAI's.

::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.0.content",
               "code": "string_too_short"}}

The OpenAI SDK maps answers to exceptions by status code and reads ``error``; other clients get
the same body from every endpoint. Validation failures add ``fields`` (each offending field and
why), and answers about a known request add ``request_id``. Nothing else is ever echoed: no input
values (they may be megabytes, or secrets) and no stack traces.

A request's failure is told to its client by :func:`failure_message`, never with the worker's
message: that one is for operators (``llm-errors``) and names provider endpoint URLs and the
configured providers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llmstream.core.errors import LLMStreamError
from llmstream.schemas.models import MAX_CONTENT_CHARS, LLMError

_MAX_MESSAGE = 300
_MAX_FIELD = 200

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(LLMStreamError):
    """An answer other than success, raised from anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = error_type or _TYPES.get(status, "server_error" if status >= 500 else "error")
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``: the answer's body, also sent inside a stream that cannot go on."""
        error: dict[str, Any] = {
            "message": self.message[:_MAX_MESSAGE],
            "type": self.type,
            "param": self.param,
            "code": self.code,
            **self.extra,
        }
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# What a client is told of a failed request, by error type. The worker's message is built for
# operators from the provider's answer: it names the provider's endpoint URL, the configured
# providers, the variables to set. None of that is the client's business, so it is not parsed
# and trimmed (a new message shape would leak again) but replaced.
_FAILURES = {
    "invalid_request": "the request is invalid for its model or provider",
    "provider_not_configured": "the model's provider is not available on this gateway",
    "not_found": "the provider does not know the model",
    "rate_limited": "the provider's rate limit or quota refused the request",
    "timeout": "the provider did not answer in time",
    "connection_error": "the provider could not be reached",
    "provider_unavailable": "the provider could not be reached in time; retry later",
    "auth_error": "the provider refused the gateway's credentials",
    "provider_error": "the provider failed",
    "expired": "the request's deadline passed before it was answered",
    "output_too_large": "the answer is larger than the responses topic accepts; "
    "read it with GET /v1/requests/{id}",
    "internal_error": "the gateway failed processing the request; it has been logged",
}


def failure_message(error: LLMError) -> str:
    """What the client is told of its failed request (see ``_FAILURES``); the provider's HTTP
    status, when there was one, is in the answer's ``status_code``."""
    return _FAILURES.get(error.error_type, f"the request failed ({error.error_type})")


def unavailable(what: str) -> ApiError:
    """The 503 for a dependency that did not answer (Kafka, Redis): retry shortly."""
    return ApiError(
        503,
        f"{what} is unavailable; retry shortly",
        code="unavailable",
        headers={"Retry-After": "1"},
    )


def field_path(loc: Sequence[str | int], body_tags: Collection[str] = ()) -> str:
    """``("body", "messages", 0, "content")`` → ``"messages.0.content"``.

    FastAPI puts where the value came from first; a body that is a tagged union has the tag
    next, which is no field of the client's (``body_tags``).
    """
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        if parts[0] == "body" and len(parts) > 1 and parts[1] in body_tags:
            del parts[1]
        parts = parts[1:]
    text = ".".join(p if p.isprintable() else ascii(p)[1:-1] for p in parts)
    return text[:_MAX_FIELD]


def validation_error(
    errors: Sequence[Mapping[str, Any]], *, status: int, body_tags: Collection[str] = ()
) -> ApiError:
    """One ApiError naming every invalid field of a pydantic/FastAPI validation failure.

    A message content over the contract's limit makes it a 413 saying the length and the limit,
    whatever else is wrong: the body is too large to be accepted in any form.
    """
    fields = []
    for error in errors:
        # A JSON syntax error's loc ends in a character position, not a field.
        loc = () if error.get("type") == "json_invalid" else error.get("loc", ())
        name = field_path(loc, body_tags) or "body"
        fields.append({"field": name, "message": _message(error), "type": error.get("type")})
        if _content_too_long(error, loc):
            chars = len(error["input"])
            fields[-1]["message"] = f"{chars:,} characters; the limit is {MAX_CONTENT_CHARS:,}"
            fields[-1]["type"] = "content_too_long"
    if not fields:
        fields.append({"field": "body", "message": "invalid request", "type": "invalid"})
    too_long = [f for f in fields if f["type"] == "content_too_long"]
    if too_long:
        status = 413
        fields = too_long + [f for f in fields if f["type"] != "content_too_long"]
    first = fields[0]
    sep = " is " if first["type"] == "content_too_long" else ": "
    message = f"{first['field']}{sep}{first['message']}"
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more invalid fields)"
    return ApiError(
        status,
        message,
        param=first["field"],
        code=str(first["type"]),
        extra={"fields": fields[:50]},
    )


def _content_too_long(error: Mapping[str, Any], loc: Sequence[str | int]) -> bool:
    """A message's content over MAX_CONTENT_CHARS (``...messages.<i>.content``)."""
    return (
        error.get("type") in ("string_too_long", "too_long")
        and len(loc) >= 3
        and loc[-1] == "content"
        and loc[-3] == "messages"
        and isinstance(error.get("input"), str)
        and len(error["input"]) > MAX_CONTENT_CHARS
    )


def unsupported_media_type(content_type: str | None) -> ApiError | None:
    """The 415 for a body sent without ``Content-Type: application/json``; None when it was."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return None
    problem = "the header is missing" if not media else "must be application/json"
    return ApiError(
        415,
        f"Content-Type: {problem}; send the body as JSON with 'Content-Type: application/json'",
        param="Content-Type",
        code="unsupported_media_type",
    )


def _whole_body_invalid(error: Mapping[str, Any], body_tags: Collection[str]) -> bool:
    loc = error.get("loc", ())
    return (
        bool(loc)
        and loc[0] == "body"
        and error.get("type") not in ("missing", "json_invalid")
        and not field_path(loc, body_tags)
    )


def _message(error: Mapping[str, Any]) -> str:
    kind = error.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "json_invalid":
        return "the body is not valid JSON"
    if kind == "missing" and not error.get("loc", ())[1:]:
        return "a JSON body is required"
    return str(error.get("msg", "invalid"))[:_MAX_MESSAGE]


def install_error_handlers(
    app: FastAPI, *, validation_status: Mapping[str, int], body_tags: Collection[str] = ()
) -> None:
    """Answer every error in the one shape; ``validation_status`` maps a path to the status of
    its validation failures (default 422)."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        # FastAPI reads the body as JSON only when the Content-Type says so; otherwise the body
        # arrives as bytes and fails as a whole ("a valid dictionary"), which names no header.
        if any(_whole_body_invalid(e, body_tags) for e in errors):
            refusal = unsupported_media_type(request.headers.get("content-type"))
            if refusal is not None:
                return refusal.response()
        status = validation_status.get(request.url.path, 422)
        return validation_error(errors, status=status, body_tags=body_tags).response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The server logs it with its traceback (Starlette re-raises after this answer).
        return ApiError(500, "internal error; it has been logged").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
