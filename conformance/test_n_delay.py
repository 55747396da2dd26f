"""N. Delays (C42, C43): delayed delivery, and the durable retry that uses it."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

import mqkit

from .harness import Harness, scenario


@scenario("C43", "delay", timeout=60.0)
async def test_C43_delayed_delivery(h: Harness) -> None:
    """A delayed message is delivered no earlier than its delay after the send was confirmed,
    and soon after; messages sent later without a delay do not wait for it."""
    group = h.name("g")
    topic = await h.topic(group)
    delay = h.t(2.0)
    async with h.broker.consumer(topic, group) as consumer:
        await consumer.start()
        r = await h.broker.publish(topic, b"later", delay=delay)
        confirmed = time.monotonic()
        now = await h.broker.publish(topic, b"now")
        first = await consumer.receive(timeout=h.t(10))
        assert first is not None and first.id == now.id, "the undelayed message waited"
        await first.ack()
        second = await consumer.receive(timeout=delay + h.t(10))
        arrived = time.monotonic()
        assert second is not None and second.id == r.id and second.body == b"later"
        await second.ack()
    early = delay - (arrived - confirmed)
    assert early <= 0.05, f"delivered {early:.3f}s before its delay"
    late = arrived - confirmed - delay
    assert late <= h.t(1.5), f"delivered {late:.2f}s after its delay (target: within 1 s)"
    h.record(delay_seconds=delay, late_seconds=round(late, 3))


@scenario("C43", "delay", timeout=30.0)
async def test_C43_bad_delays_are_refused(h: Harness) -> None:
    """A negative or non-finite delay, or one above ``max_delay``, is a ConfigError."""
    topic = await h.topic()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(mqkit.ConfigError, match="delay"):
            await h.broker.publish(topic, b"x", delay=bad)
    limit = h.caps.max_delay
    if limit is not None:
        with pytest.raises(mqkit.ConfigError, match="max_delay"):
            await h.broker.publish(topic, b"x", delay=limit + 1.0)


@scenario("C42", "delay", timeout=90.0)
async def test_C42_durable_retry_does_not_block(h: Harness) -> None:
    """While a message waits for its delayed retry, later messages flow and it holds no
    prefetch slot; it comes back no earlier than the backoff, with the next attempt number,
    even to a consumer started after the first one closed."""
    group = h.name("g")
    topic = await h.topic(group)
    backoff = h.t(2.0)
    retry = mqkit.Retry(
        attempts=3, initial_delay=backoff, max_delay=backoff, jitter=0.0, durable_after=1.0
    )
    failing = await h.broker.publish(topic, b"fails once")
    later = await h.publish_many(topic, [f"m{i}".encode() for i in range(5)])
    calls: list[tuple[str, int, float]] = []
    progress = asyncio.Event()

    async def handle(d: mqkit.Delivery) -> None:
        calls.append((d.id, d.attempt, time.monotonic()))
        progress.set()
        if d.id == failing.id and d.attempt == 1:
            raise RuntimeError("not yet")

    consumer = h.broker.consumer(topic, group, retry=retry)
    run = asyncio.create_task(consumer.run(handle))
    # the failing message and the later ones may arrive in any order (several queues)
    await h.wait_until(
        lambda: {i for i, _, _ in calls} >= {failing.id, *later},
        progress,
        30,
        "the failing message and the later ones",
    )
    first_tries = [(a, t) for i, a, t in calls if i == failing.id]
    assert first_tries[0][0] == 1, f"the first delivery was attempt {first_tries[0][0]}"
    failed_at = first_tries[0][1]
    assert not [c for c in calls if c[0] == failing.id and c[1] > 1], "retried too soon"
    # the delivery is acked once its delayed copy is confirmed: a moment after the failure
    async with asyncio.timeout(h.t(10)):
        while consumer.held:  # noqa: ASYNC110 (no event says "the copy is confirmed")
            await asyncio.sleep(0.02)
    assert not [c for c in calls if c[0] == failing.id and c[1] > 1], "retried too soon"
    await consumer.close()  # the retry waits in the broker, not in this consumer
    await run
    async with h.broker.consumer(topic, group) as after:
        d = await after.receive(timeout=backoff + h.t(10))
        back = time.monotonic()
        assert d is not None and d.id == failing.id and d.body == b"fails once"
        assert d.attempt == 2, f"the retry arrived as attempt {d.attempt}"
        await d.ack()
        assert await h.quiet(after) is None
    assert back - failed_at >= backoff - 0.05, "the retry came back before its backoff"
    h.record(backoff_seconds=backoff, came_back_after=round(back - failed_at, 2))
