"""An exact response cache in Redis: the same model, messages and generation parameters, the
same answer, without a provider call.

The key is the SHA-256 of a canonical JSON (sorted keys, no whitespace) of the client
(``client_id``), the provider, the bare model, the messages (role, content, name) and
``temperature``, ``top_p``, ``max_tokens`` and ``stop``: anything that changes what a model would
answer is in it, and nothing else (request ID, metadata, deadline are not). An entry is
``{prefix}cache:{hex}`` holding the answer and its usage as JSON, for ``ttl_s``.

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
from redis.exceptions import RedisError

from llmstream.core.record import AnyRedis
from llmstream.processors.providers import Completion
from llmstream.schemas.models import LLMRequest

__all__ = ["ResponseCache", "cache_key_material"]

log = logging.getLogger(__name__)

CacheOutcome = Literal["hit", "miss", "store", "error"]


def cache_key_material(request: LLMRequest, provider: str, model: str) -> bytes:
    """The canonical bytes a cache key is the hash of."""
    document: dict[str, Any] = {
        "client": request.client_id,
        "provider": provider,
        "model": model,
        "messages": [
            {"role": m.role, "content": m.content, "name": m.name} for m in request.messages
        ],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
    }
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


class ResponseCache:
    """Cached answers keyed by what was asked; see the module docstring."""

    def __init__(self, redis: AnyRedis, *, key_prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = f"{key_prefix}cache:"
        self._ttl_s = ttl_s

    def key(self, request: LLMRequest, provider: str, model: str) -> str:
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
            return Completion(**body), "hit"
        except (orjson.JSONDecodeError, TypeError) as exc:
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
        }
        try:
            await self._redis.set(key, orjson.dumps(body), ex=self._ttl_s)
        except RedisError as exc:
            log.warning("response cache not written (%s)", exc)
            return "error"
        return "store"
