"""Policy value objects and the retry middleware's backoff / should_retry."""

from __future__ import annotations

import math

import pytest

import mqkit
from mqkit.middleware.retry import backoff, should_retry

# ---------------------------------------------------------------- Retry


def test_retry_defaults() -> None:
    r = mqkit.Retry()
    assert (r.attempts, r.initial_delay, r.max_delay, r.multiplier, r.jitter) == (
        3,
        0.1,
        5.0,
        2.0,
        0.1,
    )
    assert r.retry_on == (Exception,)
    assert r.give_up_on == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": -1},
        {"attempts": 1.5},
        {"attempts": True},
        {"attempts": "3"},
        {"initial_delay": -0.1},
        {"initial_delay": math.nan},
        {"initial_delay": "1"},
        {"max_delay": -1},
        {"jitter": -0.01},
        {"multiplier": 0},
        {"multiplier": 0.5},
        {"multiplier": False},
        {"retry_on": ValueError},
        {"retry_on": (ValueError, "x")},
        {"retry_on": [ValueError]},
        {"give_up_on": (int,)},
    ],
)
def test_retry_rejects(kwargs: dict) -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.Retry(**kwargs)


def test_retry_accepts_edges() -> None:
    r = mqkit.Retry(attempts=1, initial_delay=0, max_delay=0, jitter=0, multiplier=1)
    assert r.attempts == 1
    mqkit.Retry(retry_on=(ValueError, KeyError), give_up_on=(KeyError,))


def test_retry_is_frozen_and_hashable() -> None:
    r = mqkit.Retry()
    with pytest.raises(AttributeError):
        r.attempts = 5  # type: ignore[misc]
    assert hash(r) == hash(mqkit.Retry())


# ---------------------------------------------------------------- Batch


def test_batch_defaults() -> None:
    b = mqkit.Batch()
    assert (b.max_messages, b.max_delay, b.max_bytes) == (1000, 0.0, 1 << 20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_messages": 0},
        {"max_messages": 1.0},
        {"max_messages": True},
        {"max_bytes": 0},
        {"max_bytes": -5},
        {"max_bytes": "10"},
        {"max_delay": -0.5},
        {"max_delay": math.nan},
        {"max_delay": None},
    ],
)
def test_batch_rejects(kwargs: dict) -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.Batch(**kwargs)


def test_batch_edges() -> None:
    b = mqkit.Batch(max_messages=1, max_delay=0, max_bytes=1)
    assert b.max_messages == 1


# ---------------------------------------------------------------- RateLimit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_second": 0},
        {"per_second": -1},
        {"per_second": math.nan},
        {"per_second": "5"},
        {"per_second": True},
        {"per_second": 5, "burst": 0},
        {"per_second": 5, "burst": 2.5},
        {"per_second": 5, "burst": True},
    ],
)
def test_ratelimit_rejects(kwargs: dict) -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.RateLimit(**kwargs)


@pytest.mark.parametrize(
    ("per_second", "burst", "capacity"),
    [(50, None, 50), (2.5, None, 3), (0.1, None, 1), (50, 5, 5), (1, 100, 100)],
)
def test_ratelimit_capacity(per_second: float, burst: int | None, capacity: int) -> None:
    assert mqkit.RateLimit(per_second=per_second, burst=burst).capacity == capacity


# ---------------------------------------------------------------- backoff


def test_backoff_exponential_without_jitter() -> None:
    p = mqkit.Retry(attempts=10, initial_delay=0.1, multiplier=2, max_delay=100, jitter=0)
    delays = [backoff(p, n) for n in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])


def test_backoff_multiplier_three() -> None:
    p = mqkit.Retry(attempts=5, initial_delay=1, multiplier=3, max_delay=1000, jitter=0)
    assert [backoff(p, n) for n in (1, 2, 3)] == pytest.approx([1, 3, 9])


def test_backoff_capped_by_max_delay() -> None:
    p = mqkit.Retry(attempts=50, initial_delay=0.5, multiplier=2, max_delay=2.0, jitter=0)
    assert backoff(p, 3) == pytest.approx(2.0)
    for n in (4, 10, 40, 2000):
        assert backoff(p, n) == pytest.approx(2.0)


def test_backoff_attempt_zero_treated_as_first() -> None:
    p = mqkit.Retry(initial_delay=0.3, jitter=0)
    assert backoff(p, 0) == pytest.approx(0.3)


def test_backoff_jitter_bounded() -> None:
    p = mqkit.Retry(attempts=20, initial_delay=0.1, multiplier=2, max_delay=1.0, jitter=0.5)
    samples = {n: [backoff(p, n) for _ in range(200)] for n in (1, 2, 10)}
    for n, base in ((1, 0.1), (2, 0.2), (10, 1.0)):
        values = samples[n]
        assert all(base - 1e-9 <= v <= base + 0.5 + 1e-9 for v in values), (n, values)
        assert max(values) - min(values) > 0.05  # jitter is actually random
    # never above max_delay + jitter
    assert max(samples[10]) <= 1.5 + 1e-9


# ---------------------------------------------------------------- should_retry


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


def test_should_retry_default_retries_plain_exceptions() -> None:
    p = mqkit.Retry()
    assert should_retry(p, RuntimeError("x"))
    assert should_retry(p, mqkit.BrokerUnavailable("down"))


def test_should_retry_retry_on() -> None:
    p = mqkit.Retry(retry_on=(Transient,))
    assert should_retry(p, Transient())
    assert not should_retry(p, Fatal())


def test_should_retry_give_up_on_wins() -> None:
    p = mqkit.Retry(retry_on=(Exception,), give_up_on=(Fatal,))
    assert not should_retry(p, Fatal())
    assert should_retry(p, Transient())


def test_should_retry_non_retryable() -> None:
    p = mqkit.Retry()
    assert not should_retry(p, mqkit.NonRetryable("bad order"))


def test_should_retry_honours_retriable_flag() -> None:
    p = mqkit.Retry()
    assert not should_retry(p, mqkit.ConfigError("bad"))
    assert not should_retry(p, mqkit.AuthenticationError("denied"))
    assert not should_retry(p, mqkit.BrokerUnavailable("x", retriable=False))
    assert should_retry(p, mqkit.PublishError("x", retriable=True))

    class Flagged(Exception):
        retriable = False

    assert not should_retry(p, Flagged())


def test_ratelimit_infinite_rate_rejected_up_front() -> None:
    with pytest.raises(mqkit.ConfigError):
        mqkit.RateLimit(per_second=math.inf)
