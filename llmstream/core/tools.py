"""Server-side tools: registered by the operator, called by the worker when a model asks.

``LLMSTREAM_TOOLS_FILE`` registers them, in JSON (a list, or ``{"tools": [...]}``) or TOML
(``[[tools]]``, when the name ends in ``.toml``)::

    [[tools]]
    name = "get_weather"
    description = "The weather now in a city."
    url = "https://tools.internal/weather"      # http or https; may carry credentials
    timeout_s = 5                               # default 10
    parameters = { type = "object", properties = { city = { type = "string" } },
                   required = ["city"] }

A request names the tools it may use (``server_tools``); :meth:`ToolRegistry.openai_tools` gives
them in OpenAI's ``tools`` shape for the provider. When the model calls one,
:meth:`ToolExecutor.execute` checks the call's arguments against the tool's ``parameters`` (JSON
Schema, with ``jsonschema-rs``; ``$ref`` to anything outside the schema is refused, never
fetched), POSTs the arguments object as the JSON body to the tool's URL, and gives back a
:class:`ToolResult` whose ``content`` is the JSON text the model reads next.

Every failure is a result, never an exception: an unknown tool, arguments that are not a JSON
object or do not match the schema, a refused connection, no answer within ``timeout_s``, an HTTP
status other than 2xx (redirects are not followed: the arguments go only where configuration
says), an answer that is not JSON or is larger than a message may be. The error result's
``content`` tells the model what went wrong, so it can decide what to do.

URLs come from configuration only, never from an event. A URL may hold credentials (user and
password, a token in the query): it is kept as a secret and never logged, returned or put in an
error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import jsonschema_rs
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from llmstream.core.errors import LLMStreamError
from llmstream.schemas.models import (
    MAX_CONTENT_CHARS,
    Description,
    JsonObject,
    Tool,
    ToolFunction,
    ToolName,
)

__all__ = [
    "ToolErrorType",
    "ToolExecutor",
    "ToolParams",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "ToolsFileError",
    "UnknownTool",
]

log = logging.getLogger(__name__)

_VARIABLE = "LLMSTREAM_TOOLS_FILE"
# What of a tool's failed answer (a JSON error body) is passed on to the model.
_MAX_DETAIL_BYTES = 4096
_MAX_ERRORS_SHOWN = 5
_MAX_ERROR_CHARS = 300

ToolErrorType = Literal[
    "unknown_tool",  # no registered tool has the name
    "invalid_arguments",  # not a JSON object, or not what the tool's parameters say
    "timeout",  # no whole answer within the tool's timeout_s
    "connection_error",  # the tool could not be reached, or the connection broke
    "http_error",  # an HTTP status other than 2xx
    "invalid_answer",  # a 2xx answer that is not JSON
    "answer_too_large",  # an answer larger than a message may be
]


class ToolParams(BaseModel):
    """Server-side tool settings; a deployable's settings derive from this class (read as
    ``LLMSTREAM_TOOLS_FILE`` and ``LLMSTREAM_MAX_TOOL_STEPS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools_file: Path | None = None
    # Model calls that end in server-side tool calls, per request; the next one is an error.
    max_tool_steps: int = Field(8, ge=1, le=100)


class ToolsFileError(LLMStreamError, ValueError):
    """``LLMSTREAM_TOOLS_FILE`` cannot be read, parsed or accepted (said without its values)."""


class UnknownTool(LLMStreamError):
    """A tool name no registered tool has."""


