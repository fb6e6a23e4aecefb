"""The HTTP ingress: ``create_app(settings)`` builds it; ``llmstream ingress`` serves it.

Endpoints, one router per concern::

    POST /v1/requests             one request or {"requests": [...]}: published, 202 with the IDs
    GET  /v1/requests/{id}        pending | completed (with the response) | failed (with the error)
                                  (ingress.requests_api)
    POST /v1/chat/completions     OpenAI's Chat Completions, answered when the outcome arrives,
                                  or streamed with "stream": true (ingress.openai_compat)
    GET  /v1/requests/{id}/stream a request's chunks then its outcome, as Server-Sent Events
    WS   /v1/requests/{id}/ws     the same over a WebSocket (ingress.streaming)
    GET  /v1/models               the provider/model names configuration knows (ingress.models_api)
    POST/GET/DELETE /v1/sessions[/{id}]  conversations kept in Redis (ingress.sessions_api)
    POST /v1/tools/{name}/execute one server-side tool, for debugging (ingress.tools_api)
    GET  /health  /ready  /metrics  (ingress.operations)    /docs  /openapi.json

Every ``/v1`` call is authenticated (when API keys are configured) and counted against the
client's quota, in that order, from its headers, before its body is read (the ``Authenticate``
middleware, ingress.auth). Errors have one shape
(ingress.errors). Routes take what they use from ``app.state`` (ingress.parts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import llmstream
from llmstream.core.catalog import Catalog
from llmstream.core.connections import (
    kafka_producer_options,
    negotiate_idempotence,
    redis_client,
)
from llmstream.core.sessions import SessionStore
from llmstream.core.tools import ToolExecutor, ToolRegistry
from llmstream.ingress import (
    models_api,
    openai_compat,
    operations,
    requests_api,
    sessions_api,
    streaming,
    tools_api,
)
from llmstream.ingress.auth import IDENTITY, ApiKeys, authenticate
from llmstream.ingress.chunks import ChunkHub
from llmstream.ingress.errors import ApiError, install_error_handlers
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.publish import Publisher
from llmstream.ingress.quota import ClientQuota
from llmstream.ingress.results import RequestLedger, ResponseListener
from llmstream.ingress.settings import IngressSettings

log = logging.getLogger(__name__)

# What the lifespan puts on app.state, and takes off again when the app stops.
_RUNNING_PARTS = (
    "redis",
    "producer",
    "ledger",
    "publisher",
    "listener",
    "hub",
    "quota",
    "sessions",
    "tools",
)


def create_app(settings: IngressSettings, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The ingress as an ASGI app; connections are made when it starts (its lifespan)."""
    metrics = IngressMetrics(registry or CollectorRegistry())
    api_keys = ApiKeys(settings.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not api_keys.enabled:
            log.warning(
                "no API keys configured (LLMSTREAM_API_KEYS): authentication is OFF; anyone "
                "who can reach this ingress can submit requests"
            )
        async with connect(settings, metrics, app.state):
            yield

    app = FastAPI(
        title="llmstream ingress",
        version=llmstream.__version__,
        summary="Publishes LLM requests to Kafka and serves their outcomes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = api_keys
    install_error_handlers(
        app,
        validation_status={openai_compat.CHAT_PATH: 400},
        body_tags=requests_api.BODY_TAGS,
    )
    # The last added runs first: count, authenticate, then limit and read the body.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate)
    app.add_middleware(CountRequests, metrics=metrics)
    app.state.catalog = Catalog.from_settings(settings)
    app.state.tool_registry = ToolRegistry.from_params(settings)  # a bad tools file stops the start
    # Before requests_api: its GET /v1/requests/{id} would take "<id>/stream" for an ID.
    app.include_router(streaming.routes.router())
    app.include_router(requests_api.routes.router())
    app.include_router(models_api.routes.router())
    app.include_router(sessions_api.routes.router())
    app.include_router(tools_api.routes.router())
    app.include_router(openai_compat.routes.router())
    app.include_router(operations.routes.router())
    # Builds every route's state (and the OpenAPI document) now, in the thread that creates the
    # app: FastAPI otherwise builds it at the first request, and apps served from several threads
    # (two replicas in one test process) raced there on the shared Header field of
    # Idempotency-Key.
    app.openapi()
    return app


@contextlib.asynccontextmanager
async def connect(
    settings: IngressSettings, metrics: IngressMetrics, state: State
) -> AsyncIterator[None]:
    """Connect the running parts, put them on ``state`` for the block, then drain and close."""
    redis = redis_client(settings)
    producer = AIOKafkaProducer(
        **kafka_producer_options(settings),
        linger_ms=settings.linger_ms,
        max_request_size=settings.max_event_bytes + 64 * 1024,
        request_timeout_ms=int(settings.publish_timeout_s * 1000),
        client_id="llmstream-ingress",
    )
    ledger = RequestLedger(
        redis,
        key_prefix=settings.redis_key_prefix,
        ttl_s=settings.result_ttl_s,
        requeue_after_s=settings.requeue_after_s,
    )
    listener = ResponseListener(settings, ledger)
    hub = ChunkHub(settings, metrics)
    registry = getattr(state, "tool_registry", None)
    if not isinstance(registry, ToolRegistry):
        registry = ToolRegistry.from_params(settings)
    http = aiohttp.ClientSession()  # for server-side tools run from /v1/tools/{name}/execute
    try:
        await producer.start()
        try:
            await listener.start()
            await hub.start()
            metrics.waiting.set_function(lambda: listener.waiting)
            metrics.followers.set_function(lambda: hub.followers)
            metrics.kept_chunk_bytes.set_function(lambda: hub.kept_bytes)
            state.redis = redis
            state.producer = producer
            state.ledger = ledger
            state.publisher = Publisher(producer, ledger, settings, metrics)
            state.listener = listener
            state.hub = hub
            state.quota = ClientQuota(
                redis,  # one key per script: Redis Cluster serves too
                key_prefix=settings.redis_key_prefix,
                per_minute=settings.rate_limit_per_minute,
                burst=settings.rate_limit_burst,
                failures_per_minute=settings.auth_failures_per_minute,
                failures_burst=settings.auth_failures_burst,
            )
            state.sessions = SessionStore(
                redis, key_prefix=settings.redis_key_prefix, params=settings
            )
            state.tools = ToolExecutor(registry, http)
            try:
                yield
            finally:
                for name in _RUNNING_PARTS:
                    delattr(state, name)
        finally:
            await hub.stop()
            await listener.stop()
            # Sends whatever is still buffered and waits for the broker's acks.
            await producer.stop()
    finally:
        await http.close()
        await redis.aclose()


class _HttpMiddleware:
    """An ASGI middleware for HTTP requests only; everything else passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class Authenticate(_HttpMiddleware):
    """Authenticates every ``/v1`` call from its headers before anything reads its body.

    FastAPI reads and parses a route's body before it resolves the route's dependencies, so an
    unauthenticated caller could make the ingress read and parse up to LLMSTREAM_MAX_BODY_BYTES,
    and learn from a 422 that it was parsed. Here a refusal is answered without a byte of the
    body read (the server drains or drops it); the route takes the identity found
    (:data:`~llmstream.ingress.auth.CallerDep`).
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        try:
            identity = await authenticate(Request(scope))
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        scope.setdefault("state", {})[IDENTITY] = identity
        await self.app(scope, receive, send)


class BodyLimit(_HttpMiddleware):
    """413 for a body over ``max_bytes``, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._too_large().response()(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, so the
                    # app's handler answers it in the one error shape.
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"body: larger than {self.max_bytes:,} bytes, the limit (LLMSTREAM_MAX_BODY_BYTES)",
            param="body",
            code="body_too_large",
        )


class CountRequests(_HttpMiddleware):
    """``llmstream_ingress_requests_total{endpoint, status}``, by route template."""

    def __init__(self, app: ASGIApp, metrics: IngressMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path_format", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()


def serve(settings: IngressSettings) -> None:
    """Run the ingress with uvicorn until SIGINT/SIGTERM, then drain and flush."""
    # Decided before uvicorn starts, so a cluster refusing what the settings insist on ends the
    # command with one line, not a failed lifespan's traceback.
    settings = asyncio.run(negotiate_idempotence(settings))
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        log_config=None,  # the CLI configured logging; do not replace it
        proxy_headers=False,
    )
    uvicorn.Server(config).run()
