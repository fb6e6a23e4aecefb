"""The one retry loop for provider calls: when to call again, how long to wait, when to stop.

Full-jitter exponential backoff (each wait drawn from ``[0, min(max_delay, base * 2**(n-1))]``)
spreads hundreds of in-flight retries over time instead of sending them back in waves. A server's
``Retry-After`` is a floor, not a suggestion. Only :class:`ProviderError` with ``retryable`` set
is retried; the adapters decide that (timeouts and broken connections included).

Not every failure spends the request's retry budget: the caller's ``charge`` hook says which
:class:`Charge` a failure costs (traffic control makes 429s and open circuits free, because they
say the provider is at capacity or known down, not that the request fails).

What :func:`call_with_retries` raises, always with ``attempts`` set:

- the :class:`ProviderError` itself when it is not retryable;
- :class:`RetriesExhausted` (a ProviderError) after ``max_attempts`` budgeted failures, or
  ``max_rate_limited_attempts`` 429s, with the last error's ``error_type``;
- :class:`RetriesExhausted` with ``error_type="expired"`` when the request's deadline has passed
  or the next wait would end after it (``last_error`` keeps the failure that came before). An
  attempt in flight when the deadline arrives is cancelled, whatever it was doing (calling, or
  waiting for rate budget or a circuit).
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from llmstream.core.clock import wall_clock_ms
from llmstream.processors.providers import ErrorType, ProviderError

__all__ = [
    "Charge",
    "RetriesExhausted",
    "RetryAfterCap",
    "RetryPolicy",
    "call_with_retries",
    "expired",
]

T = TypeVar("T")

# 2**62 * any sane base delay is far beyond any cap; stops float overflow on absurd attempts.
_MAX_EXPONENT = 62


class RetryAfterCap(BaseModel):
    """The longest wait a server's ``Retry-After`` may impose: on a retry (here) and on a
    provider's pause (:mod:`processors.adaptive`), so one knob bounds both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retry_after_s: float = Field(120.0, gt=0.0)


class RetryPolicy(RetryAfterCap):
    """How many calls to make and how long to wait between them (seconds).

    The fields are the worker's settings of the same names (``LLMSTREAM_MAX_ATTEMPTS``, ...):
    :class:`~llmstream.processors.settings.WorkerSettings` derives from this class, so each
    knob, its default and its bounds are declared here only.
    """

    max_attempts: int = Field(5, ge=1, le=100)
    retry_base_delay_s: float = Field(0.5, gt=0.0)
    retry_max_delay_s: float = Field(30.0, gt=0.0)
    # 429s one request may get after the limiter let it through (they spend no budget), before
    # it fails.
    max_rate_limited_attempts: int = Field(30, ge=1)

    def backoff_delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform over ``[0, min(max_delay, base * 2**(attempt-1))]``."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return rng.uniform(0.0, min(self.retry_max_delay_s, self.retry_base_delay_s * 2**exponent))

    def next_delay(self, attempt: int, error: ProviderError, rng: random.Random) -> float:
        """The wait after failed call number ``attempt``.

        With a server-given ``retry_after``: at least that, plus up to ``retry_base_delay_s`` of
        jitter so a crowd told the same number does not return in one burst; capped at
        ``max_retry_after_s``. Otherwise full-jitter backoff.
        """
        if error.retry_after is not None:
            spread = rng.uniform(0.0, self.retry_base_delay_s)
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


class Charge(enum.Enum):
    """What a failed call costs the request."""

    RETRY = "retry"  # one of its max_attempts, then a backoff wait
    RATE_LIMITED = "rate_limited"  # one of its max_rate_limited_attempts; the pause is the wait
    FREE = "free"  # nothing: the next attempt waits for what failed (an open circuit)


