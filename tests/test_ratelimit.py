"""The shared rate limiter and the adaptive controller, their Lua scripts on the real Redis."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis.asyncio as aioredis

from llmstream.processors.adaptive import AdaptiveControl, AdaptiveParams
from llmstream.processors.backpressure import WaitingRoom
from llmstream.processors.ratelimit import Grant, Lane, RateLimit, RateLimiter, estimate_tokens
from tests.conftest import Services
from tests.harness import request

pytestmark = pytest.mark.integration


def limiter(
    redis: aioredis.Redis,
    prefix: str,
    limits: dict[str, RateLimit] | None = None,
    quotas: dict[str, RateLimit] | None = None,
    *,
    params: AdaptiveParams | None = None,
    margin: float = 0.0,
) -> RateLimiter:
    limits = limits or {}
    adaptive = AdaptiveControl(
        redis,
        key_prefix=prefix,
        params=params or AdaptiveParams(),
        provider_rpm={k: v.rpm for k, v in limits.items() if "/" not in k and v.rpm},
    )
    return RateLimiter(
        redis,
        key_prefix=prefix,
        limits=limits,
        client_quotas=quotas or {},
        adaptive=adaptive,
        margin=margin,
        horizon_s=0.2,
    )


async def grant(rl: RateLimiter, lane: Lane, tokens: int = 0) -> Grant:
    result, _ = await rl.acquire(lane, tokens, deadline_ms=None, stay=WaitingRoom(0).stay())
    assert result is not None
    return result


def lane_of(
    rl: RateLimiter, provider: str = "p", model: str = "m", client: str | None = None
) -> Lane:
    lane = rl.lane(provider, model, client)
    assert lane is not None
    return lane


async def granted_in_a_row(
    redis: aioredis.Redis, prefix: str, rpm: float, calls: int
) -> tuple[RateLimiter, Lane, list[Grant]]:
    """``calls`` grants from provider "p" configured at ``rpm`` (burst 100), with the adaptive
    window time-scaled to 6 s and recovery off."""
    params = AdaptiveParams(adaptive_window_s=6.0, adaptive_recovery_per_min=0.0)
    rl = limiter(redis, prefix, {"p": RateLimit(rpm=rpm, rpm_burst=100)}, params=params)
    lane = lane_of(rl)
    return rl, lane, [await grant(rl, lane) for _ in range(calls)]


async def test_requests_are_paced_at_the_limit_across_two_workers(
    services: Services, unique: str
) -> None:
    # Two limiters on two connections: two workers sharing one provider limit of 1,200/min.
    prefix = f"test-{unique}:"
    a = aioredis.Redis.from_url(services.redis_url)
    b = aioredis.Redis.from_url(services.redis_url)
    try:
        limits = {"p": RateLimit(rpm=1200)}
        la, lb = limiter(a, prefix, limits), limiter(b, prefix, limits)
        grants = await asyncio.gather(*(grant(rl, lane_of(rl)) for rl in [la, lb] * 10))
    finally:
        await a.aclose()
        await b.aclose()
    sent = sorted(g.send_at_ms for g in grants)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    # GCRA with a burst of 1: one call per 50 ms, never two closer. (Grants are scheduled ahead,
    # so the spacing is exact unless a loaded machine asked for a grant later than its slot.)
    assert min(gaps) >= 50 - 0.5
    assert sent[-1] - sent[0] >= 19 * 50 - 5


async def test_burst_passes_at_once_then_pacing(redis_client: aioredis.Redis, unique: str) -> None:
    rl = limiter(redis_client, f"test-{unique}:", {"p": RateLimit(rpm=600, rpm_burst=5)})
    lane = lane_of(rl)
    grants = [await grant(rl, lane) for _ in range(7)]
    first = grants[0].send_at_ms
    # The burst goes at once: each of the first five is due when it is decided (Redis time).
    assert all(g.send_at_ms <= g.decided_at_ms + 0.5 for g in grants[:5])
    # Then one call per 100 ms (600/min) counted from the burst: the sixth and seventh are due at
    # their slot, or when decided if a loaded machine asked for them later than that.
    for index, slot in ((5, 100), (6, 200)):
        due, decided = grants[index].send_at_ms, grants[index].decided_at_ms
        assert due >= first + slot - 1
        assert due <= max(first + slot, decided) + 1


async def test_token_budget_is_corrected_with_real_usage(
    redis_client: aioredis.Redis, unique: str
) -> None:
    # 60,000 tokens/min = 1,000 a second; the bucket holds one second of them.
    rl = limiter(redis_client, f"test-{unique}:", {"p/m": RateLimit(tpm=60_000)})
    lane = lane_of(rl)
    assert [b.scope for b in lane.buckets] == ["model"] and lane.counts_tokens
    first = await grant(rl, lane, tokens=1000)
    # Estimated 1,000 but used 100: 900 are given back, so 900 more go at once.
    await rl.correct(first, 100)
    second = await grant(rl, lane, tokens=900)
    assert second.send_at_ms - first.send_at_ms < 20
    # Used more than estimated: the bucket is charged the difference, and the next call waits.
    await rl.correct(second, 1400)
    third, waited_for = await rl.acquire(lane, 100, deadline_ms=None, stay=WaitingRoom(0).stay())
    assert third is not None and waited_for == "model"
    assert third.send_at_ms - second.send_at_ms == pytest.approx(600, abs=30)


async def test_a_request_larger_than_the_bucket_still_goes(
    redis_client: aioredis.Redis, unique: str
) -> None:
    # 600,000 tokens/min = 10 per ms; a bucket of 1,000.
    rl = limiter(redis_client, f"test-{unique}:", {"p": RateLimit(tpm=600_000, tpm_burst=1000)})
    lane = lane_of(rl)
    big = await grant(rl, lane, tokens=5000)  # 5x the bucket: passes when the bucket is full
    small, _ = await rl.acquire(lane, 10, deadline_ms=None, stay=WaitingRoom(0).stay())
    assert small is not None
    # ... and is paid in full: 5,000 tokens at 10 per ms, less the bucket's 990.
    assert small.send_at_ms - big.send_at_ms == pytest.approx(500 - 99, abs=10)


async def test_client_quotas_are_per_client(redis_client: aioredis.Redis, unique: str) -> None:
    rl = limiter(
        redis_client,
        f"test-{unique}:",
        quotas={"default": RateLimit(rpm=60), "team-a": RateLimit(rpm=6000)},
    )
    assert rl.lane("p", "m", "team-b") is not None
    first = {c: await grant(rl, lane_of(rl, client=c)) for c in ("team-a", "team-b", "team-c")}
    # Each client has its own bucket: three clients' first calls go at once.
    sent = [g.send_at_ms for g in first.values()]
    assert max(sent) - min(sent) < 20
    # team-b's next call waits for its own quota (1/s), team-a's does not.
    deadline = int(max(sent)) + 500
    b_next, b_why = await rl.acquire(
        lane_of(rl, client="team-b"), 0, deadline_ms=deadline, stay=WaitingRoom(0).stay()
    )
    a_next = await grant(rl, lane_of(rl, client="team-a"))
    assert b_next is None and b_why == "client"  # could not go before its deadline
    assert a_next.send_at_ms - first["team-a"].send_at_ms < 50


async def test_unlimited_lanes_cost_nothing(redis_client: aioredis.Redis, unique: str) -> None:
    rl = limiter(redis_client, f"test-{unique}:", {"other": RateLimit(rpm=1)})
    assert rl.lane("p", "m", None) is None


async def test_429_pauses_the_provider_and_decreases_to_the_observed_goodput(
    redis_client: aioredis.Redis, unique: str
) -> None:
    # Configured 6,000/min, over a 6 s window (time-scaled): 600 calls per window at most.
    rl, lane, grants = await granted_in_a_row(redis_client, f"test-{unique}:", 6000, 60)
    adaptive = rl.adaptive
    # The provider accepted 59 of them and answered the 60th with 429 and Retry-After 0.3 s.
    feedback = await adaptive.report_429("p", sent_at_ms=grants[-1].send_at_ms, retry_after_s=0.3)
    assert feedback.decreased
    assert feedback.pause_s == pytest.approx(0.3, abs=0.05)
    # 59 per 6 s is 590/min of the 6,000 configured; bounded below by halving.
    assert feedback.factor == pytest.approx(0.5)
    # A 429 for a call sent before that decrease teaches nothing new: pause only.
    again = await adaptive.report_429("p", sent_at_ms=grants[-2].send_at_ms, retry_after_s=0.1)
    assert not again.decreased and again.factor == pytest.approx(0.5)
    assert adaptive.pause_remaining("p") > 0  # the local view knows too
    # The next call waits for the pause, however much budget is left.
    after, why = await rl.acquire(lane, 0, deadline_ms=None, stay=WaitingRoom(0).stay())
    assert after is not None and why == "pause"
    assert after.send_at_ms - grants[-1].send_at_ms >= 290


async def test_decrease_lands_on_the_observed_goodput_when_closer_than_halving(
    redis_client: aioredis.Redis, unique: str
) -> None:
    # Configured 1,000/min = 100 per 6 s window.
    rl, _, grants = await granted_in_a_row(redis_client, f"test-{unique}:", 1000, 71)
    feedback = await rl.adaptive.report_429("p", sent_at_ms=grants[-1].send_at_ms, retry_after_s=0)
    # 70 accepted in the window: 700/min of 1,000 configured.
    assert feedback.factor == pytest.approx(0.7)
    # Recovery is linear after the pause; here it is off (0/min), so the factor stays.
    await rl.adaptive.refresh(["p"])
    assert rl.adaptive.factors["p"] == pytest.approx(0.7)


async def test_factor_recovers_gradually(redis_client: aioredis.Redis, unique: str) -> None:
    params = AdaptiveParams(adaptive_recovery_per_min=60.0)  # +1.0 per second, to see it in a test
    rl = limiter(redis_client, f"test-{unique}:", {"p": RateLimit(rpm=600)}, params=params)
    await rl.adaptive.report_429("p", sent_at_ms=0, retry_after_s=0)
    await rl.adaptive.refresh(["p"])
    low = rl.adaptive.factors["p"]
    await asyncio.sleep(0.2)
    await rl.adaptive.refresh(["p"])
    assert low == pytest.approx(0.5, abs=0.02)
    assert rl.adaptive.factors["p"] == pytest.approx(0.7, abs=0.05)


def test_token_estimate_counts_the_prompt_and_the_completion_budget() -> None:
    r = request("r", text="x" * 400, max_tokens=50)
    assert estimate_tokens(r, 256) == 100 + 4 + 50
    assert estimate_tokens(request("r", text="x" * 400), 256) == 100 + 4 + 256


async def test_a_parked_request_gives_its_slot_back() -> None:
    slots = asyncio.Semaphore(1)
    await slots.acquire()  # the request's own slot, as the worker holds it
    room = WaitingRoom(capacity=1)
    room.bind(slots)
    stay, full = room.stay(), room.stay()
    stay.park()
    assert room.waiting == 1 and not slots.locked()  # another event can be admitted
    full.park()  # the room is full: this one keeps its slot while it waits
    assert room.waiting == 1 and not full.parked
    await slots.acquire()  # the admitted one
    resumed = asyncio.create_task(stay.resume())
    await asyncio.sleep(0.01)
    assert not resumed.done()  # waits for a slot before calling the provider
    slots.release()
    await resumed
    assert room.waiting == 0 and slots.locked()


async def test_a_request_cancelled_while_taking_its_slot_back_holds_none() -> None:
    slots = asyncio.Semaphore(1)
    await slots.acquire()  # the request's own slot
    room = WaitingRoom(capacity=1)
    room.bind(slots)
    stay = room.stay()
    stay.park()
    await slots.acquire()  # another event took the slot it gave back
    resuming = asyncio.create_task(stay.resume())
    await asyncio.sleep(0.01)
    resuming.cancel()  # its deadline passed while it waited for a slot
    with pytest.raises(asyncio.CancelledError):
        await resuming
    # Still parked, holding no slot: the worker must not release one for it.
    assert stay.parked and room.waiting == 1
    stay.abandon()
    assert room.waiting == 0 and slots.locked()
