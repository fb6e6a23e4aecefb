"""Following a request as it is answered: its chunks as they come, then its outcome.

:func:`follow` merges a request's chunk subscription (:mod:`ingress.chunks`) with its outcome
(:class:`~llmstream.ingress.results.Waiter`), in the order a client needs: every chunk read, then
the ``llm-responses`` or ``llm-errors`` event. The final response can reach the ingress before the
last chunk (they travel on different topics), so a response is held back until the chunk that
ends its attempt (``attempt == response.attempts`` with ``finish_reason``) has been read, until
the hub has read the request's partition to its end, or for ``stream_final_chunk_wait_s`` at most.

Two ways to follow a request submitted earlier, both with the rules of ``GET /v1/requests/{id}``
(with API keys on, only the client's own requests; others answer 404)::

    GET /v1/requests/{id}/stream    Server-Sent Events: "event: chunk" per chunk event (data: its
                                    JSON), then "event: response" (the llm-responses event) or
                                    "event: error" (the failure as GET /v1/requests/{id} shows it)
    WS  /v1/requests/{id}/ws        one text message per event: {"event": "chunk"|"response"|
                                    "error", "data": {...}}, then the server closes

A follower that joins late gets every chunk from the first (kept, or read back from the topic);
one that joins after the request finished gets them and the outcome at once. A stream that cannot
go on (the client fell too far behind, nothing came for ``chat_timeout_s``) ends with an ``error``
whose data is ``{"error": {"message", "type", "code", ...}}``: the request goes on regardless.
A request ID that ends in ``/stream`` or ``/ws`` cannot be read at ``GET /v1/requests/{id}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from fastapi import Path, WebSocket
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from llmstream.ingress.auth import CallerDep, Identity, authenticate
from llmstream.ingress.chunks import ChunkHub, FellBehind, Subscription
from llmstream.ingress.errors import ApiError, unavailable
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.parts import (
    HubDep,
    LedgerDep,
    ListenerDep,
    MetricsDep,
    Routes,
    SettingsDep,
    part,
)
from llmstream.ingress.requests_api import ERROR_RESPONSES, Failure
from llmstream.ingress.results import Outcome, RequestLedger, ResponseListener, Waiter
from llmstream.ingress.settings import IngressSettings
from llmstream.schemas.codec import WireFormat, encode
from llmstream.schemas.models import LLMError, LLMResponse, LLMResponseChunk

__all__ = ["KEEP_ALIVE", "ClosingStream", "Event", "Interrupted", "follow", "routes"]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The stream cannot go on; the request itself goes on."""

    code: Literal["timeout", "lagging", "request_id_taken"]
    message: str

    def body(self, request_id: str) -> dict[str, Any]:
        status = {"timeout": 504, "lagging": 503, "request_id_taken": 409}[self.code]
        return ApiError(
            status, self.message, code=self.code, extra={"request_id": request_id}
        ).body()


class _KeepAlive:
    """Nothing happened for ``stream_keepalive_s``: a stream may send a comment line."""


KEEP_ALIVE = _KeepAlive()

Event = LLMResponseChunk | LLMResponse | LLMError | Interrupted | _KeepAlive


def interrupted(code: Literal["timeout", "lagging"], request_id: str, wait_s: float) -> Interrupted:
    readable = f"the request goes on: read it at GET /v1/requests/{request_id}"
    if code == "timeout":
        return Interrupted(code, f"nothing came for {wait_s:g} s; {readable}")
    return Interrupted(code, f"this client fell too far behind the stream; {readable}")


