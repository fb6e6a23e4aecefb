"""A provider simulator: a real HTTP server speaking OpenAI's and Anthropic's wire formats.

For tests, demos and benchmarks without a provider. ``POST /v1/chat/completions`` answers like
OpenAI's Chat Completions and ``POST /v1/messages`` like Anthropic's Messages API, with their
response shapes, usage fields, error bodies and rate-limit headers. Point an adapter at it with
``base_url=f"{url}/v1"`` (OpenAI style) or ``base_url=url`` (Anthropic style).

The answer is deterministic: ``"echo: <last user message>"`` (truncated to 200 characters), cut
at the first stop sequence (``finish_reason`` ``stop`` / ``stop_sequence``) and at ``max_tokens``
words (``length`` / ``max_tokens``). A token is a whitespace-separated word.

Each call, in order: counted under its ``X-Client-Request-Id`` (``""`` without one); a scripted
response for that ID, if any, is used instead of everything below (``status`` 200 is a normal
answer; only ``delay_ms`` delays a scripted call); wrong API key → 401; over ``rpm_limit`` in
a sliding window of the last ``rate_window_s`` (60 s: ``rpm_limit`` calls; a shorter window
allows ``rpm_limit * rate_window_s / 60``, for time-scaled tests) → 429 with ``Retry-After``
(whole seconds) and ``retry-after-ms`` (when the oldest call leaves the window); malformed body
→ 400; then the latency, then ``error_rate`` of calls get ``error_status`` (500).

A call keeps running when its client goes away, as it would at a provider (which still bills
it): ``in_flight`` counts calls not yet answered, whoever is still listening.

Control, for tests::

    GET  /_sim/stats   {"calls_total", "completed_total", "in_flight", "calls_by_request_id",
                        "status_counts", "config"}
    GET  /_sim/calls   {"calls": [{"request_id", "api", "status", "finished"}, ...]} in arrival
                       order (the last 100,000)
    POST /_sim/reset   back to the start: counters, call log, scripts, rate window and config
    POST /_sim/config  {"latency_ms", "latency_jitter", "error_rate", "error_status",
                        "rpm_limit", "rate_window_s"} (any subset)
    POST /_sim/script  {"request_id": "r1", "responses": [{"status": 500},
                        {"status": 429, "retry_after": 1.5}, {"status": 200, "delay_ms": 50}]}

A new script for a request ID replaces the one it had. Nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "SimulatorServer",
    "SimulatorSettings",
    "create_simulator_app",
    "serve_simulator",
]

Wire = Literal["openai", "anthropic"]

ECHO_PREFIX = "echo: "
MAX_ECHO_CHARS = 200
RATE_WINDOW_S = 60.0
CALL_LOG_SIZE = 100_000


class SimulatorSettings(BaseSettings):
    """How the simulator behaves; ``LLMSTREAM_SIM_*`` variables, constructor arguments win."""

    model_config = SettingsConfigDict(env_prefix="LLMSTREAM_SIM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    latency_ms: float = Field(default=200.0, ge=0)
    latency_jitter: float = Field(default=0.2, ge=0, le=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_status: int = Field(default=500, ge=500, le=599)
    rpm_limit: int | None = Field(default=None, ge=1)
    rate_window_s: float = Field(default=RATE_WINDOW_S, gt=0, le=3600)
    api_key: SecretStr | None = None
    seed: int | None = None


class _ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(default=None, ge=0)
    latency_jitter: float | None = Field(default=None, ge=0, le=1)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    error_status: int | None = Field(default=None, ge=500, le=599)
    rpm_limit: int | None = Field(default=None, ge=0)  # 0 turns the limit off
    rate_window_s: float | None = Field(default=None, gt=0, le=3600)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int = Field(default=200, ge=200, le=599)
    retry_after: float | None = Field(default=None, ge=0)
    delay_ms: float | None = Field(default=None, ge=0)


class _Script(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    responses: list[_Step]


class _Call:
    """One provider call, for ``/_sim/calls``."""

    __slots__ = ("api", "request_id", "status")

    def __init__(self, request_id: str, api: Wire) -> None:
        self.request_id = request_id
        self.api = api
        self.status: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "api": self.api,
            "status": self.status,
            "finished": self.status is not None,
        }


@dataclass
class _Config:
    latency_ms: float
    latency_jitter: float
    error_rate: float
    rpm_limit: int | None
    error_status: int = 500
    rate_window_s: float = RATE_WINDOW_S


class _State:
    """Everything the handlers share; one per app, touched only from the event loop."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.rng = random.Random(settings.seed)  # noqa: S311 - simulated latency, not crypto
        self.ids = itertools.count(1)
        self.in_flight = 0  # a live gauge: a reset does not end the calls still running
        self.reset()

    def reset(self) -> None:
        s = self.settings
        self.config = _Config(
            s.latency_ms,
            s.latency_jitter,
            s.error_rate,
            s.rpm_limit,
            s.error_status,
            s.rate_window_s,
        )
        self.calls_total = 0
        self.completed_total = 0
        self.calls: deque[_Call] = deque(maxlen=CALL_LOG_SIZE)
        self.calls_by_request_id: dict[str, int] = {}
        self.status_counts: Counter[int] = Counter()
        self.scripts: dict[str, deque[_Step]] = {}
        self.window: deque[float] = deque()

    def stats(self) -> dict[str, Any]:
        return {
            "calls_total": self.calls_total,
            "completed_total": self.completed_total,
            "in_flight": self.in_flight,
            "calls_by_request_id": self.calls_by_request_id,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "config": asdict(self.config),
        }

    def rate_limited(self) -> float | None:
        """Seconds until a slot frees, when the last minute is full; else take a slot."""
        if not self.config.rpm_limit:
            return None
        span = self.config.rate_window_s
        limit = max(1, round(self.config.rpm_limit * span / 60))
        now = time.monotonic()
        window = self.window
        while window and window[0] <= now - span:
            window.popleft()
        if len(window) >= limit:
            return window[0] + span - now
        window.append(now)
        return None

    def latency_s(self) -> float:
        c = self.config
        if c.latency_ms <= 0:
            return 0.0
        jitter = self.rng.uniform(-c.latency_jitter, c.latency_jitter) if c.latency_jitter else 0
        return c.latency_ms * (1 + jitter) / 1000


