"""Pause / resume and the circuit breaker, through the public API on memory://."""

from __future__ import annotations

import asyncio
import logging

import pytest

import mqkit
from mqkit.middleware.breaker import _Window

T = 5.0  # bound for every wait
FAST = mqkit.Retry(attempts=5, initial_delay=0.01, max_delay=0.02, jitter=0.0)


async def wait_for(predicate, event: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(T):
        while not predicate():
            event.clear()
            await event.wait()


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"failure_ratio": 0}, "failure_ratio must be > 0"),
        ({"failure_ratio": 1.5}, "at most 1"),
        ({"min_calls": 0}, "min_calls must be an int >= 1"),
        ({"window": -1}, "window must be > 0"),
        ({"open_for": float("nan")}, "open_for must be a finite number"),
        ({"count_on": [ValueError]}, "count_on must be a tuple of exception types"),
    ],
)
def test_bad_breaker_settings_are_config_errors(options: dict[str, object], text: str) -> None:
    with pytest.raises(mqkit.ConfigError, match=text):
        mqkit.CircuitBreaker(**options)  # type: ignore[arg-type]


def test_breaker_counts_every_error_but_non_retryable_by_default() -> None:
    b = mqkit.CircuitBreaker()
    assert b.counts(RuntimeError()) and b.counts(mqkit.BrokerUnavailable("x"))
    assert not b.counts(mqkit.NonRetryable("bad message"))
    only = mqkit.CircuitBreaker(count_on=(TimeoutError,), ignore=())
    assert only.counts(TimeoutError()) and not only.counts(ValueError())


def test_window_forgets_old_outcomes() -> None:
    w = _Window(10.0)
    for i in range(5):
        w.add(True, 100.0 + i)
    w.add(False, 104.5)
    assert w.totals(105.0) == (6, 5)
    assert w.totals(112.0) == (3, 2)  # the buckets of 100..102.9 fell out
    assert w.totals(200.0) == (0, 0)


async def test_consumer_option_is_checked(url: str) -> None:
    async with mqkit.connect(url) as broker:
        with pytest.raises(mqkit.ConfigError, match="circuit_breaker must be a mqkit"):
            broker.consumer("t", group="g", circuit_breaker=0.5)  # type: ignore[arg-type]
        assert broker.consumer("t", group="g").breaker_state is None


async def test_pause_before_start_starts_paused(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("t", b"x")
        got = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            got.set()

        consumer = broker.consumer("t", group="g")
        await consumer.pause()
        assert consumer.paused
        run = asyncio.create_task(consumer.run(handle))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):  # must not happen while paused
                await got.wait()
        assert consumer.held == 0  # nothing was fetched
        await consumer.resume()
        async with asyncio.timeout(T):
            await got.wait()
        await consumer.close()
        await run


async def test_failed_probe_reopens_then_closes(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mqkit.consumer")
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [b"a", b"b", b"c", b"d"])
        healthy_after = 6  # calls: 2 open it, probe 3 fails, probe 4 fails, 5 fails...
        calls: list[tuple[str, int]] = []
        progress = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            calls.append((d.id, d.attempt))
            progress.set()
            if len(calls) < healthy_after:
                raise RuntimeError("down")

        breaker = mqkit.CircuitBreaker(failure_ratio=1.0, min_calls=2, window=5, open_for=0.05)
        consumer = broker.consumer("t", group="g", retry=FAST, circuit_breaker=breaker)
        run = asyncio.create_task(consumer.run(handle))
        await wait_for(lambda: len(calls) >= healthy_after + 3, progress)
        await consumer.close()
        await run
    assert consumer.breaker_state == "closed"
    opened = [r for r in caplog.records if "opened" in r.getMessage()]
    closed = [r for r in caplog.records if "breaker of t/g closed" in r.getMessage()]
    assert len(opened) >= 2 and len(closed) == 1  # reopened by a failed probe, closed once
    assert max(a for _, a in calls) <= 2  # failures while open spent no attempts


async def test_non_retryable_errors_do_not_open_the_breaker(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many("t", [b"%d" % i for i in range(6)])
        progress = asyncio.Event()
        calls = 0

        async def handle(d: mqkit.Delivery) -> None:
            nonlocal calls
            calls += 1
            progress.set()
            raise mqkit.NonRetryable("bad message")

        breaker = mqkit.CircuitBreaker(failure_ratio=0.5, min_calls=2, open_for=60)
        consumer = broker.consumer(
            "t", group="g", retry=FAST, circuit_breaker=breaker, dead_letter="t-dlq"
        )
        run = asyncio.create_task(consumer.run(handle))
        await wait_for(lambda: calls >= 6, progress)
        assert consumer.breaker_state == "closed"
        await consumer.close()
        await run


async def test_deleting_a_topic_reports_its_pending_delayed_messages(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("later", b"x", delay=60)
        await broker.publish("other", b"y", delay=60)
        with caplog.at_level(logging.WARNING, logger="mqkit.adapters.memory"):
            await broker.transport.delete("later")
        assert any("dropped 1 delayed message" in r.getMessage() for r in caplog.records)
        await broker.transport.delete("later")  # again: nothing left, nothing said
        assert sum("dropped" in r.getMessage() for r in caplog.records) == 1


async def test_delays_are_checked(url: str) -> None:
    async with mqkit.connect(url) as broker:
        for bad in (-1, float("inf"), float("nan"), "5"):
            with pytest.raises(mqkit.ConfigError, match="delay"):
                await broker.publish("t", b"x", delay=bad)  # type: ignore[arg-type]
        with pytest.raises(mqkit.ConfigError, match="delay"):
            await broker.producer().send_many("t", [mqkit.Message(b"x", delay=-2.0)])
    async with mqkit.connect(url) as broker:
        broker.transport.capabilities = mqkit.Capabilities(max_delay=10.0)
        with pytest.raises(mqkit.ConfigError, match="max_delay"):
            await broker.publish("t", b"x", delay=11)
        broker.transport.capabilities = mqkit.Capabilities()  # no delayed delivery
        with pytest.raises(mqkit.NotSupported, match="max_delay is 0"):
            await broker.publish("t", b"x", delay=1)
