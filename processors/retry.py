"""When and how long to wait before calling a provider again.

Full-jitter exponential backoff (each wait drawn from ``[0, min(max_delay, base * 2**(n-1))]``)
spreads hundreds of in-flight retries over time instead of sending them back in waves. A server's
``Retry-After`` is a floor, not a suggestion. Only :class:`ProviderError` with ``retryable`` set
is retried; the adapters decide that (timeouts and broken connections included).

What :func:`call_with_retries` raises, always with ``attempts`` set:

- the :class:`ProviderError` itself when it is not retryable;
- :class:`RetriesExhausted` (a ProviderError) after ``max_attempts`` retryable failures, with the
  last error's ``error_type``;
- :class:`RetriesExhausted` with ``error_type="expired"`` when the request's deadline has passed
  or the next wait would end after it (``last_error`` keeps the failure that came before). An
  attempt in flight when the deadline arrives is cancelled.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.providers import ErrorType, ProviderError

__all__ = ["RetriesExhausted", "RetryPolicy", "call_with_retries"]

T = TypeVar("T")

# 2**62 * any sane base delay is far beyond any cap; stops float overflow on absurd attempts.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class RetryPolicy:
    """How many calls to make and how long to wait between them (seconds)."""

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay_s, self.max_delay_s, self.max_retry_after_s) < 0:
            raise ValueError("delays must not be negative")

    def backoff_delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform over ``[0, min(max_delay, base * 2**(attempt-1))]``."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**exponent))

    def next_delay(self, attempt: int, error: ProviderError, rng: random.Random) -> float:
        """The wait after failed call number ``attempt``.

        With a server-given ``retry_after``: at least that, plus up to ``base_delay_s`` of jitter
        so a crowd told the same number does not return in one burst; capped at
        ``max_retry_after_s``. Otherwise full-jitter backoff.
        """
        if error.retry_after is not None:
            spread = rng.uniform(0.0, self.base_delay_s)
            return min(self.max_retry_after_s, error.retry_after + spread)
        return self.backoff_delay(attempt, rng)


class RetriesExhausted(ProviderError):
    """No more calls will be made although the last failure was retryable.

    ``reason`` is ``"max_attempts"`` or ``"deadline"`` (then ``error_type`` is ``"expired"``);
    ``last_error`` is the final provider failure, None if the deadline had passed before the
    first call.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: Literal["max_attempts", "deadline"],
        last_error: ProviderError | None,
        attempts: int,
    ) -> None:
        super().__init__(
            message,
            provider=last_error.provider if last_error else "",
            error_type="expired" if reason == "deadline" else _error_type(last_error),
            # Past its deadline a request is worth nothing; out of attempts it may still succeed.
            retryable=reason == "max_attempts",
            status_code=last_error.status_code if last_error else None,
            retry_after=last_error.retry_after if last_error else None,
            body=last_error.body if last_error else None,
        )
        self.reason = reason
        self.last_error = last_error
        self.attempts = attempts


def _error_type(error: ProviderError | None) -> ErrorType:
    return error.error_type if error else "provider_error"


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    deadline_ms: int | None,
    rng: random.Random,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    now_ms: Callable[[], int] = wall_clock_ms,
    on_retry: Callable[[int, float, ProviderError], object] | None = None,
) -> tuple[T, int]:
    """Call ``fn`` until it succeeds; return ``(result, attempts)``.

    ``deadline_ms`` is an absolute time on ``now_ms``'s clock (epoch ms, as on the event).
    ``on_retry(attempt, delay_s, error)`` runs before each wait, e.g. to count retries.
    """
    last_error: ProviderError | None = None
    attempt = 0
    while True:
        if deadline_ms is not None and now_ms() >= deadline_ms:
            raise _expired(attempt, last_error)
        attempt += 1
        # An attempt still running at the deadline is cancelled: its answer would be worthless.
        scope = asyncio.timeout(None if deadline_ms is None else (deadline_ms - now_ms()) / 1000)
        try:
            async with scope:
                result = await fn()
            return result, attempt
        except ProviderError as error:
            error.attempts = attempt
            if not error.retryable:
                raise
            last_error = error
        except TimeoutError:
            if scope.expired():
                raise _expired(attempt, last_error) from None
            raise
        if attempt >= policy.max_attempts:
            raise RetriesExhausted(
                f"gave up after {attempt} attempts: {last_error}",
                reason="max_attempts",
                last_error=last_error,
                attempts=attempt,
            ) from last_error
        delay = policy.next_delay(attempt, last_error, rng)
        if deadline_ms is not None and now_ms() + delay * 1000 >= deadline_ms:
            raise _expired(attempt, last_error) from last_error
        if on_retry is not None:
            on_retry(attempt, delay, last_error)
        await sleep(delay)


def _expired(attempts: int, last_error: ProviderError | None) -> RetriesExhausted:
    detail = f"; last error: {last_error}" if last_error else ""
    return RetriesExhausted(
        f"deadline passed after {attempts} attempt{'s' if attempts != 1 else ''}{detail}",
        reason="deadline",
        last_error=last_error,
        attempts=attempts,
    )