class ToolSpec(BaseModel):
    """One registered tool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ToolName
    description: Description
    parameters: JsonObject = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: SecretStr
    timeout_s: float = Field(10.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: SecretStr) -> SecretStr:
        # The message never holds the URL: it may carry credentials.
        try:
            parts = urlsplit(value.get_secret_value())
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("not a URL") from None
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value


class ToolResult(BaseModel):
    """What one tool call gave: ``content`` is the JSON text the model reads as the result."""

    model_config = ConfigDict(frozen=True)

    status: Literal["ok", "error"]
    content: str = Field(description="JSON text: the tool's answer, or {'error': why}")
    latency_ms: int = Field(ge=0, description="The HTTP call's duration (0 when none was made)")
    error: str | None = None
    error_type: ToolErrorType | None = None

    @classmethod
    def failed(cls, error_type: ToolErrorType, message: str, *, latency_ms: int = 0) -> ToolResult:
        return cls(
            status="error",
            content=orjson.dumps({"error": message}).decode(),
            latency_ms=latency_ms,
            error=message,
            error_type=error_type,
        )


class ToolRegistry:
    """The registered tools by name, each with its parameters' validator."""

    def __init__(self, tools: Iterable[ToolSpec]) -> None:
        self._specs: dict[str, ToolSpec] = {}
        self._validators: dict[str, jsonschema_rs.Validator] = {}
        self._openai: dict[str, Tool] = {}
        for spec in tools:
            if spec.name in self._specs:
                raise ToolsFileError(f"{_VARIABLE}: tool {spec.name} is registered twice")
            try:
                # offline: a $ref to a URL is an error, not a request to whatever it names.
                validator = jsonschema_rs.validator_for(spec.parameters, offline=True)
            except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError) as exc:
                problem = str(exc).splitlines()[0][:_MAX_ERROR_CHARS]
                raise ToolsFileError(
                    f"{_VARIABLE}: tool {spec.name}: parameters is not a usable JSON Schema "
                    f"({problem})"
                ) from None
            self._specs[spec.name] = spec
            self._validators[spec.name] = validator
            self._openai[spec.name] = Tool(
                function=ToolFunction(
                    name=spec.name, description=spec.description, parameters=spec.parameters
                )
            )

    @classmethod
    def from_params(cls, params: ToolParams) -> ToolRegistry:
        """The tools ``LLMSTREAM_TOOLS_FILE`` registers; none without it. Raises
        ToolsFileError."""
        if params.tools_file is None:
            return cls(())
        return cls.from_file(params.tools_file)

    @classmethod
    def from_file(cls, path: Path) -> ToolRegistry:
        """The tools registered in ``path`` (see the module's doc). Raises ToolsFileError."""
        where = f"{_VARIABLE} {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolsFileError(f"cannot read {where}: {type(exc).__name__}") from None
        try:
            raw: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ToolsFileError(f"cannot parse {where}: {exc}") from None
        if isinstance(raw, Mapping) and set(raw) <= {"tools"}:
            raw = raw.get("tools", [])
        if not isinstance(raw, list):
            raise ToolsFileError(f"{where} must hold a list of tools (TOML: [[tools]] tables)")
        specs = []
        for index, entry in enumerate(raw):
            try:
                specs.append(ToolSpec.model_validate(entry))
            except ValidationError as exc:
                raise ToolsFileError(_describe(where, index, exc)) from None
        return cls(specs)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> ToolSpec:
        """The tool ``name``; raises UnknownTool."""
        try:
            return self._specs[name]
        except KeyError:
            raise self._unknown([name]) from None

    def openai_tools(self, names: Sequence[str]) -> list[Tool]:
        """The tools ``names`` in OpenAI's ``tools`` shape, in that order. Raises UnknownTool
        naming every name not registered."""
        unknown = [name for name in names if name not in self._specs]
        if unknown:
            raise self._unknown(unknown)
        return [self._openai[name] for name in names]

    def check_arguments(self, name: str, arguments: str) -> dict[str, Any] | ToolResult:
        """The arguments object of a call of ``name``, or the error result that tells the model
        why it cannot be used."""
        if name not in self._specs:
            return ToolResult.failed("unknown_tool", f"there is no tool named {name[:64]!r}")
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            return ToolResult.failed("invalid_arguments", f"the arguments are not JSON: {exc}")
        if not isinstance(value, dict):
            return ToolResult.failed(
                "invalid_arguments",
                "the arguments must be a JSON object, not a JSON " + _kind(value),
            )
        problems = [
            f"{_path(error.instance_path)}: {error.message[:_MAX_ERROR_CHARS]}"
            for _, error in zip(
                range(_MAX_ERRORS_SHOWN), self._validators[name].iter_errors(value), strict=False
            )
        ]
        if problems:
            return ToolResult.failed(
                "invalid_arguments",
                f"the arguments do not match the parameters of {name}: " + "; ".join(problems),
            )
        return value

    def _unknown(self, names: Sequence[str]) -> UnknownTool:
        known = ", ".join(self.names) or "none"
        return UnknownTool(
            f"no tool registered as {', '.join(names)} ({_VARIABLE} registers: {known})"
        )


