"""The HTTP ingress: ``create_app(settings)`` builds it; ``llmstream ingress`` serves it.

Endpoints::

    POST /v1/requests             one request or {"requests": [...]}: published, 202 with the IDs
    GET  /v1/requests/{id}        pending | completed (with the response) | failed (with the error)
    POST /v1/chat/completions     OpenAI's Chat Completions, answered when the outcome arrives
    GET  /health  /ready  /metrics  /docs  /openapi.json

Every ``/v1`` call is authenticated (when API keys are configured) and rate limited per client,
in that order, before its body is validated. Errors have one shape (:mod:`ingress.errors`).
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations at
# runtime, and they refer to `caller`, a local of create_app.
import asyncio
import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as aioredis
import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import Body, Depends, FastAPI, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import llmstream
from llmstream.core.clock import wall_clock_ms
from llmstream.core.connections import kafka_producer_options
from llmstream.ingress import openai_compat
from llmstream.ingress.api import (
    BODY_TAGS,
    Admitted,
    Failure,
    RequestStatus,
    Submission,
    SubmitResponse,
    SubmittedBatch,
    SubmittedRequest,
)
from llmstream.ingress.auth import ApiKeys, Identity
from llmstream.ingress.errors import ApiError, install_error_handlers, validation_error
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.publish import Admission, Event, Publisher
from llmstream.ingress.ratelimit import RateLimiter
from llmstream.ingress.results import RequestLedger, ResponseListener
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import LLMError, LLMRequest, LLMResponse

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
# An Idempotency-Key leaves room for the "-<index>" a batch adds to it.
MAX_IDEMPOTENCY_KEY = 200

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Used as the request ID; in a batch, item i without an ID gets '<key>-<i>'.",
    ),
]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No API key"},
    403: {"description": "API key not allowed"},
    413: {"description": "Body or event too large"},
    429: {"description": "Rate limited; see Retry-After"},
    503: {"description": "Kafka or Redis unavailable; retry"},
}


@dataclass
class Runtime:
    """What the ingress holds while it runs; built on startup, closed on shutdown."""

    redis: aioredis.Redis
    producer: AIOKafkaProducer
    ledger: RequestLedger
    publisher: Publisher
    listener: ResponseListener
    limiter: RateLimiter


@contextlib.asynccontextmanager
async def _running(settings: IngressSettings, metrics: IngressMetrics) -> AsyncIterator[Runtime]:
    redis = aioredis.Redis.from_url(settings.redis_url)
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
    try:
        await producer.start()
        try:
            await listener.start()
            metrics.waiting.set_function(lambda: listener.waiting)
            yield Runtime(
                redis=redis,
                producer=producer,
                ledger=ledger,
                publisher=Publisher(
                    producer,
                    ledger,
                    topic=settings.requests_topic,
                    timeout_s=settings.publish_timeout_s,
                    metrics=metrics,
                ),
                listener=listener,
                limiter=RateLimiter(
                    redis,
                    key_prefix=settings.redis_key_prefix,
                    per_minute=settings.rate_limit_per_minute,
                    burst=settings.rate_limit_burst,
                ),
            )
        finally:
            await listener.stop()
            # Sends whatever is still buffered and waits for the broker's acks.
            await producer.stop()
    finally:
        await redis.aclose()


def create_app(settings: IngressSettings, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The ingress as an ASGI app; connections are made when it starts (its lifespan)."""
    metrics = IngressMetrics(registry or CollectorRegistry())
    keys = ApiKeys(settings.api_keys)
    state: dict[str, Runtime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not keys.enabled:
            log.warning(
                "no API keys configured (LLMSTREAM_API_KEYS): authentication is OFF; anyone "
                "who can reach this ingress can submit requests"
            )
        async with _running(settings, metrics) as runtime:
            state["runtime"] = runtime
            try:
                yield
            finally:
                del state["runtime"]

    def runtime() -> Runtime:
        try:
            return state["runtime"]
        except KeyError:
            raise ApiError(503, "the ingress is not running (starting or stopping)") from None

    app = FastAPI(
        title="llmstream ingress",
        version=llmstream.__version__,
        summary="Publishes LLM requests to Kafka and serves their outcomes.",
        lifespan=lifespan,
    )
    install_error_handlers(app, validation_status={CHAT_PATH: 400}, body_tags=BODY_TAGS)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    async def caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        api_key: Annotated[str | None, Depends(api_key_header)],
    ) -> Identity:
        """Authenticate, then count the call against the caller's rate limit."""
        key = credentials.credentials if credentials is not None else api_key
        try:
            identity = keys.identify(key, request.client.host if request.client else None)
        except ApiError as exc:
            metrics.auth_failures.labels("missing" if exc.status == 401 else "not_allowed").inc()
            raise
        limiter = runtime().limiter
        if limiter.enabled:
            try:
                decision = await limiter.acquire(identity.rate_key)
            except RedisError:
                raise _unavailable("Redis") from None
            if not decision.allowed:
                metrics.rate_limited.inc()
                wait_s = max(decision.retry_after_s, 0.001)
                raise ApiError(
                    429,
                    f"rate limit exceeded for this client; retry in {wait_s:.1f} s",
                    code="rate_limit_exceeded",
                    headers={
                        "Retry-After": str(max(1, math.ceil(wait_s))),
                        "retry-after-ms": str(math.ceil(wait_s * 1000)),
                    },
                )
        return identity

    @app.post(
        "/v1/requests",
        status_code=202,
        response_model=SubmitResponse,
        tags=["requests"],
        responses={
            200: {"model": SubmitResponse, "description": "Every ID was known: nothing published"},
            409: {"description": "A request ID belongs to another client or other content"},
            **_ERROR_RESPONSES,
        },
    )
    async def submit(
        body: Annotated[Submission, Body()],
        identity: Annotated[Identity, Depends(caller)],
        response: Response,
        idempotency_key: IdempotencyKey = None,
    ) -> SubmitResponse:
        """Publish one request, or a batch, to ``llm-requests``.

        A request without ``request_id`` gets the ``Idempotency-Key`` header, or a new UUID.
        A request ID that exists already is not published again: its current status is returned.
        """
        batch = isinstance(body, SubmittedBatch)
        if isinstance(body, SubmittedBatch):
            if len(body.requests) > settings.max_batch:
                raise ApiError(
                    422,
                    f"requests: at most {settings.max_batch} requests per batch, "
                    f"got {len(body.requests)}",
                    param="requests",
                    code="too_long",
                )
            items = list(body.requests)
            fields = [f"requests.{i}" for i in range(len(items))]
        else:
            items, fields = [body], [""]
        now = wall_clock_ms()
        requests = [
            _admit(
                item,
                field,
                request_id=_request_id(item, idempotency_key, index, batch=batch),
                client_id=identity.client_id,
                now_ms=now,
            )
            for index, (item, field) in enumerate(zip(items, fields, strict=True))
        ]
        events = [_event(r, f, settings) for r, f in zip(requests, fields, strict=True)]
        id_fields = [f"{field}.request_id" if field else "request_id" for field in fields]
        admissions = await _submit(runtime().publisher, events, identity, id_fields)
        failed = [a for a in admissions if a.failed]
        if failed:
            raise ApiError(
                503,
                f"{len(failed)} of {len(admissions)} requests could not be published; "
                "submit them again with the same request IDs (published ones are not sent twice)",
                code="publish_failed",
                headers={"Retry-After": "1"},
                extra={
                    "requests": [
                        {"request_id": a.request_id, "published": not a.failed} for a in admissions
                    ]
                },
            )
        if not any(a.published for a in admissions):
            response.status_code = 200
        return SubmitResponse(
            requests=[
                Admitted(request_id=a.request_id, status=a.status, duplicate=not a.published)
                for a in admissions
            ]
        )

    @app.get(
        "/v1/requests/{request_id:path}",
        response_model=RequestStatus,
        tags=["requests"],
        responses={404: {"description": "Unknown request ID"}, **_ERROR_RESPONSES},
    )
    async def get_request(
        request_id: Annotated[str, Path(min_length=1, max_length=256)],
        identity: Annotated[Identity, Depends(caller)],
    ) -> RequestStatus:
        """Where a request stands: ``pending``, ``completed`` or ``failed``."""
        try:
            stored = await runtime().ledger.get(request_id)
        except RedisError:
            raise _unavailable("Redis") from None
        outcome = stored.outcome() if stored is not None else None
        owner = stored.client if stored is not None else None
        if owner is None and outcome is not None:
            owner = outcome.client_id
        visible = identity.client_id is None or owner is None or owner == identity.client_id
        if stored is None or not visible:
            raise ApiError(404, "no request with this ID", param="request_id", code="not_found")
        return RequestStatus(
            request_id=request_id,
            status=stored.status,
            response=outcome if isinstance(outcome, LLMResponse) else None,
            error=Failure.of(outcome) if isinstance(outcome, LLMError) else None,
        )

    @app.post(
        CHAT_PATH,
        response_model=openai_compat.ChatCompletion,
        tags=["openai"],
        responses={
            400: {"description": "Invalid request (OpenAI error format)"},
            502: {"description": "The provider failed"},
            504: {"description": "No outcome in time; poll /v1/requests/{request_id}"},
            **_ERROR_RESPONSES,
        },
    )
    async def chat_completions(
        body: openai_compat.ChatCompletionRequest,
        identity: Annotated[Identity, Depends(caller)],
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        """OpenAI's Chat Completions, through Kafka: answered when the outcome arrives."""
        request_id = idempotency_key or f"chatcmpl-{uuid.uuid4().hex}"
        request = openai_compat.to_llm_request(
            body, request_id=request_id, client_id=identity.client_id, now_ms=wall_clock_ms()
        )
        event = _event(request, "", settings)
        # The request is past the point of no return once published: the SDK must not send it
        # again on its own (it would be a new request, and paid for again).
        final = {"x-request-id": request_id, "x-should-retry": "false"}
        started = time.perf_counter()
        listener = runtime().listener
        async with listener.waiter(request_id) as waiter:
            [admission] = await _submit(runtime().publisher, [event], identity, ["Idempotency-Key"])
            if admission.failed:
                raise ApiError(
                    503,
                    "the request could not be published; retry",
                    code="publish_failed",
                    headers={"x-request-id": request_id, "Retry-After": "1"},
                )
            outcome = await waiter.result(settings.chat_timeout_s)
        waited = time.perf_counter() - started
        if outcome is None:
            metrics.wait_time.labels("timeout").observe(waited)
            raise ApiError(
                504,
                f"no outcome within {settings.chat_timeout_s:g} s; the request goes on: "
                f"poll GET /v1/requests/{request_id}",
                code="timeout",
                headers=final,
                extra={"request_id": request_id},
            )
        metrics.outcomes.labels(waiter.source or "").inc()
        if isinstance(outcome, LLMError):
            metrics.wait_time.labels("error").observe(waited)
            raise openai_compat.error_for(outcome, final)
        metrics.wait_time.labels("completed").observe(waited)
        completion = openai_compat.chat_completion(outcome)
        return JSONResponse(completion.model_dump(mode="json"), headers=final)

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "alive"}

    @app.get(
        "/ready",
        tags=["operations"],
        responses={503: {"description": "A check failed; `checks` says which"}},
    )
    async def ready() -> JSONResponse:
        """Ready: Kafka and Redis answer, the topics exist and the response listener runs."""
        current = state.get("runtime")
        if current is None:
            checks = {"ingress": "starting or stopping"}
        else:
            checks = await _checks(current, settings)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _request_id(
    item: SubmittedRequest, idempotency_key: str | None, index: int, *, batch: bool
) -> str:
    if item.request_id is not None:
        if idempotency_key is not None and not batch and idempotency_key != item.request_id:
            raise ApiError(
                422,
                "Idempotency-Key: differs from the body's request_id; send one or the same",
                param="Idempotency-Key",
                code="conflicting_request_id",
            )
        return item.request_id
    if idempotency_key is not None:
        return f"{idempotency_key}-{index}" if batch else idempotency_key
    return uuid.uuid4().hex


