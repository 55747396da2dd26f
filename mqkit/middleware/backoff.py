"""Backoff: how long to wait after a failed attempt (tenacity's exponential wait with jitter
as the engine), whether an error qualifies for another attempt, and the one rule that combines
a policy's attempts, its deadline and the error (:func:`next_delay`).

Shared by the producer's confirmation retries and the consumer's retry link.

Added in 0.3.0 (moved out of :mod:`mqkit.middleware.retry`, which re-exports it).
"""

from __future__ import annotations

from typing import Any

from tenacity import AsyncRetrying, RetryCallState, wait_exponential, wait_random
from tenacity.wait import wait_base

from mqkit.errors import is_retriable
from mqkit.policies import Retry

__all__ = ["backoff", "next_delay", "should_retry"]


def _wait(policy: Retry) -> wait_base:
    wait: wait_base = wait_exponential(
        multiplier=policy.initial_delay, exp_base=policy.multiplier, max=policy.max_delay
    )
    if policy.jitter > 0:
        wait = wait + wait_random(0, policy.jitter)
    return wait


_waits: dict[Retry, wait_base] = {}


def backoff(policy: Retry, failed_attempt: int) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
    wait = _waits.get(policy)
    if wait is None:
        wait = _waits[policy] = _wait(policy)
    state = RetryCallState(retry_object=_DUMMY, fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failed_attempt)
    return float(min(policy.max_delay + policy.jitter, wait(state)))


_DUMMY: Any = AsyncRetrying()


def should_retry(policy: Retry, exc: BaseException) -> bool:
    """Whether ``exc`` qualifies for another attempt under ``policy`` (budget aside)."""
    if isinstance(exc, policy.give_up_on):
        return False
    if not isinstance(exc, policy.retry_on):
        return False
    return is_retriable(exc)


def next_delay(
    policy: Retry, failed_attempt: int, exc: BaseException, elapsed: float
) -> float | None:
    """The seconds to wait before the next attempt, or None when there is none.

    ``failed_attempt`` is the 1-based number of the attempt that just failed with ``exc``;
    ``elapsed`` the seconds since the first failure (for :attr:`Retry.deadline`). None when the
    budget of attempts is spent, the error does not qualify, or the deadline has passed (a
    backoff that would end past it is shortened to end at it).
    """
    if failed_attempt >= policy.attempts or not should_retry(policy, exc):
        return None
    delay = backoff(policy, failed_attempt)
    deadline = policy.deadline
    if deadline is not None:
        remaining = deadline - elapsed
        if remaining <= 0:
            return None
        delay = min(delay, remaining)
    return delay
