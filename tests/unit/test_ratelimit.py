"""mqkit.middleware.ratelimit.TokenBucket with an injected clock, plus one real-time check."""

from __future__ import annotations

import asyncio

import pytest

import mqkit
from mqkit.middleware.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_burst_then_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=10, burst=5), clock=clock)
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    # the 6th must wait one token's worth
    assert bucket.reserve() == pytest.approx(0.1)


def test_concurrent_reservations_add_up() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=4, burst=2), clock=clock)
    delays = [bucket.reserve() for _ in range(6)]
    assert delays == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1.0])


def test_reservations_are_repaid_as_time_passes() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=10, burst=1), clock=clock)
    assert bucket.reserve() == 0
    assert bucket.reserve() == pytest.approx(0.1)
    clock.advance(0.1)  # the debt is repaid; still empty
    assert bucket.reserve() == pytest.approx(0.1)
    clock.advance(0.2)
    assert bucket.reserve() == 0


def test_refill_capped_at_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=100, burst=3), clock=clock)
    for _ in range(3):
        bucket.reserve()
    clock.advance(3600)  # a long idle time refills only up to the burst
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() == pytest.approx(0.01)


def test_partial_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=2, burst=4), clock=clock)
    for _ in range(4):
        assert bucket.reserve() == 0
    clock.advance(1.0)  # two tokens back
    assert bucket.reserve() == 0
    assert bucket.reserve() == 0
    assert bucket.reserve() == pytest.approx(0.5)


def test_reserve_many_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=10, burst=10), clock=clock)
    assert bucket.reserve(10) == 0
    assert bucket.reserve(5) == pytest.approx(0.5)


def test_default_burst_is_one_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket(mqkit.RateLimit(per_second=3), clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    assert bucket.reserve() > 0


async def test_acquire_real_time_bound() -> None:
    rate, burst, n = 100, 5, 25
    bucket = TokenBucket(mqkit.RateLimit(per_second=rate, burst=burst))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(asyncio.gather(*(bucket.acquire() for _ in range(n))), timeout=5)
    elapsed = loop.time() - start
    expected = (n - burst) / rate  # 0.2 s
    assert elapsed >= expected * 0.9
    assert elapsed < expected + 1.5


async def test_acquire_within_burst_does_not_wait() -> None:
    bucket = TokenBucket(mqkit.RateLimit(per_second=1, burst=10))
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(10):
        await bucket.acquire()
    assert loop.time() - start < 0.5
