"""Claims, leases and stored outcomes, against a real Redis."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from llmstream.processors.dedup import ClaimStatus, ClaimUnavailable, DedupStore
from tests.conftest import Services


def _store(client: aioredis.Redis, prefix: str, token: str, lease_ms: int = 1000) -> DedupStore:
    return DedupStore(
        client, key_prefix=prefix, worker_token=token, lease_ms=lease_ms, result_ttl_s=600
    )


@pytest.fixture
async def pair(redis_client: aioredis.Redis, unique: str) -> tuple[DedupStore, DedupStore]:
    a = _store(redis_client, f"t-{unique}:", "worker-a")
    b = _store(redis_client, f"t-{unique}:", "worker-b")
    await a.heartbeat()
    await b.heartbeat()
    return a, b


async def test_only_one_worker_wins_a_claim(pair: tuple[DedupStore, DedupStore]) -> None:
    a, b = pair
    results = await asyncio.gather(*(s.claim("r1", 0) for s in (a, b, a, b)))
    assert [r.status for r in results].count(ClaimStatus.CLAIMED) == 1
    assert all(r.status in (ClaimStatus.CLAIMED, ClaimStatus.BUSY) for r in results)


async def test_a_live_owner_keeps_its_claim_however_long(
    pair: tuple[DedupStore, DedupStore],
) -> None:
    a, b = pair
    assert (await a.claim("r1", 0)).status is ClaimStatus.CLAIMED
    for _ in range(3):  # three lease lengths, renewed as a running worker does
        await asyncio.sleep(0.4)
        await a.heartbeat()
        await b.heartbeat()
        assert (await b.claim("r1", 0)).status is ClaimStatus.BUSY


async def test_a_dead_owners_claim_is_taken_over_once_its_lease_lapses(
    pair: tuple[DedupStore, DedupStore],
) -> None:
    a, b = pair
    assert (await a.claim("r1", 0)).status is ClaimStatus.CLAIMED
    await asyncio.sleep(1.1)  # a stops renewing: it crashed
    await b.heartbeat()
    claim = await b.claim("r1", 0)
    assert claim.status is ClaimStatus.CLAIMED and claim.takeover
    # The crashed owner cannot store an outcome any more (fenced).
    assert not await a.settle("r1", failed=False, payload=b"{}", now_ms=0)
    assert await b.settle("r1", failed=False, payload=b'{"x": 1}', now_ms=0)


async def test_emitted_outcomes_make_later_copies_duplicates(
    redis_client: aioredis.Redis, pair: tuple[DedupStore, DedupStore]
) -> None:
    a, b = pair
    await a.claim("r1", 0)
    await a.settle("r1", failed=True, payload=b'{"error_type": "invalid_request"}', now_ms=0)
    await a.mark_emitted(["r1"])
    claim = await b.claim("r1", 0)
    assert (claim.status, claim.state) == (ClaimStatus.DONE, "failed")
    assert await redis_client.hget(b.key("r1"), "state") == b"failed"


async def test_a_stored_outcome_reads_back_byte_for_byte(
    redis_client: aioredis.Redis, pair: tuple[DedupStore, DedupStore]
) -> None:
    # The script gets its calls as one JSON argument: a payload with quotes, escapes, control
    # characters as JSON writes them and text beyond ASCII must come back as it went in, and a
    # millisecond time as the integer it is.
    a, _ = pair
    raw = orjson.dumps({"content": 'café ✓ " \\ \n \x00 \u2028 🤖', "x": None})
    now_ms = 1_765_000_000_123
    await a.claim("r1", now_ms)
    assert await a.settle("r1", failed=False, payload=raw, now_ms=now_ms)
    stored = await a.outcome("r1")
    assert stored is not None and stored.payload == raw
    assert await redis_client.hget(a.key("r1"), "settled_at_ms") == str(now_ms).encode()
    assert await redis_client.hget(a.key("r1"), "claimed_at_ms") == str(now_ms).encode()


async def test_a_worker_whose_own_lease_lapsed_claims_nothing(
    redis_client: aioredis.Redis, unique: str
) -> None:
    store = _store(redis_client, f"t-{unique}:", "worker-x")
    with pytest.raises(ClaimUnavailable):
        await store.claim("r1", 0)  # no heartbeat yet


async def test_unreachable_redis_fails_closed(unique: str) -> None:
    from llmstream.devtools.embedded import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    store = _store(client, f"t-{unique}:", "worker-x")
    try:
        with pytest.raises(ClaimUnavailable):
            await store.heartbeat()
        with pytest.raises(ClaimUnavailable):
            await store.claim("r1", 0)
    finally:
        await client.aclose()


async def test_results_expire_after_their_ttl(redis_client: aioredis.Redis, unique: str) -> None:
    store = _store(redis_client, f"t-{unique}:", "worker-a")
    await store.heartbeat()
    await store.claim("r1", 0)
    await store.settle("r1", failed=False, payload=b"{}", now_ms=0)
    ttl = await redis_client.ttl(store.key("r1"))
    assert 0 < ttl <= 600


def test_services_fixture_is_real(services: Services) -> None:
    assert services.redis_url.startswith("redis://")