_STATE = web.AppKey("llmstream_simulator_state", _State)


def create_simulator_app(settings: SimulatorSettings) -> web.Application:
    """The simulator as an aiohttp application (run it with :class:`SimulatorServer`)."""
    app = web.Application()
    app[_STATE] = _State(settings)
    app.router.add_post("/v1/chat/completions", _openai)
    app.router.add_post("/v1/messages", _anthropic)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/calls", _calls)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_post("/_sim/config", _config)
    app.router.add_post("/_sim/script", _script)
    return app


class SimulatorServer:
    """Runs the simulator in the current event loop; port 0 picks a free port.

    ``async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0)) as sim: sim.url``
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.app = create_simulator_app(settings)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` once started."""
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        host = self.settings.host
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    async def start(self) -> None:
        """Bind and serve."""
        # No access log: a log line per request would cost more than the request itself.
        # Calls still running at stop get half a second, then are cancelled.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._port = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve_simulator(settings: SimulatorSettings) -> None:
    """Serve until cancelled (for ``llmstream simulate``)."""
    server = SimulatorServer(settings)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


# --- the two wire formats ------------------------------------------------------------------


async def _openai(request: web.Request) -> web.Response:
    return await _handle(request, "openai")


async def _anthropic(request: web.Request) -> web.Response:
    return await _handle(request, "anthropic")


async def _handle(request: web.Request, wire: Wire) -> web.Response:
    state = request.app[_STATE]
    request_id = request.headers.get("X-Client-Request-Id", "")
    state.calls_total += 1
    state.calls_by_request_id[request_id] = state.calls_by_request_id.get(request_id, 0) + 1
    call = _Call(request_id, wire)
    state.calls.append(call)
    state.in_flight += 1
    try:
        response = await _respond(state, request, wire, request_id)
    finally:
        state.in_flight -= 1
    call.status = response.status
    state.completed_total += 1
    return response


async def _respond(
    state: _State, request: web.Request, wire: Wire, request_id: str
) -> web.Response:
    raw = await request.read()

    script = state.scripts.get(request_id)
    if script:
        step = script.popleft()
        if not script:
            del state.scripts[request_id]
        if step.delay_ms:
            await asyncio.sleep(step.delay_ms / 1000)
        if step.status != 200:
            return _error(state, wire, step.status, step.retry_after)
        return _answer(state, wire, request, raw)

    if state.api_key is not None and not _authorized(request, wire, state.api_key):
        return _error(state, wire, 401)
    wait = state.rate_limited()
    if wait is not None:
        return _error(state, wire, 429, wait)
    latency = state.latency_s()
    if latency:
        await asyncio.sleep(latency)
    if state.config.error_rate and state.rng.random() < state.config.error_rate:
        return _error(state, wire, state.config.error_status)
    return _answer(state, wire, request, raw)


def _authorized(request: web.Request, wire: Wire, key: bytes) -> bool:
    if wire == "openai":
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
    else:
        given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key)


def _answer(state: _State, wire: Wire, request: web.Request, raw: bytes) -> web.Response:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(state, wire, 400, message="the request body is not valid JSON")
    problem = (
        _check_openai(body)
        if wire == "openai"
        else _check_anthropic(body, request.headers.get("anthropic-version"))
    )
    if problem:
        return _error(state, wire, 400, message=problem)
    if wire == "openai":
        return _json(state, 200, _openai_completion(state, body))
    return _json(state, 200, _anthropic_message(state, body))


