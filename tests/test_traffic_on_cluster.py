"""Traffic control on a single Redis and on a three-node Redis Cluster: rate limits of two
providers, a model and a client, a 429's adaptation, a circuit opening and its fallback, and the
sync of circuits and factors, across two providers and three models. Every traffic-control key
shares one hash slot, so no script meets CROSSSLOT; the behaviour is the same on both."""

from __future__ import annotations

import uuid

from llmstream.core.record import AnyRedis, slot
from llmstream.devtools.simulator import SimulatorServer
from tests.conftest import Services
from tests.inprocess import rig, sim, worker_settings
from tests.redis_cluster import any_redis, redis_cluster
from tests.samples import request

__all__ = ["any_redis", "redis_cluster", "sim"]  # fixtures; the test runs on both Redis kinds

FALLBACK = "anthropic/claude-3-5-haiku-latest"


def new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


async def test_limits_adaptation_and_circuits_across_providers_and_models(
    services: Services, sim: SimulatorServer, any_redis: AnyRedis
) -> None:
    # Generous limits: every bucket is used (and corrected after the call), none makes a wait.
    settings = worker_settings(
        services.redis_url,
        rate_limits={
            "openai": {"rpm": 60_000, "rpm_burst": 100, "tpm": 10_000_000},
            "anthropic": {"rpm": 60_000, "rpm_burst": 100},
            "openai/gpt-4o-mini": {"rpm": 60_000, "rpm_burst": 100, "tpm": 10_000_000},
        },
        client_quotas={"alice": {"rpm": 60_000, "rpm_burst": 100}},
        circuit_min_failures=2,
        circuit_cooldown_s=60,
        max_attempts=5,
    )
    async with rig(sim, settings, redis=any_redis) as r:
        limited, other_model, opened, routed, other_provider = (new_id() for _ in range(5))
        # A 429 pauses openai and lowers its factor; the retry then answers.
        await r.script(limited, {"status": 429, "retry_after": 0.05}, {"status": 200})
        await r.process(request(limited, client_id="alice"))
        await r.process(request(other_model, model="openai/gpt-4o", client_id="alice"))
        # Two outages of openai/gpt-4o-mini open its circuit: the third call goes to anthropic.
        await r.script(opened, {"status": 503}, {"status": 503})
        await r.process(request(opened, client_id="alice", fallbacks=[FALLBACK]))
        await r.process(request(routed, client_id="alice", fallbacks=[FALLBACK]))
        await r.process(request(other_provider, model=FALLBACK, client_id="alice"))
        await r.traffic.sync()  # every circuit and factor read (and flushed) in one script each

        assert r.errors() == []
        by_id = {resp.request_id: resp for resp in r.responses()}
        assert set(by_id) == {limited, other_model, opened, routed, other_provider}
        assert (by_id[limited].provider, by_id[limited].attempts) == ("openai", 2)
        assert by_id[other_model].model == "gpt-4o"
        assert [(c["api"], c["status"]) for c in await r.calls(opened)] == [
            ("openai", 503),
            ("openai", 503),
            ("anthropic", 200),
        ]
        # Open: the failing model is not called at all, the other openai model still is.
        assert [c["api"] for c in await r.calls(routed)] == ["anthropic"]
        assert by_id[other_provider].provider == "anthropic"
        assert (
            r.sample("llmstream_rate_limited_total", provider="openai", scope="upstream_429") == 1
        )
        assert r.traffic.adaptive.factors.get("openai", 1.0) < 1.0
        assert (
            r.sample(
                "llmstream_circuit_transitions_total",
                provider="openai",
                model="gpt-4o-mini",
                transition="opened",
            )
            == 1
        )

        # What made the above work on Redis Cluster: one slot for all traffic state.
        prefix = settings.redis_key_prefix
        keys = [
            k.decode() if isinstance(k, bytes) else k
            async for k in any_redis.scan_iter(match=f"{prefix}{{traffic}}*")
        ]
        kinds = {k.removeprefix(f"{prefix}{{traffic}}").split(":")[0] for k in keys}
        assert {"rl", "ad", "cb"} <= kinds, keys
        assert len({slot(k) for k in keys}) == 1
