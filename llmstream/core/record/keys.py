"""Where a request's record lives in Redis, what it holds, and which keys share a hash slot.

Every key of one request carries the request ID as its Redis Cluster hash tag, so the record and
the rejection of one request ID live in one slot::

    {prefix}req:{<request id>}        the record (a hash, fields below)
    {prefix}rejected:{<request id>}   why the worker rejected an event with this ID (a hash)
    {prefix}worker:{<token>}          a worker process's heartbeat (a string with a TTL)
    {prefix}epoch                     the deployment epoch (a string, no TTL; see :mod:`.epoch`)
    {prefix}batch:{<submission id>}   one submission to a provider's batch API (a hash, fields
                                      :class:`BatchField`; see :mod:`.batches`)
    {prefix}batches                   the submission IDs not yet finished (a set)

Redis hashes only what is between the first ``{`` and the next ``}``: a key prefix holding braces
would become the tag of every key (one slot for everything, still correct, just not spread out).
An ID holding ``}`` is cut at it by Redis, and by :func:`slot` the same way, so keys and the
grouping of scripts always agree.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

# Either client: a single Redis, or Redis Cluster (where every script's keys must share a slot).
AnyRedis = Redis | RedisCluster


class State(enum.StrEnum):
    """The ``state`` field of a record."""

    QUEUED = "queued"  # recorded by the ingress (or reset by replay); no worker has it yet
    CLAIMED = "claimed"  # a worker owns it and may call the provider
    COMPLETED = "completed"  # the response is stored (``response``)
    FAILED = "failed"  # the error is stored (``error``)
    # The batch tier (:mod:`.batches`): a worker is submitting it in a batch (``submission``),
    # then the provider accepted that batch, and the batch's poller answers it.
    SUBMITTING = "submitting"
    BATCHED = "batched"


class Field(enum.StrEnum):
    """The fields of a record (and of a rejection: ``error`` and ``field``)."""

    STATE = "state"
    OWNER = "owner"  # token of the worker holding the claim
    EPOCH = "epoch"  # fencing epoch, +1 at every claim and takeover
    EMITTED = "emitted"  # "1" once the stored outcome is on the broker
    CALLS = "calls"  # provider calls begun for this ID, by every worker that held it
    RESPONSE = "response"  # LLMResponse JSON (completed)
    ERROR = "error"  # LLMError JSON (failed)
    CLIENT = "client"  # who submitted it through the ingress
    DIGEST = "digest"  # of the request's content, as the ingress published it
    QUEUED_AT_MS = "queued_at_ms"
    QUEUED_BY = "queued_by"  # the ingress reservation (or replay) token
    CLAIMED_AT_MS = "claimed_at_ms"
    SETTLED_AT_MS = "settled_at_ms"
    TAKEOVERS = "takeovers"
    REPLAYS = "replays"
    INVALID_FIELD = "field"  # of a rejection: the first invalid field
    SUBMISSION = "submission"  # the batch submission it is (or was last) part of
    BATCH = "batch"  # the provider's ID of that batch, once it accepted it
    REQUEST = "request"  # LLMRequest JSON, kept while a batch holds the request
    SOURCE = "source"  # "topic:partition:offset" of the event it came in, while batched


class BatchState(enum.StrEnum):
    """The ``state`` field of a batch submission."""

    INTENT = "intent"  # its requests are marked; the provider may or may not have it yet
    CREATED = "created"  # the provider accepted it (``batch``): polled until it ends
    ABANDONED = "abandoned"  # never to be created: its requests go on without it


class BatchField(enum.StrEnum):
    """The fields of a batch submission."""

    STATE = "state"
    OWNER = "owner"  # the worker submitting it, then polling it (a lease, like a claim's)
    EPOCH = "epoch"  # +1 at every takeover
    PROVIDER = "provider"
    MODEL = "model"
    BATCH = "batch"  # the provider's batch ID
    REQUESTS = "requests"  # JSON [[request ID, custom_id], ...] in the order of the batch
    CREATED_AT_MS = "created_at_ms"
    SUBMITTED_AT_MS = "submitted_at_ms"


class RecordKeys:
    """The key names under one key prefix (``LLMSTREAM_REDIS_KEY_PREFIX``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def record(self, request_id: str) -> str:
        return f"{self.prefix}req:{{{request_id}}}"

    def rejected(self, request_id: str) -> str:
        return f"{self.prefix}rejected:{{{request_id}}}"

    def steps(self, request_id: str) -> str:
        """The tool loop's journal of a request (processors.tool_loop), in its record's slot."""
        return f"{self.prefix}steps:{{{request_id}}}"

    def heartbeat(self, token: str) -> str:
        return f"{self.prefix}worker:{{{token}}}"

    def batch(self, submission: str) -> str:
        return f"{self.prefix}batch:{{{submission}}}"

    def batches(self) -> str:
        # Read and written with plain commands only: on Redis Cluster it may live in any slot.
        return f"{self.prefix}batches"

    def epoch(self) -> str:
        # Read and written with plain GET/SET only, never inside a script: on Redis Cluster it
        # may live in any slot.
        return f"{self.prefix}epoch"


def slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (hash tags included)."""
    return int(key_slot(key.encode()))


def by_slot(redis: AnyRedis, keys: Sequence[str]) -> list[list[int]]:
    """Indexes of ``keys`` grouped so that one script run touches one slot.

    On a single Redis every key may go into one script run: one group.
    """
    if not isinstance(redis, RedisCluster):
        return [list(range(len(keys)))] if keys else []
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(slot(key), []).append(index)
    return list(groups.values())
