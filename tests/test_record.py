"""The request record's transitions, each against a single Redis and a three-node Redis Cluster."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import RedisCluster

from llmstream.core.record import (
    AnyRedis,
    ClaimUnavailable,
    RecordStore,
    Reservation,
    WorkerOp,
    slot,
)
from llmstream.processors.dedup import ClaimStatus, DedupStore, NotOwner
from tests.redis_cluster import any_redis, redis_cluster

__all__ = ["any_redis", "redis_cluster"]  # fixtures: each test runs on both Redis kinds

TTL_S = 600
LEASE_MS = 30_000  # long: leases lapse here because a test deletes a heartbeat, never by waiting


@pytest.fixture
def prefix(unique: str) -> str:
    return f"rec-{unique}:"


@pytest.fixture
def records(any_redis: AnyRedis, prefix: str) -> RecordStore:
    """The ingress's and replay's view of the records."""
    return RecordStore(any_redis, key_prefix=prefix, ttl_s=TTL_S)


async def _worker(redis: AnyRedis, prefix: str, token: str) -> DedupStore:
    store = DedupStore(
        redis, key_prefix=prefix, worker_token=token, lease_ms=LEASE_MS, result_ttl_s=TTL_S
    )
    await store.heartbeat()
    return store


async def _lapse(redis: AnyRedis, store: DedupStore) -> None:
    """The worker stalls past its lease: its heartbeat is gone, though it does not know yet."""
    await redis.delete(store.records.keys.heartbeat(store.worker_token))


@pytest.fixture
async def a(any_redis: AnyRedis, prefix: str) -> DedupStore:
    return await _worker(any_redis, prefix, "worker-a")


@pytest.fixture
async def b(any_redis: AnyRedis, prefix: str) -> DedupStore:
    return await _worker(any_redis, prefix, "worker-b")


async def test_one_requests_keys_share_a_slot_and_requests_spread(
    any_redis: AnyRedis, records: RecordStore
) -> None:
    keys = records.keys
    assert slot(keys.record("r1")) == slot(keys.rejected("r1"))
    slots = {slot(keys.record(f"r{i}")) for i in range(10)}
    assert len(slots) == 10
    if isinstance(any_redis, RedisCluster):
        owners = {any_redis.get_node_from_key(keys.record(f"r{i}")).port for i in range(10)}
        assert len(owners) == 3  # every node of the cluster holds some of them


async def test_queued_claimed_completed_emitted(
    records: RecordStore, a: DedupStore, b: DedupStore
) -> None:
    [reserved] = await records.reserve(
        [("r1", "d1")], client="alice", token="t1", now_ms=1, requeue_after_ms=60_000
    )
    assert reserved.publish
    assert (stored := await records.get("r1")) and (stored.state, stored.client) == (
        "queued",
        "alice",
    )

    assert (await a.claim("r1", 2)).status is ClaimStatus.CLAIMED
    assert (stored := await records.get("r1")) and stored.status == "pending"
    assert await a.still_owner("r1")
    assert (await b.claim("r1", 3)).status is ClaimStatus.BUSY  # a lives

    assert await a.settle("r1", failed=False, payload=b'{"answer": 42}', now_ms=4)
    stored = await records.get("r1")
    assert stored and (stored.status, stored.payload, stored.client) == (
        "completed",
        b'{"answer": 42}',
        "alice",
    )
    assert (await b.claim("r1", 5)).status is ClaimStatus.BUSY  # stored, not emitted, a lives
    await a.mark_emitted(["r1"])
    done = await b.claim("r1", 6)
    assert (done.status, done.state, done.payload) == (
        ClaimStatus.DONE,
        "completed",
        b'{"answer": 42}',
    )
    [again] = await records.reserve(
        [("r1", "d1")], client="alice", token="t2", now_ms=7, requeue_after_ms=0
    )
    assert not again.publish and again.existing and again.existing.status == "completed"


async def test_only_one_worker_wins_each_claim_across_slots(a: DedupStore, b: DedupStore) -> None:
    ids = [f"r{i}" for i in range(20)]
    claims = await asyncio.gather(*(s.claim(r, 0) for r in ids for s in (a, b)))
    for i in range(len(ids)):
        pair = {claims[2 * i].status, claims[2 * i + 1].status}
        assert pair == {ClaimStatus.CLAIMED, ClaimStatus.BUSY}
    mine = [r for i, r in enumerate(ids) if claims[2 * i].status is ClaimStatus.CLAIMED]
    await asyncio.gather(*(a.settle(r, failed=True, payload=b"{}", now_ms=1) for r in mine))
    await a.mark_emitted(mine)
    after = await asyncio.gather(*(b.claim(r, 2) for r in mine))
    assert {c.status for c in after} == ({ClaimStatus.DONE} if mine else set())


async def test_a_lapsed_owner_is_taken_over_and_fenced(
    any_redis: AnyRedis, a: DedupStore, b: DedupStore
) -> None:
    assert (await a.claim("r1", 0)).status is ClaimStatus.CLAIMED
    await _lapse(any_redis, a)

    claim = await b.claim("r1", 1)
    assert claim.status is ClaimStatus.CLAIMED and claim.takeover
    # a wakes up and renews, but the claim is b's now: a neither calls nor stores.
    await a.heartbeat()
    assert not await a.still_owner("r1")
    assert not await a.settle("r1", failed=False, payload=b'{"stale": 1}', now_ms=2)
    assert await b.still_owner("r1")
    assert await b.settle("r1", failed=False, payload=b'{"fresh": 1}', now_ms=3)
    assert (await a.claim("r1", 4)).status is ClaimStatus.BUSY  # b lives, not emitted yet


async def test_a_takeover_needs_the_owner_and_epoch_that_were_seen_dead(
    any_redis: AnyRedis, prefix: str, a: DedupStore
) -> None:
    records = RecordStore(any_redis, key_prefix=prefix, ttl_s=TTL_S)
    await a.claim("r1", 0)
    [(answer, owner)] = await records.run("worker-b", [WorkerOp("c", "r1", (1, "", "", ""))])
    assert (answer, owner) == ("busy:1", b"worker-a")
    seen_dead = WorkerOp("c", "r1", (1, "worker-a", "1", ""))
    # b and c both saw a's heartbeat gone: one takes over, the other finds the new owner.
    [(first, _)] = await records.run("worker-b", [seen_dead])
    [(second, owner)] = await records.run("worker-c", [seen_dead])
    assert first == "takeover:2"
    assert (second, owner) == ("busy:2", b"worker-b")


@pytest.mark.parametrize(
    ("failed", "state", "payload"),
    [(False, "completed", b'{"answer": 42}'), (True, "failed", b'{"error_type": "x"}')],
)
async def test_an_unemitted_outcome_is_recovered_without_a_call(
    any_redis: AnyRedis, a: DedupStore, b: DedupStore, failed: bool, state: str, payload: bytes
) -> None:
    await a.claim("r1", 0)
    assert await a.settle("r1", failed=failed, payload=payload, now_ms=1)
    assert (await b.claim("r1", 2)).status is ClaimStatus.BUSY  # a lives: b waits
    await _lapse(any_redis, a)  # a died before emitting
    claim = await b.claim("r1", 3)
    assert (claim.status, claim.state, claim.payload) == (ClaimStatus.RECOVER, state, payload)
    await b.mark_emitted(["r1"])
    done = await a.claim("r1", 4)
    assert (done.status, done.payload) == (ClaimStatus.DONE, payload)


async def test_a_worker_whose_own_lease_lapsed_claims_and_checks_nothing(
    any_redis: AnyRedis, prefix: str
) -> None:
    store = DedupStore(
        any_redis, key_prefix=prefix, worker_token="x", lease_ms=LEASE_MS, result_ttl_s=TTL_S
    )
    with pytest.raises(ClaimUnavailable):
        await store.claim("r1", 0)  # never renewed
    await store.heartbeat()
    assert (await store.claim("r1", 0)).status is ClaimStatus.CLAIMED
    await store.resign()
    with pytest.raises(ClaimUnavailable):
        await store.still_owner("r1")


async def test_the_ingress_requeues_only_a_stale_unclaimed_reservation(
    records: RecordStore, a: DedupStore
) -> None:
    async def reserve(token: str, now_ms: int, digest: str = "d") -> list[Reservation]:
        return await records.reserve(
            [("r1", digest)], client=None, token=token, now_ms=now_ms, requeue_after_ms=1000
        )

    assert (await reserve("t1", 0))[0].publish
    [young] = await reserve("t2", 500)  # queued recently: pending, not published again
    assert not young.publish and young.existing and young.existing.state == "queued"
    [other] = await reserve("t3", 5000, digest="other")  # not the same request: never
    assert not other.publish
    assert (await reserve("t4", 5000))[0].publish  # stale: published again, t4's now
    assert await records.release("t1", ["r1"]) == 0  # t1's reservation was replaced
    assert await records.release("t4", ["r1"]) == 1
    assert await records.get("r1") is None

    assert (await reserve("t5", 6000))[0].publish
    await a.claim("r1", 6001)
    assert await records.release("t5", ["r1"]) == 0  # a worker has it: kept
    [claimed] = await reserve("t6", 99_000)
    assert not claimed.publish and claimed.existing and claimed.existing.state == "claimed"


async def test_replay_resets_only_failed_and_fences_the_old_owner(
    records: RecordStore, a: DedupStore, b: DedupStore
) -> None:
    assert await records.reset_failed("r1", now_ms=0, token="replay") == "absent"
    await a.claim("r1", 0)
    assert await records.reset_failed("r1", now_ms=0, token="replay") == "claimed"
    await a.settle("r1", failed=True, payload=b'{"error_type": "x"}', now_ms=1)
    await a.mark_emitted(["r1"])

    assert await records.reset_failed("r1", now_ms=2, token="replay") == "reset"
    assert await records.state("r1") == "queued"
    claim = await b.claim("r1", 3)
    assert claim.status is ClaimStatus.CLAIMED and not claim.takeover
    # a still remembers its old claim's epoch; the replay moved past it.
    assert not await a.settle("r1", failed=True, payload=b'{"stale": 1}', now_ms=4)
    assert await b.settle("r1", failed=False, payload=b'{"ok": 1}', now_ms=5)
    assert await records.reset_failed("r1", now_ms=6, token="replay") == "completed"


async def test_a_rejection_is_its_own_record(
    any_redis: AnyRedis, records: RecordStore, a: DedupStore
) -> None:
    await a.record_rejection("r1", error=b'{"error_type": "invalid_request"}', field="messages")
    rejection = await records.rejection("r1")
    assert rejection and (rejection.status, rejection.field) == ("failed", "messages")
    assert rejection.payload == b'{"error_type": "invalid_request"}'
    assert 0 < await any_redis.ttl(records.keys.rejected("r1")) <= TTL_S
    assert await records.get("r1") is None
    assert (await a.claim("r1", 0)).status is ClaimStatus.CLAIMED  # a valid one later: new


async def test_ttls_are_set_on_create_and_settle_never_by_a_mark(
    any_redis: AnyRedis, records: RecordStore, a: DedupStore
) -> None:
    async def ttl(request_id: str) -> int:
        return int(await any_redis.ttl(records.keys.record(request_id)))

    await records.reserve([("r1", "d")], client=None, token="t", now_ms=0, requeue_after_ms=0)
    assert 0 < await ttl("r1") <= TTL_S
    await a.claim("r2", 0)
    assert 0 < await ttl("r2") <= TTL_S
    await any_redis.persist(records.keys.record("r2"))
    await a.settle("r2", failed=False, payload=b"{}", now_ms=1)
    assert 0 < await ttl("r2") <= TTL_S
    await a.mark_emitted(["r3"])  # expired or never there: not recreated
    assert await any_redis.exists(records.keys.record("r3")) == 0


async def test_an_outcome_is_stored_when_redis_lost_the_record(
    any_redis: AnyRedis, a: DedupStore, b: DedupStore
) -> None:
    await a.claim("r1", 0)
    await any_redis.delete(a.key("r1"))  # Redis restarted empty while the call ran
    assert await a.still_owner("r1")
    assert await a.settle("r1", failed=False, payload=b'{"answer": 1}', now_ms=1)
    assert (await b.claim("r1", 2)).status is ClaimStatus.BUSY
    await a.mark_emitted(["r1"])
    assert (await b.claim("r1", 3)).status is ClaimStatus.DONE


async def test_the_ingress_reserves_and_releases_many_ids_at_once(records: RecordStore) -> None:
    ids = [f"r{i}" for i in range(12)]
    found = await records.reserve(
        [(r, f"d{r}") for r in ids], client="bob", token="t", now_ms=0, requeue_after_ms=10_000
    )
    assert [(f.request_id, f.publish) for f in found] == [(r, True) for r in ids]
    again = await records.reserve(
        [(r, f"d{r}") for r in ids], client="bob", token="u", now_ms=1, requeue_after_ms=10_000
    )
    assert [(f.request_id, f.existing and f.existing.digest) for f in again] == [
        (r, f"d{r}") for r in ids
    ]
    assert await records.release("t", ids) == len(ids)
    assert [await records.get(r) for r in ids] == [None] * len(ids)


async def test_a_claim_given_back_is_free_at_once_and_fences_the_giver(
    records: RecordStore, a: DedupStore, b: DedupStore
) -> None:
    await records.reserve([("r1", "d")], client="alice", token="t", now_ms=0, requeue_after_ms=0)
    assert (await a.claim("r1", 1)).status is ClaimStatus.CLAIMED
    assert (await b.claim("r1", 2)).status is ClaimStatus.BUSY  # a lives: b would wait
    assert await a.release("r1")
    stored = await records.get("r1")
    assert stored and (stored.state, stored.client) == ("queued", "alice")  # pending, still hers
    claim = await b.claim("r1", 3)
    assert claim.status is ClaimStatus.CLAIMED and not claim.takeover  # a is alive, no lease wait
    # Whatever a's ended task left behind cannot store: its epoch is gone.
    assert not await a.settle("r1", failed=False, payload=b'{"stale": 1}', now_ms=4)
    assert not await a.release("r1")  # nothing held any more: no-op
    assert await b.settle("r1", failed=False, payload=b'{"fresh": 1}', now_ms=5)
    stored = await records.get("r1")
    assert stored and stored.payload == b'{"fresh": 1}'


async def test_giving_back_never_touches_an_outcome_or_a_claim_taken_over(
    any_redis: AnyRedis, records: RecordStore, a: DedupStore, b: DedupStore
) -> None:
    await a.claim("r1", 0)
    assert await a.settle("r1", failed=False, payload=b'{"answer": 1}', now_ms=1)
    assert not await a.release("r1")  # stored, not emitted: the outcome stands, a still owns it
    stored = await records.get("r1")
    assert stored and (stored.state, stored.payload) == ("completed", b'{"answer": 1}')
    assert (await b.claim("r1", 2)).status is ClaimStatus.BUSY

    await a.claim("r2", 3)
    await _lapse(any_redis, a)
    assert (await b.claim("r2", 4)).status is ClaimStatus.CLAIMED  # taken over
    await a.heartbeat()
    assert not await a.release("r2")  # b's now: a gives back nothing
    assert await b.still_owner("r2")


async def test_the_outcome_says_whether_it_was_emitted(records: RecordStore, a: DedupStore) -> None:
    assert await records.outcome("r1") is None  # no record
    await a.claim("r1", 0)
    assert await a.outcome("r1") is None  # claimed: nothing stored yet
    await a.settle("r1", failed=True, payload=b'{"error_type": "x"}', now_ms=1)
    stored = await a.outcome("r1")
    assert stored and (stored.state, stored.payload, stored.emitted) == (
        "failed",
        b'{"error_type": "x"}',
        False,
    )
    await a.mark_emitted(["r1"])
    assert (stored := await records.outcome("r1")) and stored.emitted


async def test_an_authenticated_client_cannot_republish_a_request_of_nobody(
    records: RecordStore,
) -> None:
    async def reserve(client: str | None, now_ms: int, request_id: str = "r1") -> Reservation:
        [found] = await records.reserve(
            [(request_id, "d")],
            client=client,
            token=f"t{now_ms}",
            now_ms=now_ms,
            requeue_after_ms=1000,
        )
        return found

    assert (await reserve(None, 0)).publish  # queued while authentication was off
    # Stale and identical, but nobody's: alice may not republish it, nor read it.
    taken = await reserve("alice", 5000)
    assert not taken.publish and taken.existing and taken.existing.client is None
    assert (await reserve(None, 10_000)).publish  # without authentication it still may

    assert (await reserve("alice", 0, "r2")).publish
    assert not (await reserve("bob", 5000, "r2")).publish  # alice's
    assert (await reserve("alice", 10_000, "r2")).publish  # hers, stale: published again


async def test_calls_are_numbered_over_every_owner(
    any_redis: AnyRedis, a: DedupStore, b: DedupStore
) -> None:
    assert (await a.claim("r1", 0)).status is ClaimStatus.CLAIMED
    assert [await a.before_call("r1"), await a.before_call("r1")] == [1, 2]
    await _lapse(any_redis, a)

    assert (await b.claim("r1", 1)).takeover
    # The taker goes on from the dead owner's count; the fenced owner may not call at all.
    assert await b.before_call("r1") == 3
    await a.heartbeat()
    with pytest.raises(NotOwner):
        await a.before_call("r1")
    assert not await a.still_owner("r1")  # the plain check counts nothing
    assert await b.before_call("r1") == 4
