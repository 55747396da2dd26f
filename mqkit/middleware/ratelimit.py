"""A token bucket for consumer rate limits, and the consume link that applies it.

Added in 0.1.0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mqkit.middleware.hooks import ConsumeNext, Middleware
from mqkit.policies import RateLimit

if TYPE_CHECKING:
    from mqkit.message import Delivery

__all__ = ["RateLimiting", "TokenBucket"]


class TokenBucket:
    """Allows ``rate`` tokens per second on average and bursts up to ``capacity``.

    Takers reserve tokens (the balance may go negative) and sleep until their reservation is
    covered, so concurrent takers are served in order and never exceed the rate together.

    Args:
        policy: the rate and burst.
        clock: a monotonic clock in seconds (injectable for tests).
    """

    __slots__ = ("_capacity", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, policy: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = float(policy.per_second)
        self._capacity = float(policy.capacity)
        self._clock = clock
        self._tokens = self._capacity
        self._stamp = clock()

    def reserve(self, n: int = 1) -> float:
        """Take ``n`` tokens now; return how long the caller must wait before using them."""
        now = self._clock()
        tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        tokens -= n
        self._tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self._rate

    async def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` tokens are available and take them."""
        delay = self.reserve(n)
        if delay > 0:
            await asyncio.sleep(delay)


class RateLimiting(Middleware):
    """Consume link: wait for a token before each delivery is handled (or handed out)."""

    def __init__(self, policy: RateLimit) -> None:
        self.bucket = TokenBucket(policy)

    async def on_consume(self, delivery: Delivery, call_next: ConsumeNext) -> None:
        """Take one token, then go on."""
        await self.bucket.acquire()
        await call_next(delivery)
