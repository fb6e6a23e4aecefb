"""``POST /v1/chat/completions`` with ``"stream": true``: OpenAI's ``chat.completion.chunk`` SSE.

The request is published with ``stream=true``; the answer is relayed from the chunk topic as it is
read (:func:`~llmstream.ingress.streaming.follow`)::

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", ...}}]}
    data: {... "choices": [{"delta": {"content": "Hel"}}]}          one per chunk with text
    data: {... "choices": [{"delta": {"tool_calls": [{"index": 0, "id": ...}]}}]}  one per call
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}             with stream_options.include_usage
    data: [DONE]

The chunk topic carries text only: the tools a model called come with the final response, and
are sent then, one delta per call in OpenAI's ``delta.tool_calls`` shape (``index``, ``id``,
``type``, the function's name and whole arguments), before the finish chunk, so the openai SDK's
``chat.completions.stream()`` assembles them. When the request offers tools, the first delta
carries no content (``null``), as OpenAI's does for an answer that may be calls only.

A client cannot take back text it was sent. When a stream broke half-way and the worker retried
(a new ``attempt``), the new attempt's text is skipped while it repeats what was sent, and relayed
from where the client is. If it differs, the stream ends with an error chunk
(``data: {"error": {...}}``, which the openai SDK raises as ``APIError``) saying where the whole
answer can be read. The final response decides: what the chunks did not bring (the last chunk
not read in time, a provider that did not stream) is sent from its content. A failure
(``llm-errors``) ends the stream with an error chunk; so does a stream that cannot go on. A client
that disconnects loses nothing: the request goes on and can be read at ``GET /v1/requests/{id}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from llmstream.ingress.auth import Identity
from llmstream.ingress.chunks import ChunkHub
from llmstream.ingress.errors import ApiError
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.publish import Event as PublishedEvent
from llmstream.ingress.publish import Publisher
from llmstream.ingress.results import RequestLedger, ResponseListener
from llmstream.ingress.settings import IngressSettings
from llmstream.ingress.streaming import ClosingStream, Interrupted, follow
from llmstream.schemas.models import LLMError, LLMResponse, LLMResponseChunk, ToolCall

__all__ = ["Relay", "stream_chat"]


class Diverged(Exception):
    """A new attempt's text differs from the text the client was sent."""


@dataclass(slots=True)
class Relay:
    """What of each chunk the client has not been sent: each piece of text at most once."""

    sent: str = ""
    attempt: int | None = None
    text: str = ""  # of the current attempt, as far as read
    next_index: int = 0
    gap: bool = False  # a chunk of the current attempt was missed: wait for the response

    def chunk(self, chunk: LLMResponseChunk) -> str:
        """The new text this chunk brings the client ("" for none); raises :class:`Diverged`."""
        if self.attempt is None or chunk.attempt > self.attempt:
            self.attempt, self.text, self.next_index, self.gap = chunk.attempt, "", 0, False
        elif chunk.attempt < self.attempt or chunk.index < self.next_index:
            return ""  # a broken attempt's, or one read twice
        if chunk.index > self.next_index:
            self.gap = True
        if self.gap:
            return ""
        self.next_index += 1
        self.text += chunk.delta
        return self._advance(self.text)

    def response(self, response: LLMResponse) -> str:
        """What of the final answer the client still needs; raises :class:`Diverged`."""
        return self._advance(response.content, final=True)

    def _advance(self, text: str, *, final: bool = False) -> str:
        sent = len(self.sent)
        if len(text) <= sent and not final:
            if not self.sent.startswith(text):
                raise Diverged
            return ""
        if not text.startswith(self.sent):
            raise Diverged
        new = text[sent:]
        self.sent = text
        return new


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """The ``delta.tool_calls`` entries for a response's calls, each whole, by ``index``."""
    return [{"index": index, **call.model_dump(mode="json")} for index, call in enumerate(calls)]


async def stream_chat(
    event: PublishedEvent,
    *,
    model: str,
    created: int,
    include_usage: bool,
    tools_offered: bool = False,
    identity: Identity,
    settings: IngressSettings,
    metrics: IngressMetrics,
    publisher: Publisher,
    listener: ResponseListener,
    hub: ChunkHub,
    ledger: RequestLedger,
    finish_reason: Callable[[LLMResponse], str],
    failure: Callable[[LLMError], ApiError],
) -> ClosingStream:
    """Publish the request and answer its chunks as OpenAI's SSE (see the module's doc)."""
    request_id = event.request_id
    headers = {"x-request-id": request_id, "x-should-retry": "false", "cache-control": "no-cache"}
    stack = contextlib.AsyncExitStack()
    try:
        # Following before publishing: every chunk is read while subscribed, none read back.
        waiter = await stack.enter_async_context(listener.waiter(request_id))
        early = contextlib.AsyncExitStack()
        stack.push_async_callback(early.aclose)
        subscription = await early.enter_async_context(hub.subscribe(request_id))
        receipt = await publisher.submit_chat(event, identity.client_id)
        if not receipt.published:
            # A request ID known already (the Idempotency-Key again): its chunks may be older
            # than the subscription, so follow it as a late follower does.
            await early.aclose()
            since_ms = await ledger.queued_at_ms(request_id)
            subscription = await stack.enter_async_context(hub.subscribe(request_id, since_ms))
    except BaseException:
        await stack.aclose()
        raise

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse(
            {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
        )

    def delta(content: str | None = None, finish: str | None = None, **more: Any) -> bytes:
        body = {"content": content, **more} if content is not None else dict(more)
        return chunk([{"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}])

    async def answer() -> AsyncIterator[bytes]:
        end = "disconnected"
        relay = Relay()
        try:
            opening = {"role": "assistant", "content": None if tools_offered else ""}
            yield chunk([{"index": 0, "delta": opening, "logprobs": None, "finish_reason": None}])
            events = follow(subscription, waiter, hub, settings, client_id=identity.client_id)
            async for item in events:
                if isinstance(item, LLMResponseChunk):
                    text = relay.chunk(item)
                    if text:
                        yield delta(text)
                elif isinstance(item, LLMResponse):
                    text = relay.response(item)
                    if text:
                        yield delta(text)
                    for call in tool_call_deltas(item.tool_calls or []):
                        yield delta(tool_calls=[call])
                    yield delta(finish=finish_reason(item))
                    if include_usage:
                        usage = {
                            "prompt_tokens": item.prompt_tokens,
                            "completion_tokens": item.completion_tokens,
                            "total_tokens": item.total_tokens,
                        }
                        yield chunk([], usage=usage)
                    yield b"data: [DONE]\n\n"
                    end = "response"
                    return
                elif isinstance(item, LLMError):
                    end = "error"
                    yield _sse(failure(item).body())
                    return
                elif isinstance(item, Interrupted):
                    end = item.code
                    yield _sse(item.body(request_id))
                    return
                else:
                    yield b": keep-alive\n\n"
        except Diverged:
            end = "diverged"
            yield _sse(
                ApiError(
                    502,
                    "the answer's stream broke and was retried, and the new answer differs "
                    "from the text already sent; read the whole answer at "
                    f"GET /v1/requests/{request_id}",
                    code="stream_diverged",
                    extra={"request_id": request_id},
                ).body()
            )
        finally:
            metrics.streams.labels("chat", end).inc()

    return ClosingStream(answer(), stack, media_type="text/event-stream", headers=headers)
