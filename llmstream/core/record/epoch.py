"""The deployment epoch: proof that Redis still holds the request records it was given.

Dedup is only as good as the records: a Redis that restarted without persistence, a fail-over
that lost writes, or a ``FLUSHALL`` forgets which requests were completed, and a completed
request read again would be called again. One key, ``{prefix}epoch``, is written once, when the
first worker starts against an empty Redis *and* a consumer group that has committed nothing (a
first start), and by the operator's recovery (``llmstream recover-redis --accept-loss``); never by
the ingress or replay, which write records too. Every worker reads it every
``LLMSTREAM_REDIS_CHECK_INTERVAL_S``: when it is gone while the group has committed offsets,
Redis lost its state, and workers claim nothing until an operator decides.

The key has no TTL: Redis must not evict it (``maxmemory-policy`` ``noeviction`` or a
``volatile-*`` policy; with ``allkeys-*`` an eviction looks like lost state).
"""

from __future__ import annotations

import uuid

from llmstream.core.clock import wall_clock_ms
from llmstream.core.record.keys import AnyRedis, RecordKeys


class DeploymentEpoch:
    """The epoch key under one key prefix, on a single Redis or on Redis Cluster."""

    def __init__(self, redis: AnyRedis, *, key_prefix: str) -> None:
        self.redis = redis
        self.key = RecordKeys(key_prefix).epoch()

    async def read(self) -> str | None:
        """The current epoch, or None when Redis holds none."""
        raw = await self.redis.get(self.key)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def create(self) -> str:
        """Write a new epoch unless one exists (several workers may race here); the epoch that
        Redis holds afterwards."""
        fresh = f"{wall_clock_ms()}-{uuid.uuid4().hex[:12]}"
        await self.redis.set(self.key, fresh, nx=True)
        current = await self.read()
        return current if current is not None else fresh
