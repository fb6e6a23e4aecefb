"""The ingress on Redis Cluster (LLMSTREAM_REDIS_CLUSTER=true): ready, and serving requests."""

from __future__ import annotations

from llmstream.core.settings import ServiceSettings
from tests.harness import in_process_ingress
from tests.redis_cluster import RedisClusterNodes, redis_cluster
from tests.test_ingress import chat_body, ingress_settings

__all__ = ["redis_cluster"]  # the fixture


async def test_the_ingress_is_ready_and_records_requests_on_redis_cluster(
    settings: ServiceSettings, redis_cluster: RedisClusterNodes
) -> None:
    on_cluster = ingress_settings(settings, redis_url=redis_cluster.url, redis_cluster=True)
    async with in_process_ingress(on_cluster) as client:
        ready = await client.get("/ready")
        submitted = await client.post("/v1/requests", json=chat_body("hi", request_id="c-1"))
        status = await client.get("/v1/requests/c-1")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == "ok"
    assert submitted.status_code == 202
    assert status.json()["status"] == "pending"