def _admit(
    item: SubmittedRequest, field: str, *, request_id: str, client_id: str | None, now_ms: int
) -> LLMRequest:
    """The contract's request for a submitted one: its ID, its client, its creation time."""
    data = dict(item)
    data["request_id"] = request_id
    if client_id is not None:
        data["client_id"] = client_id  # the API key's identity, whatever the body said
    if data["created_at_ms"] is None:
        data["created_at_ms"] = now_ms
    try:
        return LLMRequest.model_validate(data)
    except ValidationError as exc:  # only the ID can be new here: one derived from the header
        prefix = tuple(field.split(".")) if field else ()
        errors = [{**e, "loc": ("body", *prefix, *e["loc"])} for e in exc.errors(include_url=False)]
        raise validation_error(errors, status=422) from None


def _event(request: LLMRequest, field: str, settings: IngressSettings) -> Event:
    value = encode(request, settings.output_format)
    if len(value) > settings.max_event_bytes:
        name = field or "body"
        raise ApiError(
            413,
            f"{name}: the request is {len(value)} bytes as an event; at most "
            f"{settings.max_event_bytes} bytes fit on the topic",
            param=name,
            code="event_too_large",
        )
    # What was asked, without when: a resubmission with a later created_at_ms is the same.
    content = encode(request.model_copy(update={"created_at_ms": None}), WireFormat.JSON)
    return Event(request.request_id, value, hashlib.sha256(content).hexdigest())


