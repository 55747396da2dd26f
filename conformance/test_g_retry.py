"""G. Retry and dead letter (C36-C40)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import mqkit

from .harness import Harness, scenario


def _fast(attempts: int) -> mqkit.Retry:
    return mqkit.Retry(attempts=attempts, initial_delay=0.01, max_delay=0.05, jitter=0.0)


async def _dead_letters(h: Harness, dlq: str, group: str, count: int) -> list[mqkit.Delivery]:
    async with h.broker.consumer(dlq, group) as dead:
        return await h.collect(dead, count)


@scenario("C36")
async def test_C36_attempts_then_dead_letter(h: Harness) -> None:
    """An always-failing handler is called exactly `attempts` times, then dead-lettered with the
    original error in the envelope."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    r = await h.broker.publish(topic, b"fails", key="k1", headers={"h": "v"})
    calls: list[int] = []

    async def handle(d: mqkit.Delivery) -> None:
        calls.append(d.attempt)
        raise ValueError("always broken")

    consumer = h.broker.consumer(topic, group, retry=_fast(4), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    (d,) = await _dead_letters(h, dlq, group, 1)
    await consumer.close()
    await run
    assert calls == [1, 2, 3, 4]
    assert d.id == r.id and d.body == b"fails" and d.key == "k1" and d.headers["h"] == "v"
    assert d.headers["x-mqkit-attempts"] == "4"
    assert "always broken" in d.headers["x-mqkit-error"]
    assert d.headers["x-mqkit-error-type"] == "ValueError"


@scenario("C37")
async def test_C37_non_retryable(h: Harness) -> None:
    """An error marked non-retryable: exactly one attempt, then dead letter."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    r = await h.broker.publish(topic, b"bad input")
    calls = 0

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal calls
        calls += 1
        raise mqkit.NonRetryable("cannot ever work") from KeyError("field")

    consumer = h.broker.consumer(topic, group, retry=_fast(5), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    (d,) = await _dead_letters(h, dlq, group, 1)
    await consumer.close()
    await run
    assert calls == 1 and d.id == r.id
    assert d.headers["x-mqkit-attempts"] == "1"
    assert d.headers["x-mqkit-error-type"] == "KeyError"


@scenario("C38")
async def test_C38_one_budget(h: Harness) -> None:
    """One retry budget: broker redeliveries plus in-process retries never exceed `attempts`."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    r = await h.broker.publish(topic, b"budget")
    async with h.broker.consumer(topic, group) as first:
        (d,) = await h.collect(first, 1, ack=False)
        assert d.attempt == 1
        await d.nack(requeue=True)  # attempt 1 spent through the broker
    calls: list[int] = []

    async def handle(d: mqkit.Delivery) -> None:
        calls.append(d.attempt)
        raise RuntimeError("still failing")

    consumer = h.broker.consumer(topic, group, retry=_fast(3), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    (dead,) = await _dead_letters(h, dlq, group, 1)
    await consumer.close()
    await run
    assert dead.id == r.id
    assert calls and calls[0] >= 2, f"the broker redelivery must count: {calls}"
    assert calls[-1] == 3 and len(calls) <= 2, f"no more than 3 attempts in all: {calls}"
    assert dead.headers["x-mqkit-attempts"] == "3"


@scenario("C39")
async def test_C39_retry_stops_on_close(h: Harness) -> None:
    """Retrying stops when the consumer loses the partition/queue (close); the message is handed
    back, not dead-lettered."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    r = await h.broker.publish(topic, b"slow retry")
    calls = 0
    called = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        nonlocal calls
        calls += 1
        called.set()
        raise RuntimeError("retry me later")

    consumer = h.broker.consumer(
        topic,
        group,
        dead_letter=dlq,
        retry=mqkit.Retry(attempts=20, initial_delay=0.3, max_delay=0.3, jitter=0),
    )
    run = asyncio.create_task(consumer.run(handle))
    async with asyncio.timeout(h.t(20)):
        await called.wait()
    await consumer.close()
    await run
    after = calls
    await asyncio.sleep(0.8)  # a retry timer that survived close would fire within this window
    assert calls == after, "no handler call after close"
    async with h.broker.consumer(topic, group) as again:
        (d,) = await h.collect(again, 1)
        assert d.id == r.id and d.attempt > after
    async with h.broker.consumer(dlq, group) as dead:
        assert await h.quiet(dead, 1.0) is None


@scenario("C40")
async def test_C40_dead_letter_envelope(h: Harness) -> None:
    """Dead-letter envelope: original topic, group, attempts, error type and message, first and
    last failure time, trace context; the main group never sees it again."""
    group = h.name("g")
    topic = await h.topic(group)
    dlq = h.name("dlq")
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await h.broker.publish(topic, b"env", headers={"traceparent": trace})

    async def handle(d: mqkit.Delivery) -> None:
        raise LookupError("no such customer")

    consumer = h.broker.consumer(topic, group, retry=_fast(2), dead_letter=dlq)
    run = asyncio.create_task(consumer.run(handle))
    (d,) = await _dead_letters(h, dlq, group, 1)
    await consumer.close()
    await run
    hd = d.headers
    assert d.id == r.id
    assert hd["x-mqkit-original-topic"] == topic
    assert hd["x-mqkit-original-group"] == group
    assert hd["x-mqkit-attempts"] == "2"
    assert hd["x-mqkit-error-type"] == "LookupError"
    assert hd["x-mqkit-error-message"] == "no such customer"
    first = datetime.fromisoformat(hd["x-mqkit-first-failure"])
    last = datetime.fromisoformat(hd["x-mqkit-last-failure"])
    assert first <= last
    assert hd["traceparent"] == trace
    async with h.broker.consumer(topic, group) as main:
        assert await h.quiet(main) is None
