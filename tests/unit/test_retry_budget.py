"""Retry, the one attempt budget and dead letter, through the public API on memory://."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

import mqkit

T = 5.0  # bound for every wait
FAST = {"initial_delay": 0.01, "max_delay": 0.05, "jitter": 0}


async def run_until(consumer: mqkit.Consumer, handler, done: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    """Run ``handler`` on ``consumer`` until ``done`` is set, then close it."""
    task = asyncio.create_task(consumer.run(handler))
    try:
        await asyncio.wait_for(done.wait(), T)
    finally:
        await asyncio.wait_for(consumer.close(), T)
        await asyncio.wait_for(task, T)


async def receive_one(broker: mqkit.Broker, topic: str, group: str) -> mqkit.Delivery:
    async with broker.consumer(topic, group=group) as c:
        d = await c.receive(timeout=T)
        assert d is not None, f"nothing arrived on {topic}"
        await d.ack()
        return d


async def test_always_failing_handler_called_attempts_times_then_dead_lettered(url: str) -> None:
    async with mqkit.connect(url) as broker:
        receipt = await broker.publish("orders", b"payload", key="k1", headers={"app": "shop"})
        consumer = broker.consumer(
            "orders",
            group="billing",
            retry=mqkit.Retry(attempts=3, **FAST),
            dead_letter="orders-dlq",
        )
        attempts: list[int] = []
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            attempts.append(d.attempt)
            if len(attempts) == 3:
                done.set()
            raise RuntimeError("boom")

        await run_until(consumer, handler, done)
        dead = await receive_one(broker, "orders-dlq", "billing")

    assert attempts == [1, 2, 3]
    assert dead.body == b"payload"
    assert dead.key == "k1"
    assert dead.id == receipt.id
    h = dead.headers
    assert h["app"] == "shop"
    assert h["x-mqkit-original-topic"] == "orders"
    assert h["x-mqkit-original-group"] == "billing"
    assert h["x-mqkit-attempts"] == "3"
    assert h["x-mqkit-error"] == "RuntimeError: boom"
    first = datetime.fromisoformat(h["x-mqkit-first-failure"])
    last = datetime.fromisoformat(h["x-mqkit-last-failure"])
    assert first.tzinfo is not None
    assert first <= last


async def test_non_retryable_called_once(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"bad")
        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=5, **FAST), dead_letter="orders-dlq"
        )
        calls: list[int] = []
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            done.set()
            raise mqkit.NonRetryable("bad order") from ValueError("price < 0")

        await run_until(consumer, handler, done)
        dead = await receive_one(broker, "orders-dlq", "g")
    assert calls == [1]
    assert dead.headers["x-mqkit-attempts"] == "1"
    assert dead.headers["x-mqkit-error"] == "ValueError: price < 0"


async def test_give_up_on_skips_retries(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        retry = mqkit.Retry(attempts=5, give_up_on=(KeyError,), **FAST)
        consumer = broker.consumer("orders", group="g", retry=retry, dead_letter="orders-dlq")
        calls = 0
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            nonlocal calls
            calls += 1
            done.set()
            raise KeyError("missing")

        await run_until(consumer, handler, done)
        dead = await receive_one(broker, "orders-dlq", "g")
    assert calls == 1
    assert dead.headers["x-mqkit-error-type"] == "KeyError"


async def test_success_after_retry_is_acked_not_dead_lettered(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=3, **FAST), dead_letter="orders-dlq"
        )
        attempts: list[int] = []
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            attempts.append(d.attempt)
            if d.attempt == 1:
                raise RuntimeError("transient")
            done.set()

        await run_until(consumer, handler, done)
        async with broker.consumer("orders-dlq", group="g") as dlq:
            assert await dlq.receive(timeout=0.3) is None
        async with broker.consumer("orders", group="g") as again:
            assert await again.receive(timeout=0.3) is None
    assert attempts == [1, 2]


async def test_budget_counts_broker_redeliveries(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare("orders", groups=["g"])
        await broker.publish("orders", b"x")
        first = broker.consumer("orders", group="g")
        async with first:
            d = await first.receive(timeout=T)
            assert d is not None and d.attempt == 1
            await d.nack(requeue=True)

        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=3, **FAST), dead_letter="orders-dlq"
        )
        attempts: list[int] = []
        dead_lettered = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            attempts.append(d.attempt)
            raise RuntimeError("boom")

        task = asyncio.create_task(consumer.run(handler))
        dead = await receive_one(broker, "orders-dlq", "g")
        dead_lettered.set()
        await asyncio.wait_for(consumer.close(), T)
        await asyncio.wait_for(task, T)
    assert attempts == [2, 3]
    assert dead.headers["x-mqkit-attempts"] == "3"


async def test_iterator_nack_respects_explicit_budget(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=2, **FAST), dead_letter="orders-dlq"
        )
        seen: list[int] = []
        async with consumer:
            for _ in range(2):
                d = await consumer.receive(timeout=T)
                assert d is not None
                seen.append(d.attempt)
                await d.nack(requeue=True)
            assert await consumer.receive(timeout=0.3) is None
        dead = await receive_one(broker, "orders-dlq", "g")
    assert seen == [1, 2]
    assert dead.headers["x-mqkit-attempts"] == "2"


async def test_nack_without_requeue_dead_letters_now(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        async with broker.consumer("orders", group="g", dead_letter="orders-dlq") as c:
            d = await c.receive(timeout=T)
            assert d is not None
            await d.nack(requeue=False)
            assert await c.receive(timeout=0.3) is None
        dead = await receive_one(broker, "orders-dlq", "g")
    assert dead.headers["x-mqkit-attempts"] == "1"


async def test_failing_dead_letter_publish_keeps_the_message(faildlq_url: str) -> None:
    async with mqkit.connect(faildlq_url) as broker:
        transport = broker.transport
        assert isinstance(transport, mqkit.adapters.memory.MemoryTransport)
        transport.dlq_failures = 2  # type: ignore[attr-defined]
        receipt = await broker.publish("orders", b"precious")
        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=1, **FAST), dead_letter="orders-dlq"
        )
        attempts: list[int] = []

        async def handler(d: mqkit.Delivery) -> None:
            attempts.append(d.attempt)
            raise RuntimeError("boom")

        task = asyncio.create_task(consumer.run(handler))
        dead = await receive_one(broker, "orders-dlq", "g")
        await asyncio.wait_for(consumer.close(), T)
        await asyncio.wait_for(task, T)
        async with broker.consumer("orders", group="g") as after:
            assert await after.receive(timeout=0.3) is None  # acked once dead-lettered
    # two refused dead-letter copies: the original came back each time (attempts 2 and 3, past
    # the budget of 1, so the handler never ran again), then the third copy was accepted
    assert attempts == [1]
    assert transport.dlq_attempts == 3  # type: ignore[attr-defined]
    assert dead.id == receipt.id and dead.body == b"precious"


async def test_failing_dead_letter_is_redelivered_to_next_consumer(faildlq_url: str) -> None:
    async with mqkit.connect(faildlq_url) as broker:
        broker.transport.dlq_failures = 10**6  # type: ignore[attr-defined]
        receipt = await broker.publish("orders", b"precious")
        consumer = broker.consumer(
            "orders", group="g", retry=mqkit.Retry(attempts=1, **FAST), dead_letter="orders-dlq"
        )
        came_back = asyncio.Event()
        # the second dead-letter try is made for the message that came back (attempt 2, past
        # the budget: given up again without running the handler)
        broker.transport.dlq_watch = (2, came_back)  # type: ignore[attr-defined]
        calls: list[int] = []

        async def handler(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            raise RuntimeError("boom")

        await run_until(consumer, handler, came_back)
        assert calls == [1]
        async with broker.consumer("orders", group="g") as after:
            d = await after.receive(timeout=T)
            assert d is not None, "the message was lost when dead-lettering failed"
            assert d.id == receipt.id
            await d.ack()


@pytest.mark.parametrize("attempts", [1, 2])
async def test_no_dead_letter_topic_drops_after_budget(url: str, attempts: int) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        consumer = broker.consumer("orders", group="g", retry=mqkit.Retry(attempts, **FAST))
        calls: list[int] = []
        done = asyncio.Event()

        async def handler(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            if len(calls) == attempts:
                done.set()
            raise RuntimeError("boom")

        await run_until(consumer, handler, done)
        async with broker.consumer("orders", group="g") as after:
            assert await after.receive(timeout=0.3) is None
    assert calls == list(range(1, attempts + 1))


async def test_handback_of_untouched_prefetch_does_not_spend_budget(url: str) -> None:
    async with mqkit.connect(url + "?partitions=1") as broker:
        await broker.producer().send_many("orders", [b"seen", b"untouched"])
        async with broker.consumer("orders", group="g") as first:
            d = await first.receive(timeout=T)
            assert d is not None and d.body == b"seen"
            assert first.held == 2  # the second was prefetched, never handed out
        async with broker.consumer("orders", group="g") as second:
            attempts = {}
            for _ in range(2):
                d = await second.receive(timeout=T)
                assert d is not None
                attempts[d.body] = d.attempt
                await d.ack()
    # handed to the application and never settled: a graceful close spends no attempt (C58)
    assert attempts[b"seen"] == 1
    assert attempts[b"untouched"] == 1, attempts


async def test_durable_retry_dead_letters_with_the_first_failure_time(url: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.publish("orders", b"x")
        retry = mqkit.Retry(
            attempts=2, initial_delay=0.3, max_delay=0.3, jitter=0, durable_after=0.1
        )
        consumer = broker.consumer("orders", group="g", retry=retry, dead_letter="orders-dlq")
        calls: list[int] = []
        started = datetime.now(UTC)

        async def handler(d: mqkit.Delivery) -> None:
            calls.append(d.attempt)
            raise RuntimeError("boom")

        task = asyncio.create_task(consumer.run(handler))
        dead = await receive_one(broker, "orders-dlq", "g")
        await asyncio.wait_for(consumer.close(), T)
        await asyncio.wait_for(task, T)
    assert calls == [1, 2]  # the second attempt came from the delayed copy
    assert dead.headers["x-mqkit-attempts"] == "2"
    assert "x-mqkit-attempt" not in dead.headers
    first = datetime.fromisoformat(dead.headers["x-mqkit-first-failure"])
    last = datetime.fromisoformat(dead.headers["x-mqkit-last-failure"])
    # the first failure is the original delivery's (carried by the copy), 0.3 s before the last
    assert (first - started).total_seconds() > -0.01  # the envelope keeps milliseconds
    assert (last - first).total_seconds() >= 0.25