async def _retry_budget(error: ProviderError) -> Charge:
    return Charge.RETRY


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    deadline_ms: int | None,
    rng: random.Random,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    now_ms: Callable[[], int] = wall_clock_ms,
    on_retry: Callable[[int, float, ProviderError], object] | None = None,
    charge: Callable[[ProviderError], Awaitable[Charge]] = _retry_budget,
) -> tuple[T, int]:
    """Call ``fn`` until it succeeds; return ``(result, attempts)``.

    ``deadline_ms`` is an absolute time on ``now_ms``'s clock (epoch ms, as on the event).
    ``charge(error)`` runs after every failed call, retryable or not (traffic control reports
    outages to the circuit there). ``on_retry(attempt, delay_s, error)`` runs before each retry,
    e.g. to count retries. ``fn`` may raise :class:`RetriesExhausted` itself (it could not call
    before the deadline); that ends the loop as it is.
    """
    last_error: ProviderError | None = None
    attempt = spent = limited = 0
    loop = asyncio.get_running_loop()
    while True:
        scope = None
        if deadline_ms is not None:
            left_ms = deadline_ms - now_ms()
            if left_ms <= 0:
                raise expired(attempt, last_error)
            # An attempt still running at the deadline is cancelled: its answer would be
            # worthless.
            scope = _Deadline(loop, loop.time() + left_ms / 1000)
        attempt += 1
        try:
            if scope is None:
                return await fn(), attempt
            async with scope:
                result = await fn()
            return result, attempt
        except RetriesExhausted:
            raise
        except ProviderError as error:
            error.attempts = attempt
            last_error = error
        except TimeoutError:
            if scope is not None and scope.expired():
                raise expired(attempt, last_error) from None
            raise
        cost = await charge(last_error)
        delay = 0.0
        if cost is Charge.RATE_LIMITED:
            limited += 1
            if limited >= policy.max_rate_limited_attempts:
                raise _exhausted(f"still rate limited after {limited} calls", attempt, last_error)
        elif cost is Charge.RETRY:
            if not last_error.retryable:
                raise last_error
            spent += 1
            if spent >= policy.max_attempts:
                raise _exhausted(f"gave up after {spent} attempts", attempt, last_error)
            delay = policy.next_delay(spent, last_error, rng)
            if deadline_ms is not None and now_ms() + delay * 1000 >= deadline_ms:
                raise expired(attempt, last_error) from last_error
        if on_retry is not None:
            on_retry(attempt, delay, last_error)
        if delay:
            await sleep(delay)


def _exhausted(why: str, attempts: int, last_error: ProviderError) -> RetriesExhausted:
    error = RetriesExhausted(
        f"{why}: {last_error}", reason="max_attempts", last_error=last_error, attempts=attempts
    )
    error.__cause__ = last_error
    return error


def expired(attempts: int, last_error: ProviderError | None) -> RetriesExhausted:
    """The failure of a request whose deadline passed after ``attempts`` calls."""
    detail = f"; last error: {last_error}" if last_error else ""
    return RetriesExhausted(
        f"deadline passed after {attempts} attempt{'s' if attempts != 1 else ''}{detail}",
        reason="deadline",
        last_error=last_error,
        attempts=attempts,
    )


class _Deadline:
    """``asyncio.timeout_at(when)`` for one attempt, given its loop: the same cancellation and
    ``TimeoutError``, without the three loop lookups asyncio's costs on CPython 3.11 (each a
    ``getpid()`` system call; see :mod:`llmstream.core.loops`). Every provider call runs in one.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._when = when
        self._expired = False

    def expired(self) -> bool:
        """Whether the deadline passed while the attempt ran (it was cancelled for it)."""
        return self._expired

    async def __aenter__(self) -> None:
        task = asyncio.current_task(self._loop)
        assert task is not None  # an attempt runs in a task
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_at(self._when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: object
    ) -> None:
        self._handle.cancel()
        # As asyncio's own: our cancellation becomes TimeoutError unless another came too.
        expired = self._expired and self._task.uncancel() <= self._cancelling
        if expired and kind is asyncio.CancelledError:
            raise TimeoutError from error
