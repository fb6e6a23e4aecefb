"""A provider simulator: a real HTTP server speaking OpenAI's and Anthropic's wire formats.

For tests, demos and benchmarks without a provider. ``POST /v1/chat/completions`` answers like
OpenAI's Chat Completions and ``POST /v1/messages`` like Anthropic's Messages API, with their
response shapes, usage fields, error bodies and rate-limit headers. Point an adapter at it with
``base_url=f"{url}/v1"`` (OpenAI style) or ``base_url=url`` (Anthropic style).

The answer is deterministic: ``"echo: <last user message>"`` (truncated to 200 characters), cut
at the first stop sequence (``finish_reason`` ``stop`` / ``stop_sequence``) and at ``max_tokens``
words (``length`` / ``max_tokens``). A token is a whitespace-separated word. A body that offers
tools gets tool calls, then a text quoting the tool results (:mod:`llmstream.devtools.sim_tools`);
an OpenAI ``response_format`` asking for JSON gets a JSON object (:mod:`llmstream.devtools.wire`).

With ``"stream": true`` the same answer comes as server-sent events in the provider's format
(:mod:`llmstream.devtools.sim_stream`): the text, and each tool call's arguments, in
``stream_chunks`` pieces ``stream_chunk_delay_ms`` apart. Errors (401, 429, 5xx) are answered
before any event. A stream breaks half-way (the first half of the pieces, then the connection
is dropped without the terminating event) for ``stream_break_rate`` of streams, for a scripted
step with ``"break_stream": true``, and for the first stream of a request whose last user message
holds ``[break-stream]`` (the request is its ``X-Client-Request-Id``, else its exact body); later
streams of that request complete.

Batches: OpenAI's Files and Batches and Anthropic's Message Batches
(:mod:`llmstream.devtools.sim_batch_api`), answered as the endpoints above answer, after
``batch_delay_ms``, with per-line errors and expiry on demand
(:mod:`llmstream.devtools.sim_batches`). ``"service_tier": "flex"`` on OpenAI's endpoint is
answered as flex, or with a 429 when flex is short (:mod:`llmstream.devtools.sim_flex`).

Each call, in order: counted under its ``X-Client-Request-Id`` (``""`` without one); a scripted
response for that ID, if any, is used instead of everything below (``status`` 200 is a normal
answer; only ``delay_ms`` delays a scripted call); wrong API key → 401; over ``rpm_limit`` in
a sliding window of the last ``rate_window_s`` (60 s: ``rpm_limit`` calls; a shorter window
allows ``rpm_limit * rate_window_s / 60``, for time-scaled tests) → 429 with ``Retry-After``
(whole seconds) and ``retry-after-ms`` (when the oldest call leaves the window); a flex call
that finds flex short → 429 ``resource_unavailable``; malformed body → 400; then the latency,
then ``error_rate`` of calls get ``error_status`` (500).

A call keeps running when its client goes away, as it would at a provider (which still bills
it): ``in_flight`` counts calls not yet answered, whoever is still listening. A stream whose
client goes away stops there.

Control, for tests::

    GET  /_sim/stats   {"calls_total", "completed_total", "in_flight", "calls_by_request_id",
                        "streams_by_request_id", "streams_broken_total", "status_counts",
                        "config", "flex_calls_by_request_id", "flex_busy_total",
                        "batches_by_request_id" ({custom_id: [batch IDs it was accepted in]}),
                        "batches_total", "batches_by_status" (OpenAI's status names),
                        "batch_lines_total", "batch_lines_by_outcome"}
    GET  /_sim/calls   {"calls": [{"request_id", "api", "status", "finished", "stream",
                       "broken"}, ...]} in arrival order (the last 100,000)
    POST /_sim/reset   back to the start: counters, call log, scripts, rate window, config and
                       which marked requests already broke; files and batches are forgotten
    POST /_sim/config  {"latency_ms", "latency_jitter", "error_rate", "error_status",
                        "rpm_limit", "rate_window_s", "stream_chunks", "stream_chunk_delay_ms",
                        "stream_break_rate", "batch_delay_ms", "batch_expire_rate",
                        "flex_busy_rate"} (any subset)
    POST /_sim/batches/{id}/expire   a running batch (either API) expires now
    POST /_sim/script  {"request_id": "r1", "responses": [{"status": 500},
                        {"status": 429, "retry_after": 1.5}, {"status": 200, "delay_ms": 50},
                        {"status": 200, "break_stream": true}]}

A new script for a request ID replaces the one it had. Nothing is logged per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Self, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmstream.devtools.sim_batch_api import add_batch_routes
from llmstream.devtools.sim_batches import BatchStore
from llmstream.devtools.sim_flex import FlexTier, flex_busy_body
from llmstream.devtools.sim_stream import (
    Frame,
    anthropic_frames,
    break_point,
    openai_frames,
    write_frames,
)
from llmstream.devtools.wire import (
    Wire,
    anthropic_message,
    check_anthropic,
    check_openai,
    error_body,
    last_user_text,
    openai_completion,
    reply_to,
)

__all__ = [
    "AppServer",
    "SimulatorServer",
    "SimulatorSettings",
    "create_simulator_app",
    "serve_simulator",
]

_Body = TypeVar("_Body", bound=BaseModel)

RATE_WINDOW_S = 60.0
CALL_LOG_SIZE = 100_000
BREAK_MARKER = "[break-stream]"


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
    stream_chunks: int = Field(default=8, ge=1, le=100_000)
    stream_chunk_delay_ms: float = Field(default=20.0, ge=0)
    stream_break_rate: float = Field(default=0.0, ge=0, le=1)
    batch_delay_ms: float = Field(default=2000.0, ge=0)
    batch_expire_rate: float = Field(default=0.0, ge=0, le=1)
    flex_busy_rate: float = Field(default=0.0, ge=0, le=1)
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
    stream_chunks: int | None = Field(default=None, ge=1, le=100_000)
    stream_chunk_delay_ms: float | None = Field(default=None, ge=0)
    stream_break_rate: float | None = Field(default=None, ge=0, le=1)
    batch_delay_ms: float | None = Field(default=None, ge=0)
    batch_expire_rate: float | None = Field(default=None, ge=0, le=1)
    flex_busy_rate: float | None = Field(default=None, ge=0, le=1)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: int = Field(default=200, ge=200, le=599)
    retry_after: float | None = Field(default=None, ge=0)
    delay_ms: float | None = Field(default=None, ge=0)
    break_stream: bool = False  # a streamed answer is cut half-way


class _Script(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    responses: list[_Step]


@dataclass(slots=True)
class _Call:
    """One provider call, for ``/_sim/calls``."""

    request_id: str
    api: Wire
    status: int | None = None
    stream: bool = False
    broken: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "api": self.api,
            "status": self.status,
            "finished": self.status is not None,
            "stream": self.stream,
            "broken": self.broken,
        }


class _State:
    """Everything the handlers share; one per app, touched only from the event loop."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.rng = random.Random(settings.seed)  # noqa: S311 - simulated latency, not crypto
        self.ids = itertools.count(1)
        self.in_flight = 0  # a live gauge: a reset does not end the calls still running
        self.batches = BatchStore(lambda: self.config, self.ids, self.rng.random, self.authorized)
        self.flex = FlexTier(lambda: self.config.flex_busy_rate, self.rng.random)
        self.reset()

    def reset(self) -> None:
        # What /_sim/config changes: a copy, so a reset goes back to the settings.
        self.config = self.settings.model_copy()
        self.calls_total = 0
        self.completed_total = 0
        self.calls: deque[_Call] = deque(maxlen=CALL_LOG_SIZE)
        self.calls_by_request_id: dict[str, int] = {}
        self.streams_by_request_id: dict[str, int] = {}
        self.streams_broken_total = 0
        self.broken_by_marker: set[str] = set()
        self.status_counts: Counter[int] = Counter()
        self.scripts: dict[str, deque[_Step]] = {}
        self.window: deque[float] = deque()
        self.batches.reset()
        self.flex.reset()

    def stats(self) -> dict[str, Any]:
        return {
            "calls_total": self.calls_total,
            "completed_total": self.completed_total,
            "in_flight": self.in_flight,
            "calls_by_request_id": self.calls_by_request_id,
            "streams_by_request_id": self.streams_by_request_id,
            "streams_broken_total": self.streams_broken_total,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "config": self.config_json(),
            **self.flex.stats(),
            **self.batches.stats(),
        }

    def config_json(self) -> dict[str, Any]:
        return self.config.model_dump(include=set(_ConfigUpdate.model_fields))

    def authorized(self, request: web.Request, wire: Wire) -> bool:
        return self.api_key is None or _authorized(request, wire, self.api_key)

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
    app.router.add_post("/v1/chat/completions", partial(_handle, wire="openai"))
    app.router.add_post("/v1/messages", partial(_handle, wire="anthropic"))
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_get("/_sim/calls", _calls)
    app.router.add_post("/_sim/reset", _reset)
    app.router.add_post("/_sim/config", _config)
    app.router.add_post("/_sim/script", _script)
    add_batch_routes(app, app[_STATE].batches)
    return app


