"""Whether this worker may claim requests: Redis reachable, and still holding its records.

:class:`RedisGuard` is asked every ``LLMSTREAM_REDIS_CHECK_INTERVAL_S`` (one GET of the deployment
epoch, :mod:`llmstream.core.record.epoch`) and answers None (claims may go on) or why not:

- unreachable: the GET failed or took longer than ``LLMSTREAM_REDIS_CHECK_TIMEOUT_S``;
- lost state: Redis answers but holds no epoch, while this worker saw one before or the consumer
  group has committed offsets, so records of completed requests may be gone, and claiming could
  call them again. This lasts
  until an operator runs ``llmstream recover-redis --accept-loss`` (which writes a new epoch).

An absent epoch with a group that has committed nothing is a first start: the guard writes it.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.connections import kafka_client_options
from llmstream.core.record import AnyRedis, DeploymentEpoch
from llmstream.core.settings import redact_url
from llmstream.processors.settings import WorkerSettings

log = logging.getLogger(__name__)

RECOVERY = "llmstream recover-redis --accept-loss"


async def group_has_commits(settings: WorkerSettings) -> bool:
    """Whether the worker's consumer group committed an offset on any partition of the
    requests topic (without joining the group)."""
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(settings.requests_topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(settings.requests_topic) or set()
        for partition in sorted(partitions):
            if await consumer.committed(TopicPartition(settings.requests_topic, partition)):
                return True
        return False
    finally:
        await consumer.stop()


class RedisGuard:
    """Tells, each time it is asked, whether claims may go on (see the module docstring)."""

    def __init__(self, redis: AnyRedis, settings: WorkerSettings) -> None:
        self.epoch = DeploymentEpoch(redis, key_prefix=settings.redis_key_prefix)
        self._settings = settings
        self._known: str | None = None  # the epoch this worker last saw
        self._lost = False

    async def check(self) -> str | None:
        """None when claims may go on, else why not (for /ready and the log)."""
        s = self._settings
        try:
            async with asyncio.timeout(s.redis_check_timeout_s):
                current = await self.epoch.read()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            return f"unreachable: claims are paused (fail closed): {type(exc).__name__}"
        if current is None:
            # Gone after this worker saw it: lost, whatever the group committed since. Once
            # found lost it stays lost until the epoch is back (the recovery writes it): the
            # group's offsets are not read again on every check.
            if self._known is None and not self._lost:
                try:
                    async with asyncio.timeout(s.redis_check_timeout_s * 5):
                        current = await self._absent()
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning(
                        "Redis holds no deployment epoch; cannot tell a first start: %s", exc
                    )
                    return f"no deployment epoch, and Kafka cannot tell a first start: {exc!r}"
            if current is None:
                self._report_lost()
                return f"lost its state: claims are paused until an operator runs `{RECOVERY}`"
        elif self._known is not None and current != self._known:
            log.warning(
                "the deployment epoch in Redis changed (%s -> %s): an operator accepted lost "
                "Redis state, or another worker started afresh; claiming resumes",
                self._known,
                current,
            )
        if self._lost:
            log.warning("Redis has a deployment epoch again (%s): claiming resumes", current)
            self._lost = False
        self._known = current
        return None

    async def _absent(self) -> str | None:
        """The epoch after finding none: created on a first start, else None (lost state).
        Raises KafkaError or OSError when the group's offsets cannot be read."""
        s = self._settings
        if not await group_has_commits(s):
            try:
                created = await self.epoch.create()
            except (RedisError, RedisClusterException, OSError):
                return None
            log.info(
                "Redis at %s holds no deployment epoch and consumer group %s has committed "
                "nothing: a first start; epoch %s",
                redact_url(s.redis_url),
                s.consumer_group,
                created,
            )
            return created
        return None

    def _report_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        s = self._settings
        # The one line an operator must see: what happened, what it risks, what to do.
        log.error(
            "Redis at %s lost its state (no deployment epoch under %r, which this worker saw "
            "before or the group's committed offsets imply: restarted without persistence, "
            "failed over, flushed or evicted): claims are paused so no completed request is "
            "called again. To accept that requests whose records were lost are called again if "
            "their events are read again, run `%s` (docs/operations.md)",
            redact_url(s.redis_url),
            self.epoch.key,
            RECOVERY,
        )