def _check_openai(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            return f"messages[{i}]: invalid role"
    return _check_common(body, "stop")


def _check_anthropic(body: Any, version: str | None) -> str | None:
    if not version:
        return "anthropic-version: header is required"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return (
                f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
    if "system" in body and not isinstance(body["system"], str | list):
        return "system: Input should be a valid string"
    return _check_common(body, "stop_sequences")


def _check_common(body: dict[str, Any], stop_field: str) -> str | None:
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            return f"{field}: Input should be a valid number"
    stop = body.get(stop_field)
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return f"{stop_field}: Input should be a list of strings"
    return None


def _text(content: Any) -> str:
    """The text of a message's content: a string, or a list of text-bearing blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text(part.get("text", part.get("content"))) for part in content if part)
    return ""


def _tokens(text: str) -> int:
    return len(text.split())


def _reply(body: dict[str, Any], stop: Any) -> tuple[str, Literal["end", "stop", "length"], str]:
    """``(content, why it ended, the stop sequence hit or "")`` for a request body."""
    last_user = next(
        (_text(m.get("content")) for m in reversed(body["messages"]) if m.get("role") == "user"),
        "",
    )
    content = (ECHO_PREFIX + last_user)[:MAX_ECHO_CHARS]
    ended: Literal["end", "stop", "length"] = "end"
    hit = ""
    stops = [stop] if isinstance(stop, str) else stop or []
    cut = min(((content.find(s), s) for s in stops if s and s in content), default=None)
    if cut is not None:
        content, ended, hit = content[: cut[0]], "stop", cut[1]
    max_tokens = body.get("max_tokens")
    words = content.split()
    if isinstance(max_tokens, int) and len(words) > max_tokens:
        content, ended, hit = " ".join(words[:max_tokens]), "length", ""
    return content, ended, hit


def _openai_completion(state: _State, body: dict[str, Any]) -> dict[str, Any]:
    content, ended, _ = _reply(body, body.get("stop"))
    prompt = sum(_tokens(_text(m.get("content"))) for m in body["messages"])
    completion = _tokens(content)
    return {
        "id": f"chatcmpl-sim{next(state.ids):012d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if ended == "length" else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_simulator",
    }


def _anthropic_message(state: _State, body: dict[str, Any]) -> dict[str, Any]:
    content, ended, hit = _reply(body, body.get("stop_sequences"))
    prompt = _tokens(_text(body.get("system"))) + sum(
        _tokens(_text(m.get("content"))) for m in body["messages"]
    )
    stop_reason = {"end": "end_turn", "stop": "stop_sequence", "length": "max_tokens"}[ended]
    return {
        "id": f"msg_sim{next(state.ids):018d}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": content}],
        "stop_reason": stop_reason,
        "stop_sequence": hit or None,
        "usage": {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": _tokens(content),
            "service_tier": "standard",
        },
    }


# --- errors, in each provider's own shape ----------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM). Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
}
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def _error(
    state: _State,
    wire: Wire,
    status: int,
    retry_after: float | None = None,
    *,
    message: str | None = None,
) -> web.Response:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(max(0, math.ceil(retry_after * 1000)))
    body: dict[str, Any]
    if wire == "openai":
        fallback = _OPENAI_ERRORS[500 if status >= 500 else 400]
        kind, code, text = _OPENAI_ERRORS.get(status, fallback)
        body = {"error": {"message": message or text, "type": kind, "param": None, "code": code}}
    else:
        kind, text = _ANTHROPIC_ERRORS.get(status, _ANTHROPIC_ERRORS[500 if status >= 500 else 400])
        body = {
            "type": "error",
            "error": {"type": kind, "message": message or text},
            "request_id": f"req_sim{next(state.ids):018d}",
        }
    return _json(state, status, body, headers)


def _json(
    state: _State, status: int, body: Any, headers: dict[str, str] | None = None
) -> web.Response:
    state.status_counts[status] += 1
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


# --- control ---------------------------------------------------------------------------------


async def _stats(request: web.Request) -> web.Response:
    return _control(request.app[_STATE].stats())


async def _calls(request: web.Request) -> web.Response:
    return _control({"calls": [call.as_json() for call in request.app[_STATE].calls]})


async def _reset(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.reset()
    return _control(state.stats())


async def _config(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        update = _ConfigUpdate.model_validate_json(await request.read())
    except ValidationError as exc:
        return _control({"error": exc.errors(include_url=False)}, 400)
    for field in update.model_fields_set:
        value = getattr(update, field)
        if field == "rpm_limit":
            value = value or None
        elif value is None:
            continue
        setattr(state.config, field, value)
    return _control(asdict(state.config))


async def _script(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        script = _Script.model_validate_json(await request.read())
    except ValidationError as exc:
        return _control({"error": exc.errors(include_url=False)}, 400)
    if script.responses:
        state.scripts[script.request_id] = deque(script.responses)
    else:
        state.scripts.pop(script.request_id, None)
    return _control({"request_id": script.request_id, "queued": len(script.responses)})


def _control(body: Any, status: int = 200) -> web.Response:
    # Control calls are not provider calls: they are not counted.
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json"
    )