async def _submit(
    publisher: Publisher, events: Sequence[Event], identity: Identity, id_fields: Sequence[str]
) -> list[Admission]:
    try:
        admissions = await publisher.submit(events, identity.client_id)
    except RedisError:
        raise _unavailable("Redis") from None
    for admission, field in zip(admissions, id_fields, strict=True):
        if admission.conflict == "client":
            raise ApiError(
                409,
                f"{field}: this request ID is used by another client",
                param=field,
                code="request_id_taken",
            )
        if admission.conflict == "content":
            raise ApiError(
                409,
                f"{field}: this request ID was used for a different request; "
                "use a new ID for new content",
                param=field,
                code="request_id_reused",
            )
    return admissions


def _unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"{what} is unavailable; retry shortly",
        code="unavailable",
        headers={"Retry-After": "1"},
    )


async def _checks(runtime: Runtime, settings: IngressSettings) -> dict[str, str]:
    async def redis_check() -> str:
        try:
            await asyncio.wait_for(runtime.redis.ping(), settings.ready_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            return f"unreachable: {type(exc).__name__}"
        return "ok"

    async def kafka_check() -> str:
        try:
            cluster = await asyncio.wait_for(
                runtime.producer.client.fetch_all_metadata(), settings.ready_timeout_s
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            return f"unreachable: {type(exc).__name__}"
        missing = [
            t
            for t in (settings.requests_topic, settings.responses_topic, settings.errors_topic)
            if t not in cluster.topics()
        ]
        return f"missing topics: {', '.join(missing)}" if missing else "ok"

    redis_state, kafka_state = await asyncio.gather(redis_check(), kafka_check())
    return {
        "redis": redis_state,
        "kafka": kafka_state,
        "listener": "ok" if runtime.listener.running else "stopped",
    }


class BodyLimit:
    """413 for a body over ``max_bytes``, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
            f"body: larger than {self.max_bytes} bytes",
            param="body",
            code="body_too_large",
        )


class CountRequests:
    """``llmstream_ingress_requests_total{endpoint, status}``, by route template."""

    def __init__(self, app: ASGIApp, metrics: IngressMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        log_config=None,  # the CLI configured logging; do not replace it
        proxy_headers=False,
    )
    uvicorn.Server(config).run()
