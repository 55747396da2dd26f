"""Retry by time: ``Retry(deadline=...)`` and ``Retry.until(...)`` on producers and consumers."""

from __future__ import annotations

import asyncio

import pytest

import mqkit
from mqkit.middleware.retry import next_delay

T = 5.0


def test_deadline_validated() -> None:
    with pytest.raises(mqkit.ConfigError, match="deadline"):
        mqkit.Retry(deadline=-1)
    with pytest.raises(mqkit.ConfigError, match="deadline"):
        mqkit.Retry(deadline=float("inf"))
    assert mqkit.Retry.until(60.0).deadline == 60.0


def test_next_delay_stops_at_deadline_and_shortens_the_last_wait() -> None:
    policy = mqkit.Retry(attempts=100, initial_delay=1.0, max_delay=1.0, jitter=0, deadline=2.5)
    err = mqkit.BrokerUnavailable("down")
    assert next_delay(policy, 1, err, 0.0) == 1.0
    assert next_delay(policy, 3, err, 2.0) == pytest.approx(0.5)  # ends at the deadline
    assert next_delay(policy, 4, err, 2.5) is None
    assert next_delay(policy, 100, err, 0.0) is None  # attempts still bound it
    assert next_delay(policy, 1, mqkit.NonRetryable("no"), 0.0) is None


async def test_producer_retries_until_the_deadline_then_fails(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 10_000  # type: ignore[attr-defined]
        retry = mqkit.Retry.until(0.3, initial_delay=0.02, max_delay=0.02, jitter=0)
        async with broker.producer(retry=retry) as producer:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(mqkit.PublishError) as info:
                await asyncio.wait_for(producer.send("t", b"x"), T)
            took = loop.time() - t0
        assert info.value.outcome == "unknown"
        assert 0.25 < took < 1.5, took
        assert transport.calls > 5  # type: ignore[attr-defined]  # many attempts, not 3


async def test_producer_carries_through_an_outage_within_the_deadline(flaky_url: str) -> None:
    async with mqkit.connect(flaky_url) as broker:
        transport = broker.transport
        transport.failures = 20  # type: ignore[attr-defined]
        retry = mqkit.Retry.until(5.0, initial_delay=0.005, max_delay=0.01, jitter=0)
        async with broker.producer(retry=retry) as producer:
            receipt = await asyncio.wait_for(producer.send("t", b"x"), T)
        assert receipt.confirmed
        assert transport.calls == 21  # type: ignore[attr-defined]


async def test_consumer_retry_deadline_ends_in_dead_letter(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["billing"])
        await broker.publish("orders", b"x")
        calls: list[int] = []
        dead = asyncio.Event()
        retry = mqkit.Retry.until(0.3, initial_delay=0.05, max_delay=0.05, jitter=0)
        consumer = broker.consumer("orders", "billing", retry=retry, dead_letter="orders-dlq")

        async def fail(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            raise RuntimeError("downstream down")

        task = asyncio.create_task(consumer.run(fail))
        async with broker.consumer("orders-dlq", "billing") as dlq:
            d = await dlq.receive(timeout=T)
            assert d is not None
            dead.set()
            await d.ack()
        await consumer.close()
        await asyncio.wait_for(task, T)
        assert 3 <= len(calls) <= 10, calls  # bounded by time, not by the default 3 attempts
        assert d.headers["x-mqkit-attempts"] == str(len(calls))
