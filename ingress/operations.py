"""Operations endpoints: ``/health`` (alive), ``/ready`` (can serve) and ``/metrics``."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisClusterException, RedisError

from llmstream.core.record import AnyRedis
from llmstream.ingress.errors import ApiError
from llmstream.ingress.parts import MetricsDep, Routes, SettingsDep, part, redis_part
from llmstream.ingress.results import ResponseListener
from llmstream.ingress.settings import IngressSettings

routes = Routes(tags=["operations"])


@routes.get("/health")
async def health() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "alive"}


@routes.get("/ready", responses={503: {"description": "A check failed; `checks` says which"}})
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    """Ready: Kafka and Redis answer, the topics exist and the response listener runs."""
    try:
        redis = redis_part(request)
        producer = part(request, "producer", AIOKafkaProducer)
        listener = part(request, "listener", ResponseListener)
    except ApiError:
        checks = {"ingress": "starting or stopping"}
    else:
        redis_state, kafka_state = await asyncio.gather(
            _redis_check(redis, settings), _kafka_check(producer, settings)
        )
        checks = {
            "redis": redis_state,
            "kafka": kafka_state,
            "listener": "ok" if listener.running else "stopped",
        }
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status_code=200 if ok else 503,
    )


@routes.get("/metrics", response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _redis_check(redis: AnyRedis, settings: IngressSettings) -> str:
    try:
        await asyncio.wait_for(redis.ping(), settings.ready_timeout_s)
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"
    return "ok"


async def _kafka_check(producer: AIOKafkaProducer, settings: IngressSettings) -> str:
    try:
        cluster = await asyncio.wait_for(
            producer.client.fetch_all_metadata(), settings.ready_timeout_s
        )
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"
    topics = (settings.requests_topic, settings.responses_topic, settings.errors_topic)
    missing = [t for t in topics if t not in cluster.topics()]
    return f"missing topics: {', '.join(missing)}" if missing else "ok"