async def follow(
    subscription: Subscription,
    waiter: Waiter,
    hub: ChunkHub,
    settings: IngressSettings,
    *,
    client_id: str | None,
) -> AsyncIterator[Event]:
    """The request's chunks as they are read, then its outcome (see the module's doc).

    With ``client_id`` set (API keys on), chunks of another client are skipped, and an outcome
    of another client ends the stream (an event with this ID produced straight to Kafka).
    """
    request_id = subscription.request_id
    loop = asyncio.get_running_loop()
    outcome_task: asyncio.Task[Outcome | None] = asyncio.create_task(waiter.result(math.inf))
    next_task: asyncio.Task[LLMResponseChunk] | None = None
    settled: asyncio.Task[None] | None = None
    outcome: Outcome | None = None
    finished: set[int] = set()  # attempts whose last chunk was read
    last_event = loop.time()
    settle_by = math.inf

    def mine(chunk: LLMResponseChunk) -> bool:
        return client_id is None or chunk.client_id == client_id

    try:
        while True:
            if settled is not None and settled.done() and settled.exception() is not None:
                settled = None  # the broker did not answer: wait out the bound instead
            if outcome is not None and (
                isinstance(outcome, LLMError)
                or outcome.attempts in finished
                or (settled is not None and settled.done())
                or loop.time() >= settle_by
            ):
                while (chunk := subscription.ready()) is not None:
                    if mine(chunk):
                        yield chunk
                yield outcome
                return
            if next_task is None:
                next_task = asyncio.ensure_future(subscription.next())
            waits: set[asyncio.Future[Any]] = {next_task}
            if outcome is None:
                waits.add(outcome_task)
                limit = last_event + settings.chat_timeout_s
            else:
                if settled is not None:
                    waits.add(settled)
                limit = settle_by
            timeout = max(0.0, min(settings.stream_keepalive_s, limit - loop.time()))
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
            if not done:
                if outcome is None and loop.time() >= limit:
                    yield interrupted("timeout", request_id, settings.chat_timeout_s)
                    return
                if loop.time() < limit:
                    yield KEEP_ALIVE
                continue
            if next_task in done:
                task, next_task = next_task, None
                try:
                    chunk = task.result()
                except FellBehind:
                    yield interrupted("lagging", request_id, 0)
                    return
                last_event = loop.time()
                if mine(chunk):
                    if chunk.finish_reason is not None:
                        finished.add(chunk.attempt)
                    yield chunk
            if outcome is None and outcome_task in done:
                outcome = outcome_task.result()
                if outcome is None:  # not with an endless wait; for the type checker
                    continue
                if client_id is not None and outcome.client_id != client_id:
                    yield Interrupted(
                        "request_id_taken", "this request ID is used by another client"
                    )
                    return
                if isinstance(outcome, LLMResponse) and outcome.attempts not in finished:
                    settled = asyncio.create_task(hub.caught_up(request_id))
                    settle_by = loop.time() + settings.stream_final_chunk_wait_s
    finally:
        for pending in (outcome_task, next_task, settled):
            if pending is not None:
                pending.cancel()


# -- following a request submitted earlier ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Followable:
    since_ms: int | None  # when it was queued, to read its chunks back from
    rejected: LLMError | None = None  # an event the worker rejected as invalid


async def _followable(ledger: RequestLedger, identity: Identity, request_id: str) -> _Followable:
    """What a follower may follow of ``request_id``; 404 as ``GET /v1/requests/{id}`` would."""
    try:
        stored = await ledger.get(request_id)
        if stored is None:
            rejection = await ledger.rejection(request_id) if identity.client_id is None else None
            rejected = rejection.outcome() if rejection is not None else None
            if isinstance(rejected, LLMError):
                return _Followable(None, rejected)
        elif identity.may_see(stored):
            since_ms = await ledger.queued_at_ms(request_id)
            outcome = stored.outcome()
            if since_ms is None and isinstance(outcome, LLMResponse):
                since_ms = outcome.created_at_ms
            elif since_ms is None and isinstance(outcome, LLMError) and outcome.request:
                since_ms = outcome.request.created_at_ms
            return _Followable(since_ms)
    except RedisError:
        raise unavailable("Redis") from None
    raise ApiError(404, "no request with this ID", param="request_id", code="not_found")


