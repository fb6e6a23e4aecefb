"""An exact response cache in Redis: the same model, messages and generation parameters, the
same answer, without a provider call.

The key is the SHA-256 of a canonical JSON (sorted keys, no whitespace) of the client
(``client_id``), the provider, the bare model, the messages (role, content, name, and
``tool_calls`` and ``tool_call_id`` when set) and ``temperature``, ``top_p``, ``max_tokens``,
``stop``, and, when set, ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``
and ``server_tools``: anything that changes what a model would answer is in it, and nothing else
(request ID, metadata, deadline, streaming, service tier are not: a model answers alike at
every tier, so a flex request may be served what a standard one stored). Fields added with
function calling are left out while unset, so a request without them keeps the key it had
before. An entry is ``{prefix}cache:{hex}`` holding the answer, its tool calls and its usage as
JSON, for ``ttl_s``.

A request with a ``session_id`` is never cached, neither served nor stored: its answer follows
the session's history, which lives in the session store and changes with every turn, so the same
request means a different question each time it is asked.

Each client has its own entries. A cache shared across clients would let client B learn, from
``cached: true`` on its response, that someone else asked the same thing (and what they got):
scoping by client costs a provider call per client, and tells nobody anything.

The cache is an optimisation: a Redis failure reads as a miss and skips the store, it never fails
a request.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError

from llmstream.core.record import AnyRedis
from llmstream.processors.providers import Completion
from llmstream.schemas.models import ChatMessage, LLMRequest, ToolCall

__all__ = ["ResponseCache", "cache_key_material"]

log = logging.getLogger(__name__)

CacheOutcome = Literal["hit", "miss", "store", "error"]


def cache_key_material(request: LLMRequest, provider: str, model: str) -> bytes:
    """The canonical bytes a cache key is the hash of."""
    document: dict[str, Any] = {
        "client": request.client_id,
        "provider": provider,
        "model": model,
        "messages": [_message(m) for m in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
    }
    asked = request.model_dump(
        mode="json",
        by_alias=True,
        include={"tools", "tool_choice", "parallel_tool_calls", "response_format", "server_tools"},
    )
    document.update((name, value) for name, value in asked.items() if value not in (None, []))
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def _message(m: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": m.role, "content": m.content, "name": m.name}
    if m.tool_calls is not None:
        item["tool_calls"] = [call.model_dump(mode="json") for call in m.tool_calls]
    if m.tool_call_id is not None:
        item["tool_call_id"] = m.tool_call_id
    return item


class ResponseCache:
    """Cached answers keyed by what was asked; see the module docstring."""

    def __init__(self, redis: AnyRedis, *, key_prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}cache:"
        self._ttl_s = ttl_s

    def key(self, request: LLMRequest, provider: str, model: str) -> str | None:
        """Where the answer to ``request`` is cached; None for a request that never is (one of
        a session)."""
        if request.session_id is not None:
            return None
        digest = hashlib.sha256(cache_key_material(request, provider, model)).hexdigest()
        return f"{self._prefix}{digest}"

    async def get(self, key: str) -> tuple[Completion | None, CacheOutcome]:
        """The cached answer, or None on a miss (or when Redis cannot be read)."""
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            log.warning("response cache unreadable (%s); calling the provider", exc)
            return None, "error"
        if raw is None:
            return None, "miss"
        try:
            body = orjson.loads(raw)
            calls = tuple(ToolCall.model_validate(call) for call in body.pop("tool_calls", ()))
            return Completion(**body, tool_calls=calls), "hit"
        except (orjson.JSONDecodeError, TypeError, AttributeError, ValidationError) as exc:
            log.warning("response cache entry %s unusable (%s); calling the provider", key, exc)
            return None, "error"

    async def put(self, key: str, completion: Completion) -> CacheOutcome:
        """Store an answer for ``ttl_s``."""
        body = {
            "content": completion.content,
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.total_tokens,
            "provider": completion.provider,
            "model": completion.model,
            "tool_calls": [call.model_dump(mode="json") for call in completion.tool_calls],
        }
        try:
            await self._redis.set(key, orjson.dumps(body), ex=self._ttl_s)
        except RedisError as exc:
            log.warning("response cache not written (%s)", exc)
            return "error"
        return "store"
