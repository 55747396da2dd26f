"""Retry: exponential backoff with jitter (tenacity as the engine), the retriable /
non-retriable split, and the one attempt budget shared by broker redeliveries and in-process
retries; and the consume link that retries a failed delivery after a delay
(:class:`Retrying`).

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, wait_exponential, wait_random
from tenacity.wait import wait_base

from mqkit.errors import NonRetryable, is_retriable
from mqkit.middleware.hooks import ConsumeNext, Middleware
from mqkit.policies import Retry

if TYPE_CHECKING:  # the producer path imports backoff() without the consumer's parts
    from mqkit.message import Delivery
    from mqkit.pipeline.context import Context
    from mqkit.pipeline.settle import Settlement

log = logging.getLogger("mqkit.consumer")

__all__ = ["Retrying", "backoff", "next_delay", "should_retry"]


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


class Retrying(Middleware):
    """Consume link: a failed delivery with attempts left runs again after a backoff delay.

    The delay is a timer, not a sleeping worker: the delivery keeps its prefetch slot (and its
    key, with ``ordering="key"``) and re-enters the ledger when the timer fires. An error that
    does not qualify, or the last attempt's, propagates to the dead-letter link. While the
    consumer stops, a failure with attempts left is handed back instead of waiting.

    Args:
        ctx: the consumer's shared state.
        policy: the retry policy.
        settle: requeues (at shutdown).
        disowned: hands a delivery back when its partition moved (None: never moves).
    """

    def __init__(
        self,
        ctx: Context,
        policy: Retry,
        settle: Settlement,
        disowned: Callable[[Delivery], bool] | None,
    ) -> None:
        self._ctx = ctx
        self._policy = policy
        self._settle = settle
        self._disowned = disowned
        self.timers: dict[Delivery, asyncio.TimerHandle] = {}

    @property
    def attempts(self) -> int:
        """The attempt budget: a delivery whose ``attempt`` is above it never runs again."""
        return self._policy.attempts

    def spent(self, d: Delivery) -> NonRetryable:
        """The error a delivery that arrives with its budget already spent is given up with."""
        return NonRetryable(
            f"delivered for attempt {d.attempt} of {self._policy.attempts}: earlier deliveries "
            "spent the budget (a handler outlived its lease, an ack came too late, or the "
            "process stopped mid-attempt); not run again"
        )

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Run the rest of the chain; schedule a retry when it raises and attempts remain.

        A delivery that arrives with ``attempt`` above the budget (the broker redelivered it
        after earlier attempts whose outcome never reached it) is given up at once."""
        if delivery.attempt > self._policy.attempts:
            raise self.spent(delivery)
        try:
            await call_next(delivery)
        except Exception as exc:
            if delivery._done or await self.absorb(delivery, exc):
                return
            raise

    async def absorb(self, d: Delivery, exc: BaseException) -> bool:
        """Record the failure; True when ``d`` will run again (or was handed back)."""
        fail = d._failure()
        fail.count += 1
        if fail.first is None:
            fail.first = time.time()
        fail.last_error = exc
        delay = next_delay(self._policy, d.attempt, exc, time.time() - fail.first)
        if log.isEnabledFor(logging.DEBUG):
            self._log_failure(d, exc, delay)
        if delay is None:
            return False
        if self._ctx.stopping:
            # shutting down: hand it back (this attempt counted) instead of waiting
            await self._settle.requeue(d)
            return True
        d.attempt += 1
        self.timers[d] = asyncio.get_running_loop().call_later(delay, self._due, d)
        return True

    @staticmethod
    def _log_failure(d: Delivery, exc: BaseException, delay: float | None) -> None:
        log.debug(
            "attempt %d of message %s on %s/%s failed: %r%s",
            d.attempt,
            d.id,
            d.topic,
            d.group,
            exc,
            "" if delay is None else f"; retrying in {delay:.2f}s",
            exc_info=exc,
            extra={"topic": d.topic, "group": d.group, "message_id": d.id, "attempt": d.attempt},
        )

    def _due(self, d: Delivery) -> None:
        if self.timers.pop(d, None) is None:
            return
        if self._disowned is not None and self._disowned(d):
            return
        self._ctx.ledger.again(d)

    def cancel_all(self) -> list[Delivery]:
        """Stop every pending retry; returns the deliveries that were waiting."""
        for handle in self.timers.values():
            handle.cancel()
        waiting = list(self.timers)
        self.timers.clear()
        return waiting


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
