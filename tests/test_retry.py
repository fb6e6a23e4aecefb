"""The retry policy: full-jitter backoff, Retry-After, attempts and deadlines.

Unit tests inject ``sleep`` and ``now_ms`` so they run instantly and record every wait; the last
tests drive the real adapters against the simulator to show the policy working over HTTP.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import pytest_asyncio

from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.processors.providers import (
    Completion,
    ProviderError,
    create_http_client,
    parse_retry_after,
)
from llmstream.processors.providers.anthropic import AnthropicMessages
from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.retry import RetriesExhausted, RetryPolicy, call_with_retries
from llmstream.schemas.models import LLMRequest


def failure(status: int, retry_after: float | None = None) -> ProviderError:
    retryable = status in (408, 409, 429) or status >= 500
    return ProviderError(
        f"HTTP {status}",
        provider="openai",
        error_type="provider_error" if status >= 500 else "invalid_request",
        retryable=retryable,
        status_code=status,
        retry_after=retry_after,
    )


class Script:
    """A callable that raises the given errors in turn, then returns "ok"; counts its calls."""

    def __init__(self, *outcomes: ProviderError) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.outcomes:
            raise self.outcomes.pop(0)
        return "ok"


class Clock:
    """A fake wall clock in ms that the injected sleep advances."""

    def __init__(self, start_ms: int = 1_000_000) -> None:
        self.now = start_ms
        self.sleeps: list[float] = []

    def now_ms(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * 1000)


# --- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 6, 8, 12, 40, 5000])
def test_full_jitter_stays_in_bounds_and_spreads(attempt: int) -> None:
    policy = RetryPolicy(retry_base_delay_s=0.5, retry_max_delay_s=30.0)
    cap = min(30.0, 0.5 * 2 ** min(attempt - 1, 62))
    rng = random.Random(42)

    draws = [policy.backoff_delay(attempt, rng) for _ in range(2000)]

    assert all(0.0 <= d <= cap for d in draws)
    # Full jitter is uniform over [0, cap]: it reaches both ends and is centred on cap / 2.
    assert min(draws) < 0.05 * cap
    assert max(draws) > 0.95 * cap
    assert abs(statistics.fmean(draws) - cap / 2) < 0.05 * cap
    assert len(set(draws)) > 1900


def test_backoff_is_reproducible_with_a_seed() -> None:
    policy = RetryPolicy()

    first = [policy.backoff_delay(n, random.Random(7)) for n in range(1, 6)]
    again = [policy.backoff_delay(n, random.Random(7)) for n in range(1, 6)]

    assert first == again


def test_retry_after_is_a_floor_with_bounded_spread_and_a_cap() -> None:
    policy = RetryPolicy(retry_base_delay_s=0.5, max_retry_after_s=120.0)
    rng = random.Random(3)

    waits = [policy.next_delay(1, failure(429, retry_after=2.0), rng) for _ in range(500)]
    capped = policy.next_delay(1, failure(429, retry_after=900.0), rng)

    assert all(2.0 <= w <= 2.5 for w in waits)
    assert len(set(waits)) > 400
    assert capped == 120.0


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(retry_base_delay_s=-1)
    # A misspelt knob is refused, not silently left at its default.
    with pytest.raises(ValueError, match="base_delay_s"):
        RetryPolicy(base_delay_s=1.0)  # type: ignore[call-arg]


# --- Retry-After parsing ----------------------------------------------------------------------


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "7"}, 1.5),  # ms wins
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),  # non-standard float seconds
        ({"Retry-After": "0"}, 0.0),
        ({"retry-after-ms": "oops", "retry-after": "3"}, 3.0),
        ({"retry-after": "-5"}, 0.0),
        (
            {
                "retry-after": format_datetime(
                    datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=30), usegmt=True
                )
            },
            30.0,
        ),
        (
            {
                "retry-after": format_datetime(
                    datetime.fromtimestamp(NOW, UTC) - timedelta(seconds=30), usegmt=True
                )
            },
            0.0,
        ),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers), now=NOW) == expected


# --- call_with_retries ------------------------------------------------------------------------


async def test_success_first_time() -> None:
    fn = Script()

    result = await call_with_retries(fn, RetryPolicy(), deadline_ms=None, rng=random.Random(1))

    assert result == ("ok", 1)


async def test_400_is_not_retried() -> None:
    fn, clock = Script(failure(400), failure(500)), Clock()

    with pytest.raises(ProviderError) as caught:
        await call_with_retries(
            fn, RetryPolicy(), deadline_ms=None, rng=random.Random(1), sleep=clock.sleep
        )

    assert caught.value.status_code == 400
    assert not isinstance(caught.value, RetriesExhausted)
    assert (caught.value.attempts, fn.calls, clock.sleeps) == (1, 1, [])


async def test_500_then_success_is_retried_and_waits_follow_the_policy() -> None:
    policy = RetryPolicy(retry_base_delay_s=0.5, retry_max_delay_s=30.0)
    fn, clock = Script(failure(500), failure(503)), Clock()
    seen: list[tuple[int, float, int | None]] = []

    result = await call_with_retries(
        fn,
        policy,
        deadline_ms=None,
        rng=random.Random(9),
        sleep=clock.sleep,
        on_retry=lambda attempt, delay, error: seen.append((attempt, delay, error.status_code)),
    )

    expected_rng = random.Random(9)
    expected = [policy.backoff_delay(1, expected_rng), policy.backoff_delay(2, expected_rng)]
    assert result == ("ok", 3)
    assert clock.sleeps == expected
    assert 0 <= clock.sleeps[0] <= 0.5 and 0 <= clock.sleeps[1] <= 1.0
    assert seen == [(1, expected[0], 500), (2, expected[1], 503)]


async def test_retry_after_is_honoured() -> None:
    fn, clock = Script(failure(429, retry_after=4.0)), Clock()

    result = await call_with_retries(
        fn,
        RetryPolicy(retry_base_delay_s=0.5),
        deadline_ms=None,
        rng=random.Random(1),
        sleep=clock.sleep,
    )

    assert result == ("ok", 2)
    (wait,) = clock.sleeps
    assert 4.0 <= wait <= 4.5


async def test_max_attempts_is_respected() -> None:
    policy = RetryPolicy(max_attempts=4)
    fn, clock = Script(*(failure(500) for _ in range(10))), Clock()

    with pytest.raises(RetriesExhausted) as caught:
        await call_with_retries(
            fn, policy, deadline_ms=None, rng=random.Random(2), sleep=clock.sleep
        )

    error = caught.value
    assert (fn.calls, error.attempts, len(clock.sleeps)) == (4, 4, 3)
    assert (error.reason, error.error_type, error.status_code) == (
        "max_attempts",
        "provider_error",
        500,
    )
    assert error.retryable is True
    assert error.last_error is not None and error.last_error.status_code == 500
    assert isinstance(error, ProviderError)
    assert "4 attempts" in str(error)


async def test_deadline_stops_retries_before_a_wait_that_would_pass_it() -> None:
    # Waits are 2 s each (Retry-After, at most 1 ms of spread); the deadline leaves room for one.
    policy = RetryPolicy(retry_base_delay_s=0.001)
    clock = Clock()
    fn = Script(*(failure(429, retry_after=2.0) for _ in range(10)))

    with pytest.raises(RetriesExhausted) as caught:
        await call_with_retries(
            fn,
            policy,
            deadline_ms=clock.now + 3_000,
            rng=random.Random(1),
            sleep=clock.sleep,
            now_ms=clock.now_ms,
        )

    error = caught.value
    assert (error.reason, error.error_type, error.retryable) == ("deadline", "expired", False)
    assert (fn.calls, error.attempts, len(clock.sleeps)) == (2, 2, 1)
    assert 2.0 <= clock.sleeps[0] <= 2.001
    assert error.last_error is not None and error.last_error.status_code == 429


async def test_deadline_already_passed_makes_no_call() -> None:
    fn, clock = Script(), Clock()

    with pytest.raises(RetriesExhausted) as caught:
        await call_with_retries(
            fn, RetryPolicy(), deadline_ms=clock.now - 1, rng=random.Random(1), now_ms=clock.now_ms
        )

    assert (caught.value.error_type, caught.value.attempts, fn.calls) == ("expired", 0, 0)
    assert caught.value.last_error is None


async def test_attempt_in_flight_at_the_deadline_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetriesExhausted) as caught:
        await call_with_retries(
            slow,
            RetryPolicy(),
            deadline_ms=int((loop.time() - started) * 1000) + 150,
            rng=random.Random(1),
            now_ms=lambda: int((loop.time() - started) * 1000),
        )

    assert caught.value.error_type == "expired"
    assert caught.value.attempts == 1
    assert cancelled.is_set()
    assert loop.time() - started < 1.0


async def test_a_cancellation_from_outside_is_not_taken_for_the_deadline() -> None:
    # A drain cancels a task waiting on its attempt: that stays a cancellation.
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(10)
        return "late"

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(
        call_with_retries(
            slow,
            RetryPolicy(),
            deadline_ms=int(loop.time() * 1000) + 60_000,
            rng=random.Random(1),
            now_ms=lambda: int(loop.time() * 1000),
        )
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_other_exceptions_are_not_retried() -> None:
    calls = 0

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await call_with_retries(broken, RetryPolicy(), deadline_ms=None, rng=random.Random(1))
    assert calls == 1


# --- the policy over real HTTP ----------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(SimulatorSettings(port=0, latency_ms=0)) as server:
        yield server


async def scripted(sim: SimulatorServer, *responses: dict[str, object]) -> LLMRequest:
    request = LLMRequest(
        request_id=f"retry-{uuid.uuid4().hex}",
        model="m",
        messages=[{"role": "user", "content": "ping"}],
    )
    async with httpx.AsyncClient() as control:
        answer = await control.post(
            f"{sim.url}/_sim/script",
            json={"request_id": request.request_id, "responses": list(responses)},
        )
        answer.raise_for_status()
    return request


async def calls_for(sim: SimulatorServer, request_id: str) -> int:
    async with httpx.AsyncClient() as control:
        stats = (await control.get(f"{sim.url}/_sim/stats")).json()
    count: int = stats["calls_by_request_id"].get(request_id, 0)
    return count


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
async def test_retries_through_the_simulator(sim: SimulatorServer, wire: str) -> None:
    request = await scripted(sim, {"status": 500}, {"status": 429, "retry_after": 0.05})
    http = create_http_client(timeout_s=5, max_connections=10)
    adapter = (
        OpenAICompatible("openai", http, f"{sim.url}/v1")
        if wire == "openai"
        else AnthropicMessages("anthropic", http, sim.url)
    )
    waits: list[float] = []

    def complete() -> Awaitable[Completion]:
        return adapter.complete(request, "m")

    try:
        completion, attempts = await call_with_retries(
            complete,
            RetryPolicy(retry_base_delay_s=0.01),
            deadline_ms=None,
            rng=random.Random(5),
            on_retry=lambda _attempt, delay, _error: waits.append(delay),
        )
    finally:
        await http.close()

    assert (completion.content, attempts) == ("echo: ping", 3)
    assert await calls_for(sim, request.request_id) == 3
    assert 0 <= waits[0] <= 0.01
    assert 0.05 <= waits[1] <= 0.06  # retry-after-ms from the 429


async def test_400_through_the_simulator_is_called_once(sim: SimulatorServer) -> None:
    request = await scripted(sim, {"status": 400}, {"status": 500})
    http = create_http_client(timeout_s=5, max_connections=10)
    adapter = OpenAICompatible("openai", http, f"{sim.url}/v1")
    try:
        with pytest.raises(ProviderError) as caught:
            await call_with_retries(
                lambda: adapter.complete(request, "m"),
                RetryPolicy(retry_base_delay_s=0.01),
                deadline_ms=None,
                rng=random.Random(5),
            )
    finally:
        await http.close()

    assert (caught.value.status_code, caught.value.attempts) == (400, 1)
    assert await calls_for(sim, request.request_id) == 1