class AppServer:
    """Serves an aiohttp ``app`` from the current event loop on ``host``:``port`` (port 0 picks
    a free one): the simulator, and the small servers tests stand in for a provider with."""

    def __init__(
        self, app: web.Application, host: str = "127.0.0.1", port: int = 0, *, backlog: int = 1024
    ) -> None:
        self.app = app
        self._host = host
        self._bind_port = port
        self._backlog = backlog
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` once started."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host = self._host
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    async def start(self) -> None:
        """Bind and serve."""
        # No access log: a log line per request would cost more than the request itself.
        # Calls still running at stop get half a second, then are cancelled.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._bind_port, backlog=self._backlog)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listener and every connection (``url`` still says where it served)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class SimulatorServer(AppServer):
    """Runs the simulator in the current event loop; port 0 picks a free port.

    ``async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0)) as sim: sim.url``
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        super().__init__(create_simulator_app(settings), settings.host, settings.port, backlog=4096)
        self.settings = settings


async def serve_simulator(settings: SimulatorSettings) -> None:
    """Serve until cancelled (for ``llmstream simulate``)."""
    async with SimulatorServer(settings):
        await asyncio.Event().wait()


# --- the two wire formats ------------------------------------------------------------------


async def _handle(request: web.Request, wire: Wire) -> web.StreamResponse:
    state = request.app[_STATE]
    request_id = request.headers.get("X-Client-Request-Id", "")
    state.calls_total += 1
    state.calls_by_request_id[request_id] = state.calls_by_request_id.get(request_id, 0) + 1
    call = _Call(request_id, wire)
    state.calls.append(call)
    state.in_flight += 1
    try:
        response = await _respond(state, request, call)
    finally:
        state.in_flight -= 1
    call.status = response.status
    state.completed_total += 1
    return response


async def _respond(state: _State, request: web.Request, call: _Call) -> web.StreamResponse:
    raw = await request.read()
    wire = call.api

    script = state.scripts.get(call.request_id)
    if script:
        step = script.popleft()
        if not script:
            del state.scripts[call.request_id]
        if step.delay_ms:
            await asyncio.sleep(step.delay_ms / 1000)
        if step.status != 200:
            return _error(state, wire, step.status, step.retry_after)
        return await _answer(state, request, call, raw, break_stream=step.break_stream)

    if not state.authorized(request, wire):
        return _error(state, wire, 401)
    wait = state.rate_limited()
    if wait is not None:
        return _error(state, wire, 429, wait)
    if wire == "openai" and state.flex.busy(raw, call.request_id):
        return _json(state, 429, flex_busy_body())
    latency = state.latency_s()
    if latency:
        await asyncio.sleep(latency)
    if state.config.error_rate and state.rng.random() < state.config.error_rate:
        return _error(state, wire, state.config.error_status)
    return await _answer(state, request, call, raw)


def _authorized(request: web.Request, wire: Wire, key: bytes) -> bool:
    if wire == "openai":
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
    else:
        given = request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key)


async def _answer(
    state: _State, request: web.Request, call: _Call, raw: bytes, *, break_stream: bool = False
) -> web.StreamResponse:
    wire = call.api
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(state, wire, 400, message="the request body is not valid JSON")
    problem = (
        check_openai(body)
        if wire == "openai"
        else check_anthropic(body, request.headers.get("anthropic-version"))
    )
    if problem:
        return _error(state, wire, 400, message=problem)
    if body.get("stream") is not True:
        if wire == "openai":
            completion = openai_completion(body, next(state.ids))
            if body.get("service_tier") == "flex":
                completion["service_tier"] = "flex"
            return _json(state, 200, completion)
        return _json(state, 200, anthropic_message(body, next(state.ids)))

    call.stream = True
    streams = state.streams_by_request_id
    streams[call.request_id] = streams.get(call.request_id, 0) + 1
    build = openai_frames if wire == "openai" else anthropic_frames
    frames = build(body, reply_to(wire, body), next(state.ids), state.config.stream_chunks)
    if break_stream or _breaks(state, wire, body, call.request_id, raw):
        call.broken = True
        state.streams_broken_total += 1
        frames = frames[: break_point(frames)]
    return await _stream(state, request, frames, complete=not call.broken)


def _breaks(state: _State, wire: Wire, body: dict[str, Any], request_id: str, raw: bytes) -> bool:
    """Whether this stream is cut half-way: the first stream of a request whose last user message
    holds the marker, or by chance (``stream_break_rate``)."""
    if BREAK_MARKER in last_user_text(wire, body):
        # Without an ID header, the same body is the same request.
        key = request_id or "body:" + hashlib.sha256(raw).hexdigest()
        if key not in state.broken_by_marker:
            state.broken_by_marker.add(key)
            return True
        return False
    rate = state.config.stream_break_rate
    return bool(rate) and state.rng.random() < rate


async def _stream(
    state: _State, request: web.Request, frames: list[Frame], *, complete: bool
) -> web.StreamResponse:
    """Send ``frames`` as server-sent events; when not ``complete``, then drop the connection
    (no terminating event, no end of the chunked body), as a provider's stream breaks."""
    state.status_counts[200] += 1
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
    )
    if not complete:
        response.force_close()
    try:
        await response.prepare(request)
        await write_frames(response, frames, state.config.stream_chunk_delay_ms / 1000)
        if complete:
            await response.write_eof()
    except ConnectionError:
        # The client went away mid-stream; the provider stops generating.
        return response
    if not complete and request.transport is not None:
        request.transport.abort()
    return response


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
    return _json(state, status, error_body(wire, status, message, next(state.ids)), headers)


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
    update = await _parse(request, _ConfigUpdate)
    for field in update.model_fields_set:
        value = getattr(update, field)
        if field == "rpm_limit":
            value = value or None
        elif value is None:
            continue
        setattr(state.config, field, value)
    return _control(state.config_json())


async def _script(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    script = await _parse(request, _Script)
    if script.responses:
        state.scripts[script.request_id] = deque(script.responses)
    else:
        state.scripts.pop(script.request_id, None)
    return _control({"request_id": script.request_id, "queued": len(script.responses)})


async def _parse(request: web.Request, model: type[_Body]) -> _Body:
    """The request's JSON body as ``model``; a 400 with pydantic's errors when it is not."""
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        errors = orjson.dumps({"error": exc.errors(include_url=False)}, default=str)
        raise web.HTTPBadRequest(text=errors.decode(), content_type="application/json") from None


def _control(body: Any, status: int = 200) -> web.Response:
    # Control calls are not provider calls: they are not counted.
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json"
    )