class ClosingStream(StreamingResponse):
    """A streamed answer that closes ``cleanup`` when it ends, however it ends: also when the
    client leaves before its body began (Starlette then never starts the body's generator)."""

    def __init__(
        self, content: AsyncIterator[bytes], cleanup: contextlib.AsyncExitStack, **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup.aclose()


async def _open(
    stack: contextlib.AsyncExitStack,
    request_id: str,
    followable: _Followable,
    hub: ChunkHub,
    listener: ResponseListener,
) -> tuple[Waiter, Subscription] | None:
    """Start waiting for the outcome and following the chunks (reading back what is needed),
    for as long as ``stack`` is open; None for a rejected request (nothing to follow)."""
    if followable.rejected is not None:
        return None
    waiter = await stack.enter_async_context(listener.waiter(request_id))
    subscription = await stack.enter_async_context(hub.subscribe(request_id, followable.since_ms))
    return waiter, subscription


async def _events(
    request_id: str,
    followable: _Followable,
    following: tuple[Waiter, Subscription] | None,
    identity: Identity,
    settings: IngressSettings,
    hub: ChunkHub,
) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
    """``(event name, data)`` per event; None for a keep-alive."""
    if following is None:
        assert followable.rejected is not None
        yield "error", _failure(followable.rejected, request_id, rejected=True)
        return
    waiter, subscription = following
    async for event in follow(subscription, waiter, hub, settings, client_id=identity.client_id):
        if isinstance(event, LLMResponseChunk):
            yield "chunk", orjson.loads(encode(event, WireFormat.JSON))
        elif isinstance(event, LLMResponse):
            yield "response", orjson.loads(encode(event, WireFormat.JSON))
        elif isinstance(event, LLMError):
            yield "error", _failure(event, request_id)
        elif isinstance(event, Interrupted):
            yield "error", event.body(request_id)
        else:
            yield None


def _failure(error: LLMError, request_id: str, *, rejected: bool = False) -> dict[str, Any]:
    # The client's view of a failure, as GET /v1/requests/{id} shows it: never the worker's
    # message (it names provider endpoints) nor the request it echoes.
    return {
        "request_id": request_id,
        **Failure.of(error, rejected=rejected).model_dump(mode="json"),
    }


routes = Routes(tags=["streaming"])

FollowedId = Annotated[str, Path(min_length=1, max_length=256)]


@routes.get(
    "/v1/requests/{request_id:path}/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: chunk..., then response or error",
        },
        404: {"description": "Unknown request ID"},
        **ERROR_RESPONSES,
    },
)
async def stream_request(
    request_id: FollowedId,
    identity: CallerDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    ledger: LedgerDep,
    hub: HubDep,
    listener: ListenerDep,
) -> StreamingResponse:
    """Follow a request as Server-Sent Events, from its first chunk to its outcome."""
    followable = await _followable(ledger, identity, request_id)
    stack = contextlib.AsyncExitStack()
    try:
        following = await _open(stack, request_id, followable, hub, listener)
    except BaseException:
        await stack.aclose()
        raise
    events = _events(request_id, followable, following, identity, settings, hub)
    return ClosingStream(
        _server_sent(events, metrics),
        stack,
        media_type="text/event-stream",
        headers={"x-request-id": request_id, "cache-control": "no-cache"},
    )


async def _server_sent(
    events: AsyncIterator[tuple[str, dict[str, Any]] | None], metrics: IngressMetrics
) -> AsyncIterator[bytes]:
    end = "disconnected"
    try:
        async for item in events:
            if item is None:
                yield b": keep-alive\n\n"
                continue
            name, data = item
            yield b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            if name != "chunk":
                end = name
    finally:
        metrics.streams.labels("sse", end).inc()


@routes.websocket("/v1/requests/{request_id:path}/ws")
async def follow_websocket(websocket: WebSocket, request_id: str) -> None:
    """Follow a request over a WebSocket: one JSON message per event, then the server closes.

    Authenticated from the handshake's headers like every ``/v1`` call; a refusal is answered
    in place of the handshake, with the same status and body as over HTTP.
    """
    async with contextlib.AsyncExitStack() as stack:
        try:
            identity = await authenticate(websocket)
            if not 1 <= len(request_id) <= 256:
                raise ApiError(404, "no request with this ID", param="request_id", code="not_found")
            settings = part(websocket, "settings", IngressSettings)
            metrics = part(websocket, "metrics", IngressMetrics)
            hub = part(websocket, "hub", ChunkHub)
            listener = part(websocket, "listener", ResponseListener)
            ledger = part(websocket, "ledger", RequestLedger)
            followable = await _followable(ledger, identity, request_id)
            # Followed before the handshake completes, as an SSE follower is before its 200.
            following = await _open(stack, request_id, followable, hub, listener)
        except ApiError as refusal:
            await _refuse(websocket, refusal)
            return
        await websocket.accept()
        events = _events(request_id, followable, following, identity, settings, hub)
        end = await _send_over(websocket, events)
        metrics.streams.labels("websocket", end).inc()


async def _send_over(
    websocket: WebSocket, events: AsyncIterator[tuple[str, dict[str, Any]] | None]
) -> str:
    """Send every event, then close; returns how the stream ended."""
    end = "disconnected"

    async def send_all() -> None:
        nonlocal end
        async for item in events:
            if item is None:
                continue  # the server's WebSocket pings keep the connection open
            name, data = item
            await websocket.send_text(orjson.dumps({"event": name, "data": data}).decode())
            if name != "chunk":
                end = name

    sender = asyncio.create_task(send_all())
    receiver = asyncio.create_task(_until_disconnected(websocket))
    try:
        await asyncio.wait({sender, receiver}, return_when="FIRST_COMPLETED")
    finally:
        receiver.cancel()
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await sender
    if websocket.client_state == WebSocketState.CONNECTED and end != "disconnected":
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await websocket.close()
    return end


async def _until_disconnected(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _refuse(websocket: WebSocket, refusal: ApiError) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(refusal.response())
    else:
        await websocket.close(code=1008, reason=refusal.message[:120])
