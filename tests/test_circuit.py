"""Circuit breakers shared through the real Redis: open, half-open probe, close, reopen."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from llmstream.processors.circuit import CircuitAdmission, CircuitBreakers, CircuitParams, is_outage
from llmstream.processors.providers import ErrorType, ProviderError

pytestmark = pytest.mark.integration

PARAMS = CircuitParams(
    circuit_window_s=5, circuit_min_failures=3, circuit_failure_ratio=0.5, circuit_cooldown_s=0.3
)


def breakers(redis: aioredis.Redis, unique: str, token: str) -> CircuitBreakers:
    return CircuitBreakers(
        redis, key_prefix=f"test-{unique}:", worker_token=token, params=PARAMS, sync_s=0.5
    )


async def test_opens_after_failures_and_is_shared(
    redis_client: aioredis.Redis, unique: str
) -> None:
    a, b = breakers(redis_client, unique, "wa"), breakers(redis_client, unique, "wb")
    assert (await a.admit("p", "m"))[0] is CircuitAdmission.CLOSED
    assert await a.record_failure("p", "m", probe=False) == (False, "")
    assert await b.record_failure("p", "m", probe=False) == (False, "")
    # The third failure, from either worker, opens it.
    assert await a.record_failure("p", "m", probe=False) == (True, "opened")
    admission, remaining = await a.admit("p", "m")
    assert admission is CircuitAdmission.OPEN and 0.2 < remaining <= 0.3
    # Worker b learns it at its next sync.
    assert (await b.admit("p", "m"))[0] is CircuitAdmission.CLOSED
    await b.sync()
    assert (await b.admit("p", "m"))[0] is CircuitAdmission.OPEN
    assert b.open_circuits() == {("p", "m"): True}
    # Other models of the provider are their own circuits.
    assert (await b.admit("p", "other"))[0] is CircuitAdmission.CLOSED


async def test_successes_keep_it_closed(redis_client: aioredis.Redis, unique: str) -> None:
    a = breakers(redis_client, unique, "wa")
    for _ in range(10):
        a.record_success("p", "m")
    await a.sync()
    # 3 failures of 13 calls: under the 50% ratio.
    results = [await a.record_failure("p", "m", probe=False) for _ in range(3)]
    assert results == [(False, "")] * 3


async def test_one_probe_after_the_cooldown_then_closed(
    redis_client: aioredis.Redis, unique: str
) -> None:
    a, b = breakers(redis_client, unique, "wa"), breakers(redis_client, unique, "wb")
    await b.admit("p", "m")  # b uses this model too
    for _ in range(3):
        await a.record_failure("p", "m", probe=False)
    await b.sync()
    await asyncio.sleep(0.35)
    # Half-open: exactly one probe, to whichever worker asks first.
    assert (await a.admit("p", "m"))[0] is CircuitAdmission.PROBE
    assert (await b.admit("p", "m"))[0] is CircuitAdmission.OPEN
    assert (await a.admit("p", "m"))[0] is CircuitAdmission.OPEN  # not a second probe here either
    waiter = asyncio.create_task(a.wait("p", "m", 5.0))
    await a.record_probe_success("p", "m")
    await asyncio.wait_for(waiter, 1)  # waiters here wake at once
    assert (await a.admit("p", "m"))[0] is CircuitAdmission.CLOSED
    await b.sync()
    assert (await b.admit("p", "m"))[0] is CircuitAdmission.CLOSED


async def test_a_failed_probe_reopens_for_another_cooldown(
    redis_client: aioredis.Redis, unique: str
) -> None:
    a = breakers(redis_client, unique, "wa")
    for _ in range(3):
        await a.record_failure("p", "m", probe=False)
    await asyncio.sleep(0.35)
    assert (await a.admit("p", "m"))[0] is CircuitAdmission.PROBE
    # A late failure of a call sent before the circuit opened changes nothing.
    assert await a.record_failure("p", "m", probe=False) == (True, "")
    assert await a.record_failure("p", "m", probe=True) == (True, "reopened")
    admission, remaining = await a.admit("p", "m")
    assert admission is CircuitAdmission.OPEN and remaining > 0.2


def test_only_outages_count() -> None:
    def error(error_type: ErrorType, status: int | None) -> ProviderError:
        return ProviderError(
            "x", provider="p", error_type=error_type, retryable=True, status_code=status
        )

    assert is_outage(error("provider_error", 503))
    assert is_outage(error("timeout", None))
    assert is_outage(error("connection_error", None))
    assert not is_outage(error("rate_limited", 429))
    assert not is_outage(error("invalid_request", 400))
    assert not is_outage(error("provider_error", 409))