class ToolExecutor:
    """Runs registered tools over HTTP with the caller's ``aiohttp.ClientSession``."""

    def __init__(
        self,
        registry: ToolRegistry,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._http = http
        self._clock = clock

    async def execute(
        self, name: str, arguments: str, *, idempotency_key: str | None = None
    ) -> ToolResult:
        """Call the tool ``name`` with ``arguments`` (the JSON text of the arguments object, as
        the model wrote it). Never raises; never takes longer than the tool's ``timeout_s``.

        ``idempotency_key``, when given, is sent as the ``Idempotency-Key`` header, so a tool can
        tell a call repeated after a worker's crash from a new one.
        """
        checked = self.registry.check_arguments(name, arguments)
        if isinstance(checked, ToolResult):
            return checked
        spec = self.registry.spec(name)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        started = self._clock()
        try:
            async with asyncio.timeout(spec.timeout_s):
                status, body = await self._post(spec, orjson.dumps(checked), headers)
        except TimeoutError:
            result = ToolResult.failed(
                "timeout", f"the tool {name} did not answer within {spec.timeout_s:g} s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            # Said by the exception's kind only: its text may hold the URL.
            result = ToolResult.failed(
                "connection_error", f"the tool {name} could not be reached ({_what(exc)})"
            )
        else:
            result = _answer(name, status, body)
        latency_ms = max(0, round((self._clock() - started) * 1000))
        result = result.model_copy(update={"latency_ms": latency_ms})
        log.debug("tool %s: %s in %d ms", name, result.error_type or "ok", latency_ms)
        return result

    async def _post(
        self, spec: ToolSpec, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, bytes | None]:
        """The answer's status and body; body None when it is over the size limit."""
        async with self._http.post(
            spec.url.get_secret_value(),
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
        ) as response:
            if (response.content_length or 0) > MAX_CONTENT_CHARS:
                return response.status, None
            received = bytearray()
            async for piece in response.content.iter_chunked(64 * 1024):
                received += piece
                if len(received) > MAX_CONTENT_CHARS:
                    return response.status, None
            return response.status, bytes(received)


def _answer(name: str, status: int, body: bytes | None) -> ToolResult:
    if not 200 <= status < 300:
        message = f"the tool {name} answered HTTP {status}"
        if 300 <= status < 400:
            message += " (a redirect: not followed)"
        detail = _json_detail(body)
        result = ToolResult.failed("http_error", message)
        if detail is not None:
            content = orjson.dumps({"error": message, "detail": detail}).decode()
            result = result.model_copy(update={"content": content})
        return result
    if body is None:
        return ToolResult.failed(
            "answer_too_large",
            f"the tool {name} answered more than {MAX_CONTENT_CHARS:,} bytes, the most a "
            "message may hold",
        )
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return ToolResult.failed("invalid_answer", f"the tool {name} did not answer with JSON")
    return ToolResult(status="ok", content=body.decode().strip(), latency_ms=0)


def _json_detail(body: bytes | None) -> Any:
    """A failed answer's JSON body, when it is small enough to pass on; else None."""
    if not body or len(body) > _MAX_DETAIL_BYTES:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _what(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return "connection refused or host unreachable"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "the connection closed before the whole answer"
    return type(exc).__name__


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    return "null" if value is None else "number"


def _path(instance_path: Sequence[str | int]) -> str:
    return ".".join(["arguments", *(str(step) for step in instance_path)])


def _describe(where: str, index: int, exc: ValidationError) -> str:
    """The tool entry's errors by field, without their values (a URL may hold credentials)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return f"{where}: tools[{index}]: " + "; ".join(problems)
